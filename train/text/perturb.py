"""Meaning-changing rewrites of a report phrase (label generation rule 2: a perturbed positive is a hard negative).

Every perturbation takes any string and returns the rewrite or None ("no perturbation": the text names
no finding, no side, no severity word, or the rewrite would not change it); it never raises. Each None is
counted in `SKIPPED` by kind, so a data pipeline can report how many phrases could not be perturbed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from train.text.parser import (
    NEGATED,
    POST,
    PRE,
    UNCERTAIN,
    _find_findings,
    _find_triggers,
    _lower,
    _split_clauses,
    parse_report,
    trigger_scopes,
)

PERTURBATIONS = ("negation", "laterality", "severity")

# kind -> number of texts it returned None for; "phrase" counts `perturb_phrase` calls that found no
# meaning-changing rewrite. Module-level so that a whole data-set pass can be summarised; `.clear()` resets it.
SKIPPED: Counter[str] = Counter()

_LATERALITY_SWAP = {"right": "left", "left": "right"}
_SEVERITY_SWAP = {
    "mild": "severe", "mildly": "severely", "minimal": "extensive", "minimally": "markedly", "slight": "marked",
    "slightly": "markedly", "small": "large", "tiny": "large", "trace": "large", "subtle": "extensive",
    "moderate": "mild", "moderately": "mildly",
    "severe": "mild", "severely": "mildly", "large": "small", "marked": "minimal", "markedly": "minimally",
    "extensive": "minimal", "massive": "small", "substantial": "slight",
}
_PLURAL_COPULA = {"is": "shows", "are": "show", "was": "showed", "were": "showed", "remains": "shows",
                  "remain": "show", "appears": "shows", "appear": "show"}
# Rewrites that remove a negation trigger (matched against the trigger's lower-cased text, first match wins).
_NEGATION_REMOVALS: tuple[tuple[str, str], ...] = (
    (r"(?:(is|are|was|were) )?(?:now )?(?:absent|gone)", r"\1 present"),
    (r"(?:(is|are|was|were) )?no longer (\w+)", r"\1 still \2"),
    (r"no longer", "still"),
    (r"(?:(is|are|was|were|has been|have been) )?not (?:(?:well|clearly|definitely|convincingly|currently|"
     r"radiographically) )?(\w+)", r"\1 \2"),
    (r"have (?:(?:since|completely|nearly|almost|now) )?(?:resolved|cleared)", "persist"),
    (r"(?:has )?(?:(?:since|completely|nearly|almost|now) )?(?:resolved|cleared)", "persists"),
    (r"(?:have been|were) removed", "remain in place"),
    (r"(?:has been|was) removed", "remains in place"),
    (r"negative for", "positive for"),
    (r"(?:(is|are|was|were|remains?|appears?) )?(?:free|clear) of", "{copula}"),
    (r"without", "with"),
    (r"absence of", "presence of"),
    (r"(?:interval |complete )?resolution of", "persistent"),
    (r"(?:interval )?removal of", "placement of"),
    (r"rules? out", "shows"),
    (r"no|not", ""),
)
# Post-finding words whose copula takes "not" ("effusion is seen" -> "effusion is not seen") or that a
# resolution replaces ("effusion is unchanged" -> "effusion has resolved").
_SEEN_AFTER = re.compile(
    r"\s+(is|are|was|were)\s+(?:(?:again|also|still|now|currently|redemonstrated|newly)\s+)*"
    r"(?=(?:seen|noted|present|identified|visualized|demonstrated|evident|detected|appreciated|observed|visible)\b)")
_CHANGE_AFTER = re.compile(
    r"\s+(is|are|has|have)\s+(?:(?:\w+ly|again|also|still|now)\s+)*(?:been\s+)?(?:unchanged|stable|improved|improving|"
    r"increased|increasing|decreased|decreasing|worse|worsened|worsening|larger|smaller|similar|persistent|new)\b")
_COPULA_BEFORE = re.compile(r"(?<!there )(?<!there's )\b(is|are|was|were|appears?|remains?|seems?)(?:\s+\w+ly)?\s+$")
_HEDGE_OF = re.compile(r"(?:suggestive|suspicious|concerning|worrisome|concern|suspicion|correlat(?:e|ion)|question"
                       r"|possibility) (?:of|for)$")
# Words that end a finding's noun phrase on its left, and the words of it a negated finding keeps.
_NOUN_PHRASE_STOP = frozenset({
    "there", "there's", "is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "of", "in", "on", "at",
    "with", "without", "and", "or", "to", "for", "by", "from", "the", "this", "these", "that", "those", "which", "as",
    "into", "over", "under", "within", "noted", "seen", "shows", "show", "showing", "demonstrates", "demonstrating",
    "suggesting", "suggests", "represent", "represents", "representing", "reflect", "reflects", "reflecting", "may",
    "could", "might", "can", "but", "no", "not", "also", "again", "consistent", "compatible", "due", "related",
    "secondary", "findings", "finding", "evidence", "appearance", "patient",
})
_LOCATION_WORDS = frozenset({
    "right", "left", "bilateral", "bibasilar", "bibasal", "biapical", "basilar", "basal", "apical", "upper", "lower",
    "middle", "mid", "lobe", "lung", "base", "zone", "perihilar", "hilar", "retrocardiac", "lingular", "midlung",
    "right-sided", "left-sided", "pulmonary", "interstitial", "airspace", "thoracic", "lumbar", "cervical",
    "thoracolumbar", "lateral", "posterior", "anterior", "medial", "costophrenic",
})
_TOKEN = re.compile(r"[\w'-]+|[^\w\s]")
_TRAILING_CHANGE = re.compile(r",\s*(?:(?:unchanged|stable|similar|improved|worsened|increased|decreased|again)\b[^,;]*)$")
_VERB_HEDGE = re.compile(r"(?:may|could|might|can)\b")
_DANGLING = re.compile(r"(?:[\s,;]|\b(?:which|that|and|or|this|it)\b)+$")
_PREPOSITION_END = re.compile(r"\b(?:in|of|within|at|on|for|with|to)\s*$")


@dataclass(frozen=True)
class Perturbation:
    text: str
    kind: str  # one of PERTURBATIONS


def _skip(kind: str) -> None:
    SKIPPED[kind] += 1
    return None


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _swap_words(text: str, mapping: dict[str, str], kind: str) -> str | None:
    if not isinstance(text, str):
        return _skip(kind)
    pattern = re.compile(r"\b(" + "|".join(mapping) + r")\b", re.IGNORECASE)
    swapped = pattern.sub(lambda m: _match_case(mapping[m.group(1).lower()], m.group(1)), text)
    return swapped if swapped != text else _skip(kind)


def swap_laterality(text: str) -> str | None:
    """right <-> left; None when the text names no side."""
    return _swap_words(text, _LATERALITY_SWAP, "laterality")


def swap_severity(text: str) -> str | None:
    """mild <-> severe, small <-> large, ...; None when the text has no severity word."""
    return _swap_words(text, _SEVERITY_SWAP, "severity")


def _tidy(text: str, like: str) -> str:
    """Collapse spaces, drop spaces before punctuation, and write it in the original's case."""
    text = re.sub(r"\s+([.,;:])", r"\1", " ".join(text.split())).lstrip(" ,;:")
    if like.isupper() and any(ch.isalpha() for ch in like):
        return text.upper()
    text = re.sub(r"(?<=[.!?] )[a-z]", lambda m: m.group().upper(), text)  # a sentence that now starts lower-case
    return (text[:1].upper() if like[:1].isupper() else text[:1]) + text[1:]


def _unnegate(trigger: str) -> str:
    """The words that replace a negation trigger to state the finding instead ("is not seen" -> "is seen")."""
    trigger = " ".join(trigger.split())
    for pattern, replacement in _NEGATION_REMOVALS:
        match = re.fullmatch(pattern, trigger)
        if match:
            if replacement == "{copula}":
                return _PLURAL_COPULA.get(match.group(1) or "", "with")
            return match.expand(replacement).strip()
    return ""


def _edit(text: str, edits: list[tuple[int, int, str]]) -> str:
    """Apply non-overlapping (start, end, replacement) edits (the later first, so offsets stay valid)."""
    for start, end, replacement in sorted(set(edits), reverse=True):
        text = text[:start] + " " + replacement + " " + text[end:]
    return text


def flip_negation(text: str) -> str | None:
    """Negate a positive statement or state a negated/normal one; None when the text names no finding.

    - negated ("No pleural effusion or pneumothorax.", "Pleural effusion is not seen.", "The effusion has
      resolved.") -> every negation that covers a finding is removed and a negated list becomes a conjunction
      ("Pleural effusion and pneumothorax.", "Pleural effusion is seen.", "The effusion persists.");
    - normal ("Heart size is normal.", "The lungs are clear.") -> the abnormal predicate ("Heart size is
      enlarged.", "The lungs are opacified.");
    - hedged after the finding ("Pneumonia cannot be excluded.") -> "No pneumonia.";
    - positive -> negated: "The aorta is tortuous." -> "The aorta is not tortuous."; "Effusion is again seen."
      -> "Effusion is not seen."; "Small left effusion is unchanged." -> "Small left effusion has resolved.";
      "Findings suggestive of pneumonia." -> "Findings negative for pneumonia."; "A small right pleural
      effusion." -> "No right pleural effusion."
    Change words ("unchanged", "improved", "stable", "again seen") are not negations: a finding stated with
    them is negated like any stated finding, and a negated noun phrase keeps none of them ("no worsening X"
    would still state X).
    """
    if not isinstance(text, str):
        return _skip("negation")
    flipped = _flip(text)
    if not flipped or flipped == text or not re.search(r"[^\W\d_]", flipped):
        return _skip("negation")
    return flipped


def _flip(text: str, hedge_removed: bool = False) -> str | None:
    low = _lower(text)
    findings = _find_findings(low)
    if not findings:
        return None
    triggers = _find_triggers(low)
    clauses = _split_clauses(low, triggers) or [(0, len(low))]
    scopes = {clause: trigger_scopes(low, triggers, clause) for clause in clauses}
    covering = {}
    for finding in findings:
        clause = next((c for c in clauses if c[0] <= finding.start < c[1]), clauses[-1])
        covering[finding] = (clause, [s.trigger for s in scopes[clause] if s.covers(finding)])
    negations = {t: clause for clause, ts in covering.values() for t in ts if t.label == NEGATED}
    normal: dict[tuple[int, int], str] = {}
    for finding in findings:
        if finding.absent:
            normal.setdefault(finding.predicate, finding.normal.abnormal)
    if negations:  # remove every negation that covers a finding; "no A or B" -> "A and B"
        edits = [(t.start, t.end, _unnegate(low[t.start:t.end])) for t in negations]
        edits += [(a, b, abnormal) for (a, b), abnormal in normal.items()
                  if not any(e[0] < b and a < e[1] for e in edits)]  # "lungs are clear without X" -> "... opacified with X"
        for t, clause in negations.items():
            if t.direction == PRE:
                stops = [s.start for s in triggers if s.start >= t.end and s.label not in (NEGATED, UNCERTAIN)]
                scope_end = min([s for s in stops if s < clause[1]], default=clause[1])
                edits += [(m.start(), m.end(), "and") for m in re.finditer(r"(?<!/)\b(?:or|nor)\b", low[:scope_end])
                          if m.start() >= t.end and not any(e[0] <= m.start() < e[1] for e in edits)]
        return _tidy(_edit(text, edits), like=text)
    if normal:  # a normal statement: give it the abnormal predicate
        return _tidy(_edit(text, [(a, b, abnormal) for (a, b), abnormal in normal.items()]), like=text)
    hedges = [t for _, ts in covering.values() for t in ts if t.label == UNCERTAIN and t.direction == POST]
    if hedges and not hedge_removed:  # "X cannot be excluded" -> "no X", not "no X cannot be excluded"
        unhedged = _tidy(_edit(text, [(t.start, t.end, "") for t in hedges]), like=text)
        return _flip(unhedged, hedge_removed=True)
    return _negate(text, low, findings[0], covering[findings[0]][1], triggers)


def _negate(text: str, low: str, target, covering: list, triggers: list) -> str | None:
    """Negate the stated finding `target` of `text`."""
    copula = re.search(r"\b(is|are|appears?|remains?|was|were|seems?)\b", low[target.start:target.end])
    if copula:  # predicate finding: "the aorta is tortuous" -> "the aorta is not tortuous"
        cut = target.start + copula.end()
        return _tidy(text[:cut] + " not" + text[cut:], like=text)
    copula = _COPULA_BEFORE.search(low, 0, target.start)
    if copula:  # "the lungs are hyperinflated" -> "the lungs are not hyperinflated"
        return _tidy(text[:copula.end(1)] + " not" + text[copula.end(1):], like=text)
    seen = _SEEN_AFTER.match(low, target.end)
    if seen:  # "effusion is again seen" -> "effusion is not seen"
        return _tidy(text[:target.end] + f" {text[seen.start(1):seen.end(1)]} not " + text[seen.end():], like=text)
    change = _CHANGE_AFTER.match(low, target.end)
    if change:  # "effusion is unchanged" -> "effusion has resolved"
        verb = "have" if change.group(1) in ("are", "have") else "has"
        return _tidy(text[:target.end] + f" {verb} resolved" + text[change.end():], like=text)
    hedge = next((t for t in covering if t.label == UNCERTAIN and t.direction == PRE
                  and _HEDGE_OF.search(low[t.start:t.end])), None)
    if hedge is not None:  # "findings suggestive of pneumonia" -> "findings negative for pneumonia"
        return _tidy(text[:hedge.start] + " negative for " + text[hedge.end:], like=text)
    # an interpretation after it is dropped: "opacity may reflect atelectasis" -> "no opacity"
    end = text.rstrip()[-1:] if text.rstrip()[-1:] in ".!?" else ""
    cut = next((t.start for t in triggers if t.start >= target.end and t.label == UNCERTAIN
                and _VERB_HEDGE.match(low, t.start)), len(low))
    cut = len(_DANGLING.sub("", low[:cut]))
    tail = _TRAILING_CHANGE.search(low, target.end, cut)  # "moderate pneumothorax, unchanged" -> "no pneumothorax"
    if tail:
        cut = tail.start()
    if cut < len(low.rstrip(" .!?")):
        text, low = text[:cut] + end, low[:cut] + end
    # noun-phrase finding: "there is a small right pleural effusion" -> "there is no right pleural effusion"; of the
    # words before it in its noun phrase only location words stay ("no advanced X" would not deny X)
    start = target.start
    for word in reversed(list(_TOKEN.finditer(low, 0, target.start))):
        if word.group() in _NOUN_PHRASE_STOP or not word.group()[0].isalnum():
            break
        start = word.start()
    kept = [word.lower() for word in re.findall(r"[\w-]+", text[start:target.start]) if word.lower() in _LOCATION_WORDS]
    head = text[target.start:]
    head = head if head[:2].isupper() else head[:1].lower() + head[1:]
    before = "" if _PREPOSITION_END.search(low, 0, start) else text[:start]  # "improvement in X" -> "no X"
    return _tidy(" ".join([before, "no", *kept, head]), like=text)


PERTURBERS = {"negation": flip_negation, "laterality": swap_laterality, "severity": swap_severity}


@lru_cache(maxsize=2**16)  # report phrases repeat across the images a loader worker collates
def _meaning(text: str) -> frozenset:
    return frozenset((m.finding, m.present, m.region, m.severity) for m in parse_report(text))


def perturb_phrase(text: str, rng: np.random.Generator, kinds: Sequence[str] = PERTURBATIONS) -> Perturbation | None:
    """A meaning-changing rewrite of `text`, trying `kinds` in random order.

    A rewrite counts only if `parse_report` reads a different set of (finding, present, region, severity)
    from it, so a perturbation that changes only wording (e.g. a laterality swap of "bilateral effusions")
    is never returned. None (counted in `SKIPPED["phrase"]`) when no kind changes the meaning.
    """
    if not isinstance(text, str):
        return _skip("phrase")
    meaning = _meaning(text)
    for index in rng.permutation(len(kinds)):
        candidate = PERTURBERS[kinds[index]](text)
        if candidate and _meaning(candidate) != meaning:
            return Perturbation(candidate, kinds[index])
    return _skip("phrase")

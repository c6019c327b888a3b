"""Meaning-changing rewrites of a report phrase (label generation rule 2: a perturbed positive is a hard negative)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from train.text.parser import NEGATED, POST, SEVERITY_WORDS, UNCERTAIN, _find_findings, _find_triggers, _lower, parse_report
# ---------------------------------------------------------------------------------------------------
# Meaning-changing perturbations (hard negatives)
# ---------------------------------------------------------------------------------------------------

PERTURBATIONS = ("negation", "laterality", "severity")

_LATERALITY_SWAP = {"right": "left", "left": "right"}
_SEVERITY_SWAP = {
    "mild": "severe", "mildly": "severely", "minimal": "extensive", "minimally": "markedly", "slight": "marked",
    "slightly": "markedly", "small": "large", "tiny": "large", "trace": "large", "subtle": "extensive",
    "moderate": "mild", "moderately": "mildly",
    "severe": "mild", "severely": "mildly", "large": "small", "marked": "minimal", "markedly": "minimally",
    "extensive": "minimal", "massive": "small", "substantial": "slight",
}
# Rewrites that remove a negation (applied to the trigger text only).
_NEGATION_REMOVALS: tuple[tuple[str, str], ...] = (
    (r"no (?:evidence|signs?) of\s*", ""), (r"negative for", "positive for"), (r"free of|without", "with"),
    (r"absence of", "presence of"), (r"(?:interval )?resolution of", "persistent"), (r"(?:interval )?removal of", "placement of"),
    (r"(?:has|have) (?:completely )?resolved|resolved", "persists"), (r"(?:has|have) been removed|(?:was|were) removed", "remains in place"),
    (r"no longer", "still"), (r"(is|are|was|were)\s*not", r"\1"), (r"not|no", ""), (r"rules? out", "shows"),
)
# Words that may precede a finding inside its noun phrase ("a small right pleural effusion").
_NOUN_PHRASE_WORDS = frozenset(
    set(SEVERITY_WORDS) | {
        "a", "an", "right", "left", "bilateral", "bibasilar", "basilar", "basal", "apical", "upper", "lower", "middle",
        "mid", "lobe", "lung", "base", "zone", "perihilar", "hilar", "retrocardiac", "lingular", "patchy", "streaky",
        "focal", "new", "increased", "dense", "diffuse", "multifocal", "interstitial", "airspace", "pulmonary",
        "right-sided", "left-sided", "xxxx", "calcified", "compressive", "residual", "persistent", "stable",
        "layering", "loculated", "acute", "chronic", "early", "superimposed", "definite", "displaced", "healed", "old",
    }
)
_HEDGE_WORDS = frozenset({"possible", "possibly", "probable", "probably", "likely", "questionable", "suspected", "presumed"})


@dataclass(frozen=True)
class Perturbation:
    text: str
    kind: str  # one of PERTURBATIONS


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _swap_words(text: str, mapping: dict[str, str]) -> str | None:
    pattern = re.compile(r"\b(" + "|".join(mapping) + r")\b", re.IGNORECASE)
    swapped = pattern.sub(lambda m: _match_case(mapping[m.group(1).lower()], m.group(1)), text)
    return swapped if swapped != text else None


def swap_laterality(text: str) -> str | None:
    """right <-> left; None when the text names no side."""
    return _swap_words(text, _LATERALITY_SWAP)


def swap_severity(text: str) -> str | None:
    """mild <-> severe, small <-> large, ...; None when the text has no severity word."""
    return _swap_words(text, _SEVERITY_SWAP)


def _tidy(text: str, like: str) -> str:
    """Collapse spaces, drop spaces before punctuation, and capitalise like the original text."""
    text = re.sub(r"\s+([.,;:])", r"\1", " ".join(text.split()))
    return (text[:1].upper() if like[:1].isupper() else text[:1]) + text[1:]


def flip_negation(text: str) -> str | None:
    """Negate a positive statement ("small right effusion" -> "no right effusion", "heart is enlarged" ->
    "heart is not enlarged") or un-negate a negative one ("no pneumothorax" -> "pneumothorax",
    "heart size is normal" -> "heart size is enlarged"). None when the text names no finding."""
    original, low = text, _lower(text)
    findings = _find_findings(low)
    if not findings:
        return None
    triggers = _find_triggers(low)
    negations = [t for t in triggers if t.label == NEGATED]
    if negations:  # remove every negation trigger
        for t in sorted(negations, key=lambda t: -t.start):
            replacement = next(
                re.sub(p, r, low[t.start:t.end].strip()) for p, r in _NEGATION_REMOVALS
                if re.fullmatch(r"\s*(?:" + p + r")\s*", low[t.start:t.end])
            )
            text = text[:t.start] + " " + replacement + " " + text[t.end:]
        return _tidy(text, like=original)
    absent = next((f for f in findings if f.absent), None)
    if absent is not None:  # a normal statement: make it abnormal
        body = re.sub(r"within normal limits|upper limits? of normal|unremarkable|(?:top |high )?normal", "enlarged", low[absent.start:absent.end])
        return _tidy(text[:absent.start] + body + text[absent.end:], like=original)
    hedges = [t for t in triggers if t.label == UNCERTAIN and t.direction == POST]
    if hedges:  # "X cannot be excluded" -> "no X", not "no X cannot be excluded"
        for t in sorted(hedges, key=lambda t: -t.start):
            text = text[:t.start] + text[t.end:]
        return flip_negation(_tidy(text, like=original))
    target = findings[0]
    copula = re.search(r"\b(is|are|appears?|remains?|was|seems?)\b", low[target.start:target.end])
    if copula:  # predicate finding: "the aorta is tortuous" -> "the aorta is not tortuous"
        cut = target.start + copula.end()
        return _tidy(text[:cut] + " not" + text[cut:], like=original)
    # noun-phrase finding: "a small right pleural effusion" -> "no right pleural effusion"
    words = list(re.finditer(r"[\w-]+", low[:target.start]))
    start = target.start
    while words and words[-1].group() in _NOUN_PHRASE_WORDS | _HEDGE_WORDS:
        start = words.pop().start()
    kept = [
        word if word.isupper() and len(word) > 1 else word.lower()
        for word in re.findall(r"[\w-]+", text[start:target.start])
        if word.lower() not in SEVERITY_WORDS and word.lower() not in _HEDGE_WORDS and word.lower() not in ("a", "an")
    ]
    head = text[target.start:]
    head = head if head[:2].isupper() else head[:1].lower() + head[1:]
    return _tidy(" ".join([text[:start], "no", *kept, head]), like=original)


PERTURBERS = {"negation": flip_negation, "laterality": swap_laterality, "severity": swap_severity}


def _meaning(text: str) -> frozenset:
    return frozenset((m.finding, m.present, m.region, m.severity) for m in parse_report(text))


def perturb_phrase(text: str, rng: np.random.Generator, kinds: Sequence[str] = PERTURBATIONS) -> Perturbation | None:
    """A meaning-changing rewrite of `text`, trying `kinds` in random order.

    A rewrite counts only if `parse_report` reads a different set of (finding, present, region, severity)
    from it, so a perturbation that changes only wording (e.g. a laterality swap of "bilateral effusions")
    is never returned. None when no kind changes the meaning.
    """
    meaning = _meaning(text)
    for index in rng.permutation(len(kinds)):
        candidate = PERTURBERS[kinds[index]](text)
        if candidate and _meaning(candidate) != meaning:
            return Perturbation(candidate, kinds[index])
    return None

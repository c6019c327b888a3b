"""Contrastive label generation for the region-phrase objective (PAPER.md, "Contrastive label generation").

For every image and every region: the positive texts (report phrases or the region's normal description),
explicit negatives (meaning-changing perturbations of a positive, attribute-based prompts, template hard
negatives), what each of those texts states (`Facts`) and what the image's labels say about the region
(`RegionLabels`); and `collate_region_texts`, which deduplicates texts across a batch and builds the positive /
negative masks. Rule 4 is enforced there: a text of the batch is a negative of a region of an image only where
it contradicts that region's labels in that image, so a sentence shared by equally normal regions (Chest
ImaGenome attaches "The lungs are clear." to many) is never a false negative.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import numpy as np

from train.text.parser import COMPOUND_SYNONYMS, FINDING_SYNONYMS, SEVERITY_WORDS, Mention, parse_report
from train.text.perturb import PERTURBERS, perturb_phrase
from train.text.vocabulary import IMAGENOME_VOCABULARY, plausible_findings
from train.text.vocabulary import region as vocabulary_region
# ---------------------------------------------------------------------------------------------------
# Prompts in the model's zero-shot wording
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionPrompts:
    """The region prompt templates of `AnatomyVLMConfig` ("{finding} in the {region}" / "no {finding} in the {region}")."""

    positive: tuple[str, ...]
    negated: tuple[str, ...]

    @classmethod
    def from_config(cls, config=None) -> "RegionPrompts":
        if config is None:
            from modeling_anatomy_vlm.configuration_anatomy_vlm import AnatomyVLMConfig

            config = AnatomyVLMConfig()
        return cls(tuple(config.region_prompt_templates), tuple(config.region_negated_prompt_templates))

    def render(self, finding: str, region: str, negated: bool = False, index: int = 0) -> str:
        templates = self.negated if negated else self.positive
        return templates[index % len(templates)].format(finding=finding, region=region)


_DEFAULT_PROMPTS: RegionPrompts | None = None


def default_region_prompts() -> RegionPrompts:
    global _DEFAULT_PROMPTS
    if _DEFAULT_PROMPTS is None:
        _DEFAULT_PROMPTS = RegionPrompts.from_config()
    return _DEFAULT_PROMPTS


def render_region_prompt(finding: str, region: str, negated: bool = False, prompts: RegionPrompts | None = None) -> str:
    """"{finding} in the {region}" (or its negated form) rendered from the config's first template."""
    return (prompts or default_region_prompts()).render(finding, region, negated)


# ---------------------------------------------------------------------------------------------------
# What a text states, and what an image's labels say about a region (rule 4)
# ---------------------------------------------------------------------------------------------------

# Chest ImaGenome categories whose labels are findings. "nlp" (normal / abnormal) and the modifier categories
# (texture, temporal, severity, laterality) qualify a finding; they are not one.
FINDING_CATEGORIES = frozenset(IMAGENOME_VOCABULARY) - {"nlp"}
# The parser's severity grades, mildest first.
SEVERITIES = tuple(dict.fromkeys(SEVERITY_WORDS.values()))
_SEVERITY_WORD = re.compile(r"\b(?:" + "|".join(SEVERITY_WORDS) + r")\b")  # over lower-cased text
_SIDE_WORD = re.compile(r"\b(right|left|bilateral(?:ly)?|both|bibasilar|bibasal|biapical)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Facts:
    """What a text states about the region it describes: the claims `collate_region_texts` checks against a
    region's labels.

    Attributes:
        findings: (label, present) claims, Chest ImaGenome labels of `FINDING_CATEGORIES`. A report phrase claims
            its scene-graph attributes there; a prompt its finding; a perturbation what the parser reads in it.
        severities: (label, grade) claims, grade one of `SEVERITIES` ("small effusion": ("pleural effusion", "mild")).
        side: "right" / "left" when the text names that side only; None when it names neither or both.
        normal: states that nothing is found there (the normal description "the {region} is normal").
        abnormal: states that something is found there (the template "the {region} is abnormal").
    """

    findings: frozenset[tuple[str, bool]] = frozenset()
    severities: frozenset[tuple[str, str]] = frozenset()
    side: str | None = None
    normal: bool = False
    abnormal: bool = False

    def merge(self, other: "Facts") -> "Facts":
        """The claims of one text recorded twice (two images or two regions); claims that disagree are dropped."""
        if other is self or other == self:
            return self
        return Facts(
            _unambiguous(self.findings | other.findings), _unambiguous(self.severities | other.severities),
            self.side if self.side == other.side else None,
            self.normal or other.normal, self.abnormal or other.abnormal,
        )


@dataclass(frozen=True)
class RegionLabels:
    """What an image's labels say about one of its regions.

    Attributes:
        present: labels of `FINDING_CATEGORIES` present there, in or out of the model's vocabulary. Any other
            finding counts as absent: reports name what they see, and an unmentioned region is normal.
        severities: (label, grade) pairs its report phrases state (all of them, when phrases disagree).
        side: "right" / "left" for a region with a mirror region ("right atrium" has none), else None.
    """

    present: frozenset[str] = frozenset()
    severities: frozenset[tuple[str, str]] = frozenset()
    side: str | None = None


def _unambiguous(claims: Iterable[tuple[str, object]]) -> frozenset:
    """(label, value) claims without the labels claimed with two values ("X present" and "X absent")."""
    claims = frozenset(claims)
    values: dict[str, int] = {}
    for label, _ in claims:
        values[label] = values.get(label, 0) + 1
    return frozenset(claim for claim in claims if values[claim[0]] == 1)


def _named_side(text: str) -> str | None:
    """The one side a text names ("Small left effusion." -> "left"); None for none or both ("bilateral", "both")."""
    sides = set()
    for match in _SIDE_WORD.finditer(text):
        word = match.group(1).lower()
        sides.update((word,) if word in ("right", "left") else ("right", "left"))
    return sides.pop() if len(sides) == 1 else None


@lru_cache(maxsize=None)
def _region_side(region: str) -> str | None:
    entry = vocabulary_region(region)
    return entry.side if entry.mirror else None


@lru_cache(maxsize=2**16)
def _mentions(text: str) -> tuple[Mention, ...]:
    return tuple(parse_report(text))


@lru_cache(maxsize=2**16)
def _grades(text: str) -> frozenset[tuple[str, str]]:
    """(label, grade) of the present findings a text grades; the parser runs only on texts with a severity word."""
    if not _SEVERITY_WORD.search(text.lower()):
        return frozenset()
    return frozenset((m.finding, m.severity) for m in _mentions(text) if m.present and m.severity)


@lru_cache(maxsize=2**16)
def _phrase_facts(phrase: str, triples: tuple[tuple[str, bool, str], ...]) -> Facts:
    claims = {(label, present) for category, present, label in triples if category in FINDING_CATEGORIES}
    return Facts(_unambiguous(claims), _unambiguous(_grades(phrase)), _named_side(phrase))


@lru_cache(maxsize=2**16)
def _perturbation_facts(text: str) -> Facts:
    """A rewrite's own meaning, as the parser reads it (the same reading `perturb_phrase` checked for a change)."""
    claims = {(m.finding, m.present) for m in _mentions(text)}
    return Facts(_unambiguous(claims), _unambiguous(_grades(text)), _named_side(text))


@lru_cache(maxsize=2**14)
def _prompt_facts(finding: str, present: bool, region: str, grade: str | None = None) -> Facts:
    return Facts(frozenset({(finding, present)}), frozenset({(finding, grade)} if grade else ()), _region_side(region))


@lru_cache(maxsize=2**10)
def _summary_facts(region: str, normal: bool) -> Facts:
    return Facts(side=_region_side(region), normal=normal, abnormal=not normal)


def _contradiction_table(claims: Sequence[Facts], labels: Sequence[RegionLabels]) -> np.ndarray:
    """[C, L] bool: claims[c] contradicts labels[l] (the rule in `collate_region_texts`).

    One matrix product: a claim is an indicator vector over what it states, a label set one over what it rules
    out, laid out the same way: [finding present (K) | finding absent (K) | finding graded g (K x G) | normal |
    abnormal | right side | left side]."""
    names = sorted({label for facts in claims for label, _ in (*facts.findings, *facts.severities)}
                   | {label for region in labels for label in region.present})
    column = {name: k for k, name in enumerate(names)}
    grade = {name: g for g, name in enumerate(SEVERITIES)}
    K, G = len(names), len(SEVERITIES)
    stated = np.zeros((len(claims), (2 + G) * K + 4), dtype=np.float32)  # [C, D]
    for c, facts in enumerate(claims):
        for label, present in facts.findings:
            stated[c, column[label] + (0 if present else K)] = 1
        for label, value in facts.severities:
            stated[c, 2 * K + column[label] * G + grade[value]] = 1
        stated[c, -4:-2] = facts.normal, facts.abnormal
        if facts.side is not None:
            stated[c, -2 if facts.side == "right" else -1] = 1
    present = np.zeros((len(labels), K), dtype=bool)  # [L, K]
    graded = np.zeros((len(labels), K, G), dtype=bool)  # [L, K, G]
    side = np.array([region.side or "" for region in labels])  # [L]
    for i, region in enumerate(labels):
        present[i, [column[label] for label in region.present]] = True
        for label, value in region.severities:
            if label in column:
                graded[i, column[label], grade[value]] = True
    abnormal = present.any(axis=1, keepdims=True)  # [L, 1]
    ruled_out = np.concatenate([
        ~present, present, (graded.any(axis=2, keepdims=True) & ~graded).reshape(len(labels), K * G),
        abnormal, ~abnormal, (side == "left")[:, None], (side == "right")[:, None],
    ], axis=1).astype(np.float32)  # [L, D]
    return stated @ ruled_out.T > 0


@lru_cache(maxsize=None)
def _naming_pattern(findings: frozenset[str]) -> re.Pattern:
    """Matches lower-cased text that names one of `findings`: the label itself or a synonym the parser knows."""
    patterns = [re.escape(label) for label in findings]
    patterns += [p for label in findings for p in FINDING_SYNONYMS.get(label, ())]
    patterns += [p for labels, synonyms in COMPOUND_SYNONYMS.items() if set(labels) & findings for p in synonyms]
    return re.compile(r"(?<![\w-])(?:" + "|".join(patterns) + r")(?![\w])")


def names_unseen_finding(text: str, triples: Iterable[tuple[str, bool, str]], unseen: frozenset[str]) -> bool:
    """Whether a report phrase must stay out of the training texts because it is about an unseen finding: one of
    its labels is unseen, or its words name one (`data.unseen_findings`)."""
    return bool(unseen) and (any(label in unseen for _, _, label in triples)
                             or _naming_pattern(unseen).search(text.lower()) is not None)


# ---------------------------------------------------------------------------------------------------
# Contrastive label generation
# ---------------------------------------------------------------------------------------------------

# The positive of a region the report calls normal or does not mention.
NORMAL_REGION_TEMPLATE = "the {region} is normal"
# Template hard negatives for regions without findings: the first states that the region is abnormal, the second
# a graded finding there ({severity} is one of HARD_NEGATIVE_SEVERITIES).
HARD_NEGATIVE_TEMPLATES = ("the {region} is abnormal", "{severity} {finding} in the {region}")
HARD_NEGATIVE_SEVERITIES = SEVERITIES

# region -> [(phrase, [(category, present, label), ...]), ...], as in a scene graph's `attributes`.
RegionPhrases = dict[str, list[tuple[str, list[tuple[str, bool, str]]]]]


def normalize_text(text: str) -> str:
    """Whitespace-normalised text: the identity used to deduplicate texts across a batch."""
    return " ".join(text.split())


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for t in map(normalize_text, texts) if t))


def _unique_facts(pairs: Iterable[tuple[str, Facts]]) -> dict[str, Facts]:
    """{text: facts} of whitespace-normalised, non-empty texts in first-seen order; a repeated text's facts merged."""
    result: dict[str, Facts] = {}
    for text, facts in pairs:
        text = normalize_text(text)
        if text:
            result[text] = result[text].merge(facts) if text in result else facts
    return result


@dataclass(frozen=True)
class ImageRegionTexts:
    """Texts of one image for the region-phrase objective.

    Attributes:
        positives: [R] tuples; positives[r] are texts that describe region r of this image.
        negatives: [R] tuples; negatives[r] are explicit negatives of region r (hard negatives from
            perturbations, attribute-based and template negatives). `collate_region_texts` keeps those, and any
            other text of the batch, only where they contradict `labels[r]`.
        region_names: the R region names, in query order.
        facts: [R] mappings; facts[r][text] is what `text` states as a text about region r, for every text of
            positives[r] and negatives[r].
        labels: [R]; what this image's labels say about region r.
    """

    positives: tuple[tuple[str, ...], ...]
    negatives: tuple[tuple[str, ...], ...]
    region_names: tuple[str, ...]
    facts: tuple[Mapping[str, Facts], ...]
    labels: tuple[RegionLabels, ...]

    def __post_init__(self):
        if not (len(self.positives) == len(self.negatives) == len(self.region_names) == len(self.facts)
                == len(self.labels)):
            raise ValueError("ImageRegionTexts: positives, negatives, region_names, facts and labels must have one "
                             "entry per region")
        for name, positives, negatives, facts in zip(self.region_names, self.positives, self.negatives, self.facts):
            missing = [t for t in (*positives, *negatives) if t not in facts]
            if missing:
                raise ValueError(f"ImageRegionTexts: region {name!r} has texts without facts: {missing[:3]}")


def region_texts_for_image(
    region_phrases: RegionPhrases,
    rng: np.random.Generator,
    perturb_prob: float = 0.2,
    num_attribute_negatives: int = 3,
    num_template_negatives: int = 1,
    *,
    findings: Sequence[str],
    region_names: Sequence[str],
    prompts: RegionPrompts | None = None,
    unseen_findings: frozenset[str] = frozenset(),
) -> ImageRegionTexts:
    """Positive and explicit negative texts of every region of one image (PAPER.md, label generation).

    For each region, with `labels` its (category, present, label) triples of `FINDING_CATEGORIES`:
    - positives: every report phrase of the region; for each of its labels in `findings`, the zero-shot
      prompt that is true ("{finding} in the {region}" when present, "no {finding} in the {region}" when
      absent); and, when nothing is present there, its normal description ("the {region} is normal").
    - negatives: the opposite prompt of each such label; the normal description when something is present
      (so that text depends on the image, not only on the region); with probability `perturb_prob`, a
      meaning-changing perturbation of one sampled report phrase (`perturb_phrase`); and, when nothing is
      present, `num_attribute_negatives` prompts "{finding} in the {region}" of findings plausible there
      (`train.text.vocabulary.Region.findings`) and `num_template_negatives` template hard negatives (`HARD_NEGATIVE_TEMPLATES`).
    - facts: what each text states (`Facts`): a phrase its attributes there, graded and sided by its words; a
      prompt or template its finding (and grade) and the region's side; the normal description "nothing
      found"; a perturbation what the parser reads in it.
    - labels: the labels present there, the grades its phrases state, the region's side (`RegionLabels`).
    Texts are whitespace-normalised; a text is never both a positive and a negative of the same region.
    A phrase about one of `unseen_findings` (`names_unseen_finding`) gives no text, but its labels still count.
    Deterministic given the state of `rng` (a `numpy.random.Generator`).
    """
    prompts = prompts or default_region_prompts()
    vocabulary = set(findings)
    all_positives, all_negatives, all_facts, all_labels = [], [], [], []
    for region in region_names:
        triples_of: dict[str, list[tuple[str, bool, str]]] = {}
        for phrase, triples in region_phrases.get(region, []):
            if normalize_text(phrase):
                triples_of.setdefault(normalize_text(phrase), []).extend(triples)
        phrases = [p for p in triples_of if not names_unseen_finding(p, triples_of[p], unseen_findings)]
        labels = {(label, present) for triples in triples_of.values() for category, present, label in triples
                  if category in FINDING_CATEGORIES}
        present = sorted({label for label, is_present in labels if is_present})
        absent = sorted({label for label, is_present in labels if not is_present} - set(present))

        positives = [(phrase, _phrase_facts(phrase, tuple(map(tuple, triples_of[phrase])))) for phrase in phrases]
        negatives = []
        for label in (f for f in present if f in vocabulary):
            positives.append((prompts.render(label, region), _prompt_facts(label, True, region)))
            negatives.append((prompts.render(label, region, negated=True), _prompt_facts(label, False, region)))
        for label in (f for f in absent if f in vocabulary):
            positives.append((prompts.render(label, region, negated=True), _prompt_facts(label, False, region)))
            negatives.append((prompts.render(label, region), _prompt_facts(label, True, region)))
        if phrases and rng.random() < perturb_prob:
            perturbed = perturb_phrase(phrases[rng.integers(len(phrases))], rng)
            if perturbed is not None:
                text = normalize_text(perturbed.text)
                negatives.append((text, _perturbation_facts(text)))
        normal = (NORMAL_REGION_TEMPLATE.format(region=region), _summary_facts(region, normal=True))
        if present:  # "the <region> is normal" is false here: without this negative it would be always true
            negatives.append(normal)
        else:
            positives.append(normal)
            candidates = [f for f in plausible_findings(region) if f in vocabulary and f not in absent]
            count = min(num_attribute_negatives, len(candidates))
            for index in rng.choice(len(candidates), size=count, replace=False) if count else ():
                label = candidates[index]
                negatives.append((prompts.render(label, region), _prompt_facts(label, True, region)))
            plausible = [f for f in plausible_findings(region) if f in vocabulary]
            for _ in range(num_template_negatives):
                template = HARD_NEGATIVE_TEMPLATES[rng.integers(len(HARD_NEGATIVE_TEMPLATES))]
                if "{finding}" in template and not plausible:
                    template = HARD_NEGATIVE_TEMPLATES[0]
                finding = plausible[rng.integers(len(plausible))] if plausible else ""
                severity = HARD_NEGATIVE_SEVERITIES[rng.integers(len(HARD_NEGATIVE_SEVERITIES))]
                negatives.append((
                    template.format(region=region, finding=finding, severity=severity),
                    _prompt_facts(finding, True, region, severity) if "{finding}" in template
                    else _summary_facts(region, normal=False),
                ))
        positive_facts = _unique_facts(positives)
        negative_facts = {t: f for t, f in _unique_facts(negatives).items() if t not in positive_facts}
        all_positives.append(tuple(positive_facts))
        all_negatives.append(tuple(negative_facts))
        all_facts.append({**positive_facts, **negative_facts})
        grades = frozenset().union(*map(_grades, phrases))
        all_labels.append(RegionLabels(frozenset(present), grades, _region_side(region)))
    return ImageRegionTexts(tuple(all_positives), tuple(all_negatives), tuple(region_names), tuple(all_facts),
                            tuple(all_labels))


def possible_region_texts(
    region_phrases: RegionPhrases,
    findings: Sequence[str],
    region_names: Sequence[str],
    prompts: RegionPrompts | None = None,
    unseen_findings: frozenset[str] = frozenset(),
) -> set[str]:
    """Every text `region_texts_for_image` can produce for an image with these phrases, whatever the rng.

    The text-embedding cache embeds this set (over a data set) once, so training never runs the text tower:
    the report phrases and their meaning-changing rewrites, both prompts of every finding in every region,
    the normal descriptions and the template hard negatives. Each distinct phrase is rewritten once, so
    `perturb.SKIPPED` counts distinct phrases here.
    """
    prompts = prompts or default_region_prompts()
    texts, rewritten = set(), set()
    for entries in region_phrases.values():
        for phrase, triples in entries:
            # A data set's phrases repeat (the cache gets all of its regions at once): each is rewritten once.
            if phrase in rewritten or names_unseen_finding(phrase, triples, unseen_findings):
                continue
            rewritten.add(phrase)
            texts.add(phrase)
            texts.update(candidate for perturb in PERTURBERS.values() if (candidate := perturb(phrase)))
    for region in region_names:
        texts.add(NORMAL_REGION_TEMPLATE.format(region=region))
        for finding in findings:
            texts.update((prompts.render(finding, region), prompts.render(finding, region, negated=True)))
        plausible = [f for f in plausible_findings(region) if f in set(findings)] or [""]
        for template in HARD_NEGATIVE_TEMPLATES:
            for finding in plausible:
                for severity in HARD_NEGATIVE_SEVERITIES:
                    texts.add(template.format(region=region, finding=finding, severity=severity))
    return {normalize_text(t) for t in texts}


@dataclass
class RegionTextSupervision:
    """A batch's fine-grained supervision in compact form: what crosses from the data loader to the device.

    The dense masks are [B, R, T] bools (at batch 256 with about 5,000 texts, 37 MB each); these arrays are a few
    hundred kB, and `region_text_masks` builds the masks from them on the device. The negatives are a function of
    (what a text claims, the labels of the region): `claims[c, l]` says whether claim c contradicts label set l.
    """

    texts: list[str]          # T unique texts
    positive: np.ndarray      # [N, 3] int64 (image, region, text): the positives
    label_id: np.ndarray      # [B, R] int64: the label set of each region of each image (a row of `claims`' columns)
    claims: np.ndarray        # [C, L] bool: claim c contradicts label set l
    text_claim: np.ndarray    # [T] int64: what text t claims, read as if it described any region
    region_claim: np.ndarray  # [P, 3] int64 (region, text, claim): what a text claims at a region it was recorded at

    def tensors(self) -> dict:
        """The arrays as tensors: the keyword arguments of `region_text_masks` (texts stay with the caller)."""
        import torch

        return {"positive": torch.from_numpy(self.positive), "label_id": torch.from_numpy(self.label_id),
                "claims": torch.from_numpy(self.claims), "text_claim": torch.from_numpy(self.text_claim),
                "region_claim": torch.from_numpy(self.region_claim)}


def region_text_masks(positive, label_id, claims, text_claim, region_claim):
    """The positive and negative masks `[B, R, T]` (bool tensors, on the inputs' device) of a
    `RegionTextSupervision`'s `tensors()`: rules 1-4 of `region_text_supervision`, applied with gathers."""
    import torch

    negative = claims[text_claim][:, label_id].permute(1, 2, 0).contiguous()  # [B, R, T]: as if t described r
    if len(region_claim):
        region, text, claim = region_claim.unbind(1)
        negative[:, region, text] = claims[claim[None, :], label_id[:, region]]  # [B, P]
    positive_mask = torch.zeros_like(negative)
    positive_mask[positive[:, 0], positive[:, 1], positive[:, 2]] = True
    return positive_mask, negative & ~positive_mask


def region_text_supervision(items: Sequence[ImageRegionTexts]) -> RegionTextSupervision:
    """Deduplicate a batch's texts and decide the positives and negatives of the fine-grained InfoNCE.

    A text t contradicts region r of image b when, with F what t states about r and L = `items[b].labels[r]`:
      1. F claims a finding present that L does not have, or absent that L has present;
      2. F grades a finding that L grades, with a grade L never gives it ("large effusion" vs "small effusion");
      3. F says "normal" and L has something present, or "abnormal" and L has nothing present; or
      4. F names one side and r is a lateral region of the other side.
    F is the merged facts of t recorded at region r by any image of the batch (a phrase attached to r, a prompt
    about r, a perturbation of r's phrase); for a text recorded only at other regions, its facts merged over
    those regions (read as if it described r). Being about another region is not by itself a contradiction:
    Chest ImaGenome's regions overlap (a lung holds its zones, the mediastinum the cardiac silhouette) and a
    sentence about one is often true of another ("The lungs are clear." of every normal lung zone). Sides do
    not overlap, so a text that names only the left side contradicts every right-side region (rule 4), and
    laterality-swapped perturbations stay hard negatives. A text that says nothing about r (no claim L decides)
    is neither positive nor negative there.

    Returns the `RegionTextSupervision` of the batch: its unique texts (T, in first-seen order; identity after
    whitespace normalisation) and the decisions in compact form. `region_text_masks` expands them into
    positive [B, R, T] (text t describes region r of image b) and negative [B, R, T] (text t contradicts region r
    of image b: explicit negatives and every other text of the batch alike; never where positive is True).
    """
    if not items:
        raise ValueError("region_text_supervision: empty batch")
    num_regions = len(items[0].region_names)
    if any(len(item.region_names) != num_regions for item in items):
        raise ValueError("region_text_supervision: all images must have the same regions")
    index: dict[str, int] = {}
    recorded: dict[tuple[int, int], Facts] = {}  # (text, region) -> what the text states there, over all images
    label_index: dict[RegionLabels, int] = {}
    label_id = np.empty((len(items), num_regions), dtype=np.int64)  # [B, R]
    where_positive: list[tuple[int, int, int]] = []
    for b, item in enumerate(items):
        for r in range(num_regions):
            facts = item.facts[r]
            for is_positive, texts in ((True, item.positives[r]), (False, item.negatives[r])):
                for text in texts:
                    t = index.setdefault(normalize_text(text), len(index))
                    before = recorded.get((t, r))
                    recorded[t, r] = facts[text] if before is None else before.merge(facts[text])
                    if is_positive:
                        where_positive.append((b, r, t))
            label_id[b, r] = label_index.setdefault(item.labels[r], len(label_index))
    anywhere: dict[int, Facts] = {}  # text -> its facts merged over every region it is recorded at
    for (t, _), facts in recorded.items():
        anywhere[t] = anywhere[t].merge(facts) if t in anywhere else facts
    claim_index: dict[Facts, int] = {}
    anywhere_id = np.array([claim_index.setdefault(anywhere[t], len(claim_index)) for t in range(len(index))])  # [T]
    pairs = [(t, r, claim_index.setdefault(facts, len(claim_index))) for (t, r), facts in recorded.items()]
    table = _contradiction_table(list(claim_index), list(label_index))  # [C, L]
    pair_t, pair_r, pair_claim = np.array(pairs).T  # texts recorded at r say what they state there...
    differs = pair_claim != anywhere_id[pair_t]  # ...which only needs recording where it is not what they state anywhere
    return RegionTextSupervision(
        texts=list(index), positive=np.array(where_positive, dtype=np.int64).reshape(-1, 3), label_id=label_id,
        claims=table, text_claim=anywhere_id.astype(np.int64),
        region_claim=np.stack([pair_r[differs], pair_t[differs], pair_claim[differs]], axis=1).astype(np.int64))


def collate_region_texts(items: Sequence[ImageRegionTexts]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, positive [B, R, T], negative [B, R, T]) of `region_text_supervision`, as numpy arrays."""
    supervision = region_text_supervision(items)
    positive, negative = region_text_masks(**supervision.tensors())
    return supervision.texts, positive.numpy(), negative.numpy()


# ---------------------------------------------------------------------------------------------------
# Inputs: scene graphs and parsed reports
# ---------------------------------------------------------------------------------------------------


def scene_graph_region_phrases(scene_graph: dict, region_names: Sequence[str]) -> RegionPhrases:
    """Read a Chest ImaGenome scene graph's `attributes` into {region: [(phrase, [(category, present, label)])]}.

    Attribute strings are "category|yes|label" / "category|no|label"; regions outside `region_names`
    (the 7 boxes the model ignores) are dropped.
    """
    wanted, result = set(region_names), {}
    for entry in scene_graph.get("attributes", []):
        region = entry.get("bbox_name")
        if region not in wanted:
            continue
        for phrase, attributes in zip(entry.get("phrases", []), entry.get("attributes", [])):
            triples = []
            for attribute in attributes:
                category, answer, label = attribute.split("|", 2)
                triples.append((category, answer == "yes", label))
            result.setdefault(region, []).append((phrase, triples))
    return result


def mentions_to_region_phrases(mentions: Iterable[Mention]) -> RegionPhrases:
    """Group `parse_report` output like a scene graph: {region: [(phrase, [(category, present, label)])]}.

    Mentions without a region are dropped (they belong to no region); uncertain mentions count as
    present, as in Chest ImaGenome.
    """
    grouped: dict[str, dict[str, list[tuple[str, bool, str]]]] = {}
    for mention in mentions:
        if mention.region is None:
            continue
        triples = grouped.setdefault(mention.region, {}).setdefault(mention.phrase, [])
        triple = (mention.category, mention.present, mention.finding)
        if triple not in triples:
            triples.append(triple)
    return {region: list(phrases.items()) for region, phrases in grouped.items()}

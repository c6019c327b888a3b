"""Radiology-report parsing and contrastive label generation for Anatomy-VLM's region-phrase objective.

Two halves:

1. ``parse_report(text) -> list[Mention]``: a self-contained, rule-based ConText-style parser.
   A report is split into sections (history/indication/comparison/technique are skipped), sentences
   and clauses; finding terms are matched from one synonym table (`FINDING_SYNONYMS`, longest match
   wins); ConText triggers (negation, uncertainty, pseudo-triggers, scope terminators) with a
   direction (``pre``: scope runs forward, ``post``: scope runs backward) decide ``present`` and
   ``uncertain``; laterality and zone words in the finding's chunk decide its region through one
   table of default region rules (`REGION_RULES`).

2. Label generation (PAPER.md, "Contrastive label generation"): for every image and every one of the
   29 regions, the positive texts (report phrases or the region's normal description), explicit
   negatives (meaning-changing perturbations of a positive, attribute-based prompts, template hard
   negatives), and `collate_region_texts`, which deduplicates texts across a batch and builds the
   positive / negative masks with in-batch negatives across regions.

Why rule-based: the parser runs inside the data pipeline over hundreds of thousands of reports and its
behaviour must be inspectable and testable; medspaCy/negspacy implement the same ConText algorithm
but would add spaCy as a training dependency while still needing this project's finding and region
tables. `train/eval_report_parser.py` measures it on a hand-labelled sentence set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS, DEFAULT_FINDINGS

# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------

# Chest ImaGenome category of every label the parser can emit (scene graphs store "category|yes|label").
FINDING_CATEGORY = {
    "lung opacity": "anatomicalfinding",
    "consolidation": "anatomicalfinding",
    "atelectasis": "anatomicalfinding",
    "pleural effusion": "anatomicalfinding",
    "costophrenic angle blunting": "anatomicalfinding",
    "pneumothorax": "anatomicalfinding",
    "pulmonary edema/hazy opacity": "anatomicalfinding",
    "vascular congestion": "anatomicalfinding",
    "enlarged cardiac silhouette": "anatomicalfinding",
    "mass/nodule (not otherwise specified)": "anatomicalfinding",
    "calcified nodule": "anatomicalfinding",
    "granulomatous disease": "disease",
    "pneumonia": "disease",
    "copd/emphysema": "disease",
    "hyperaeration": "anatomicalfinding",
    "low lung volumes": "technicalassessment",
    "elevated hemidiaphragm": "anatomicalfinding",
    "hernia": "anatomicalfinding",
    "scoliosis": "anatomicalfinding",
    "spinal degenerative changes": "anatomicalfinding",
    "tortuous aorta": "anatomicalfinding",
    "rib fracture": "anatomicalfinding",
    "clavicle fracture": "anatomicalfinding",
    "spinal fracture": "anatomicalfinding",
    "endotracheal tube": "tubesandlines",
    "enteric tube": "tubesandlines",
}

_HEART = r"(?:heart|cardiac|cardiomediastinal)(?:\s+(?:size|silhouette|contours?|shadow))?"
_COPULA = r"(?:\s+(?:is|are|appears?|remains?|was|seems?))?"
_SIDE_WORD = r"(?:\s+(?:right|left|bilateral))?"

# One table of synonyms: label -> regular expressions over the lower-cased sentence (word boundaries
# are added around each). A label of None marks a *blocker*: a term that contains a finding word but
# is not that finding ("pericardial effusion" is not a pleural effusion); blockers win by being longer.
# Findings described as normal ("heart size is normal") are in `NORMAL_STATEMENTS` below.
FINDING_SYNONYMS: dict[str | None, tuple[str, ...]] = {
    "lung opacity": (
        r"opacit(?:y|ies)", r"opacification", r"infiltrat(?:e|es|ion)", r"airspace (?:disease|process|opacit(?:y|ies))",
        r"air-space (?:disease|process)", r"densit(?:y|ies)",
    ),
    "consolidation": (r"consolidat(?:ion|ions|ive (?:opacit(?:y|ies)|process|changes?))",),
    "atelectasis": (r"atelecta(?:sis|ses|tic changes?)", r"collapse of the (?:\w+\s+){0,2}lobe"),
    "pleural effusion": (r"(?:pleural )?effusions?", r"pleural fluid", r"hydrothorax"),
    "costophrenic angle blunting": (
        r"blunt(?:ing|ed)(?: of)?(?: the)?" + _SIDE_WORD + r"\s+(?:costophrenic|cp) (?:angles?|sulc(?:us|i))",
        r"(?:costophrenic|cp) (?:angles?|sulc(?:us|i))(?:\s+\w+){0,2}?\s+(?:is|are|remains?)\s+(?:\w+\s+)?blunted",
    ),
    "pneumothorax": (r"pneumothora(?:x|ces)", r"ptx"),
    "pulmonary edema/hazy opacity": (
        r"(?:pulmonary |interstitial |alveolar |perihilar )?edema", r"hazy opacit(?:y|ies)", r"haziness",
    ),
    "vascular congestion": (r"(?:pulmonary )?(?:vascular|venous) (?:congestion|engorgement)", r"congestion"),
    "enlarged cardiac silhouette": (
        r"cardiomegaly",
        r"enlarge(?:d|ment of)(?: the)? (?:heart|cardiac silhouette|cardiac shadow)",
        _HEART + _COPULA + r"(?:\s+not)?(?:\s+\w+ly)?\s+(?:enlarged|large)",
    ),
    "mass/nodule (not otherwise specified)": (r"nodules?", r"nodular opacit(?:y|ies)", r"mass(?:es)?"),
    "calcified nodule": (r"calcified (?:nodules?|granulom(?:a|as|ata))", r"granulom(?:a|as|ata)"),
    "granulomatous disease": (r"(?:prior |old )?granulomatous (?:disease|infection|exposure|process|changes?)",),
    "pneumonia": (r"(?:broncho)?pneumonias?", r"infection", r"infectious process"),
    "copd/emphysema": (r"emphysema(?:tous(?: changes?)?)?", r"copd", r"chronic obstructive (?:pulmonary|lung) disease"),
    "hyperaeration": (r"hyper-?(?:inflat(?:ed|ion)|expan(?:ded|sion)|aerat(?:ed|ion))", r"over-?inflat(?:ed|ion)"),
    "low lung volumes": (
        r"low(?: lung| inspiratory)? volumes?", r"lung volumes?" + _COPULA + r"(?:\s+\w+)?\s+low", r"hypoinflat(?:ed|ion)",
    ),
    "elevated hemidiaphragm": (
        r"elevat(?:ed|ion)(?: of)?(?: the)?" + _SIDE_WORD + r"\s+hemi-?diaphragms?",
        r"hemi-?diaphragms?" + _COPULA + r"(?:\s+\w+)?\s+elevated",
    ),
    "hernia": (r"(?:hiatal |hiatus |diaphragmatic )?hernia",),
    "scoliosis": (r"(?:dextro|levo)?scoliosis", r"scoliotic curvature", r"(?:dextro|levo)-?convex(?:\s+\w+){0,2}?\s+curvature"),
    "spinal degenerative changes": (
        r"degenerative (?:changes?|disease|disc disease|joint disease)", r"spondylo(?:sis|tic changes?)", r"osteophytes?",
    ),
    "tortuous aorta": (
        r"tortuo(?:us|sity)(?: of)?(?: the)?(?:\s+(?:thoracic|descending|ascending))?\s+aorta",
        r"aort(?:a|ic)(?:\s+(?:arch|knob))?(?:\s+\w+){0,3}?\s+tortuo(?:us|sity)",
    ),
    "rib fracture": (r"rib fractures?", r"fractures? of the (?:\w+\s+){0,5}ribs?", r"fractured (?:\w+\s+){0,2}ribs?"),
    "clavicle fracture": (
        r"clavic(?:le|ular) fractures?", r"fractures? of the (?:\w+\s+){0,2}clavicles?", r"fractured (?:\w+\s+)?clavicles?",
    ),
    "spinal fracture": (
        r"(?:vertebral |spinal |burst )?compression (?:fractures?|deformit(?:y|ies))", r"(?:vertebral|spinal) fractures?",
        r"fractures? of (?:a|the) (?:\w+\s+){0,3}vertebra(?:e|l bod(?:y|ies))?",
    ),
    "endotracheal tube": (r"endotracheal tubes?", r"et tubes?", r"ett"),
    "enteric tube": (
        r"(?:ng|og|nasogastric|orogastric|enteric|feeding|nasoenteric|nasojejunal|gastric) tubes?",
        r"dobb?hoff(?: feeding)?(?: tubes?)?",
    ),
    None: (
        r"pericardial effusions?", r"chest tubes?", r"mass effect", r"soft tissue (?:edema|mass|densit(?:y|ies))",
        r"degenerative (?:changes?|disease) (?:of|in|at) the (?:\w+\s+)?(?:shoulders?|ac joints?|acromioclavicular joints?)",
    ),
}

# Statements that a finding is absent without a negation word: they yield the label with present=False.
NORMAL_STATEMENTS: dict[str, tuple[str, ...]] = {
    "enlarged cardiac silhouette": (
        _HEART + _COPULA + r"(?:\s+at)?(?:\s+the)?(?:\s+(?:top|upper|high|low))?(?:\s+|-)"
        r"(?:normal|within normal limits|unremarkable|upper limits? of normal)",
        r"normal (?:heart|cardiac|cardiomediastinal)(?:\s+(?:size|silhouette|contours?))?",
    ),
}

# ---------------------------------------------------------------------------------------------------
# Default region of every finding (the single table of region choices)
# ---------------------------------------------------------------------------------------------------

LOCATED = "located"  # rule: placed by the zone and side words of its chunk (see `_regions_for`)

# finding -> rule. A rule is one of:
#   LOCATED        zone + side -> "{side} {zone}"; zone without side -> both sides (e.g. "perihilar" ->
#                  right and left hilar structures; "bibasilar" -> both lower zones); side without zone
#                  ("right-sided", "right lung", "bilateral") -> "{side} lung"; neither -> None
#                  (e.g. "no pneumothorax", "pulmonary edema", "the lungs are hyperinflated").
#   "{side} X"     one mention per side named in the chunk; None when no side is named.
#   a region name  always that region.
#   None           never located (a whole-chest/technical finding).
REGION_RULES: dict[str, str | None] = {
    "lung opacity": LOCATED,
    "consolidation": LOCATED,
    "atelectasis": LOCATED,
    "pneumothorax": LOCATED,  # "right apical pneumothorax" -> right apical zone; "left pneumothorax" -> left lung
    "pulmonary edema/hazy opacity": LOCATED,
    "vascular congestion": LOCATED,
    "mass/nodule (not otherwise specified)": LOCATED,
    "calcified nodule": LOCATED,
    "granulomatous disease": LOCATED,
    "pneumonia": LOCATED,
    "copd/emphysema": LOCATED,
    "hyperaeration": LOCATED,
    "pleural effusion": "{side} costophrenic angle",  # fluid layers in the costophrenic angle
    "costophrenic angle blunting": "{side} costophrenic angle",
    "elevated hemidiaphragm": "{side} hemidiaphragm",
    "clavicle fracture": "{side} clavicle",
    "rib fracture": "{side} lung",  # ribs are not a region; the lung they overlie is
    "enlarged cardiac silhouette": "cardiac silhouette",
    "hernia": "mediastinum",  # hiatal hernias project over the (retrocardiac) mediastinum
    "scoliosis": "spine",
    "spinal degenerative changes": "spine",
    "spinal fracture": "spine",
    "tortuous aorta": "aortic arch",
    "endotracheal tube": "trachea",
    "enteric tube": "abdomen",  # its tip (the part a report positions) lies in the stomach/duodenum
    "low lung volumes": None,
}

_COORDINATED_ZONE = r"(?=\s+(?:and|to|through)\s+(?:upper|mid|middle|lower)\s+(?:lobes?|lungs?|(?:lung\s+)?zones?|lung fields?))"

# Zone words: (pattern, zone suffix of a region name, side implied by the word or None).
ZONE_TERMS: tuple[tuple[str, str, str | None], ...] = (
    (r"lingula(?:r)?", "mid lung zone", "left"),
    (r"retrocardiac", "lower lung zone", "left"),
    (r"rul", "upper lung zone", "right"),
    (r"rml", "mid lung zone", "right"),
    (r"rll", "lower lung zone", "right"),
    (r"lul", "upper lung zone", "left"),
    (r"lll", "lower lung zone", "left"),
    (r"(?:bi)?apical|apex|apices", "apical zone", None),
    # the first of two coordinated zones: "mid and lower lung zones", "upper to mid lungs"
    (r"upper" + _COORDINATED_ZONE, "upper lung zone", None),
    (r"mid(?:dle)?" + _COORDINATED_ZONE, "mid lung zone", None),
    (r"lower" + _COORDINATED_ZONE, "lower lung zone", None),
    (r"upper (?:lobes?|lungs?|(?:lung )?zones?|lung fields?)", "upper lung zone", None),
    (r"(?:middle lobe|mid(?:dle)?[- ]?lungs?(?: zones?| fields?)?|mid[- ]zones?)", "mid lung zone", None),
    (r"lower (?:lobes?|lungs?|(?:lung )?zones?|lung fields?)|bases?|(?:bi)?basilar|(?:bi)?basal", "lower lung zone", None),
    (r"(?:peri|infra|supra)?hil(?:ar|um|a|us)", "hilar structures", None),
    (r"(?:costophrenic|cp) (?:angles?|sulc(?:us|i))", "costophrenic angle", None),
    (r"lungs?|hemithora(?:x|ces)", "lung", None),
)

_SIDE_TERMS = (
    (r"right", ("right",)),
    (r"left", ("left",)),
    (r"bilateral(?:ly)?|both|bibasilar|bibasal|biapical", ("right", "left")),
)

# Severity words (for Mention.severity and the severity-swap perturbation).
SEVERITY_WORDS = {
    "mild": "mild", "mildly": "mild", "minimal": "mild", "minimally": "mild", "small": "mild", "trace": "mild",
    "tiny": "mild", "slight": "mild", "slightly": "mild", "subtle": "mild",
    "moderate": "moderate", "moderately": "moderate",
    "severe": "severe", "severely": "severe", "large": "severe", "marked": "severe", "markedly": "severe",
    "extensive": "severe", "massive": "severe", "substantial": "severe",
}

# ---------------------------------------------------------------------------------------------------
# ConText triggers
# ---------------------------------------------------------------------------------------------------

NEGATED, UNCERTAIN, PSEUDO, TERMINATE = "negated", "uncertain", "pseudo", "terminate"
PRE, POST, BOTH = "pre", "post", "both"

# (pattern, kind, direction). PSEUDO triggers contain a trigger word but are not triggers ("no change in");
# they only block. TERMINATE ends the scope of every trigger. Overlaps are resolved longest first.
CONTEXT_TRIGGERS: tuple[tuple[str, str, str], ...] = (
    # negation, scope forward
    (r"no", NEGATED, PRE),
    (r"not", NEGATED, PRE),
    (r"without", NEGATED, PRE),
    (r"negative for", NEGATED, PRE),
    (r"free of", NEGATED, PRE),
    (r"clear of", NEGATED, PRE),
    (r"absence of", NEGATED, PRE),
    (r"(?:interval )?resolution of", NEGATED, PRE),
    (r"(?:interval )?removal of", NEGATED, PRE),
    (r"rules? out", NEGATED, PRE),
    # negation, scope backward
    (r"(?:is|are|was|were)?\s*not (?:seen|identified|visualized|appreciated|demonstrated|present|evident|detected)",
     NEGATED, POST),
    (r"(?:has|have)?\s*(?:completely )?resolved", NEGATED, POST),
    (r"(?:is|are)? ?absent", NEGATED, POST),
    (r"(?:has|have)? ?been removed|(?:was|were) removed", NEGATED, POST),
    (r"(?:is|are)? ?no longer (?:seen|present|visualized|identified|evident)", NEGATED, POST),
    # uncertainty, scope forward
    (r"possibl[ey]|probabl[ey]|likely|questionable|question of|presumed|suspected|equivocal", UNCERTAIN, PRE),
    (r"may (?:represent|reflect|be|indicate)|could (?:represent|reflect|be|indicate)|might (?:represent|be)",
     UNCERTAIN, PRE),
    (r"suggestive of|suggests?|suggesting|concerning for|concern for|worrisome for|suspicious for|cannot exclude"
     r"|can't exclude|differential (?:diagnosis )?includes", UNCERTAIN, PRE),
    # uncertainty, both directions ("atelectasis versus pneumonia")
    (r"versus|vs\.?|or less likely", UNCERTAIN, BOTH),
    # uncertainty, scope backward
    (r"(?:cannot|can not|could not|not) be (?:excluded|ruled out)|(?:is|are)? ?not (?:excluded|ruled out)"
     r"|(?:is|are)? ?difficult to exclude|(?:is|are) (?:possible|suspected|likely)", UNCERTAIN, POST),
    # pseudo-triggers: contain "no"/"not" but negate nothing
    (r"no (?:significant |interval |appreciable |substantial )?(?:change|increase|decrease|worsening)"
     r"|not (?:significantly )?changed|without (?:significant |interval )?change|not only|no longer (?:requires?|needed)",
     PSEUDO, BOTH),
    # scope terminators
    (r"but|however|although|though|aside from|apart from|except|whereas|while|otherwise|nevertheless|which"
     r"|and (?:the|there)", TERMINATE, BOTH),
    (";", TERMINATE, BOTH),
)

# Words that open an interpretive apposition ("opacity, likely atelectasis") or an adjacency phrase
# ("effusion with adjacent atelectasis"): a chunk starting with them inherits the previous chunk's location.
_INHERIT_OPENERS = re.compile(
    r"^(?:likely|probably|possibly|possible|which|may|could|might|concerning|suggest\w*|suspicious|worrisome"
    r"|consistent|compatible|representing|reflecting|due|adjacent|associated|compressive|subjacent|overlying|adjoining)\b"
)
_ADJACENCY_OPENERS = re.compile(r"^(?:adjacent|associated|compressive|subjacent|overlying|adjoining)\b")
_CONNECTORS = re.compile(r"^(?:and|with|without|or|but|which|as well as|plus)\s+")
# Chunk (location) boundaries inside a clause.
# ("mid and lower zones" and "consistent with" are not boundaries.)
_CHUNK_BOUNDARY = re.compile(
    r",|:|(?<!upper )(?<!mid )(?<!middle )(?<!lower )\band\b|(?<!consistent )(?<!compatible )\bwith\b"
    r"|\bwithout\b|\bwhich\b|\bas well as\b|\bplus\b"
)

# Section headers. Sections in SKIPPED_SECTIONS hold the question or the history, not findings.
_SECTION_HEADER = re.compile(
    r"\b(findings|impression|conclusions?|indications?|history|clinical history|clinical information|reason for "
    r"(?:exam(?:ination)?|study)|comparisons?|technique|examination|exam|procedure|notification|recommendations?"
    r"|wet read|final report|addendum)\s*:",
    re.IGNORECASE,
)
SKIPPED_SECTIONS = frozenset({
    "indication", "indications", "history", "clinical history", "clinical information", "reason for exam",
    "reason for examination", "reason for study", "comparison", "comparisons", "technique", "examination", "exam",
    "procedure", "notification", "recommendation", "recommendations",
})


def _compile(patterns: Iterable[str]) -> re.Pattern:
    return re.compile(r"(?<![\w-])(?:" + "|".join(patterns) + r")(?![\w])")


_FINDING_PATTERNS = [(label, _compile(p)) for label, p in FINDING_SYNONYMS.items()]
_NORMAL_PATTERNS = [(label, _compile(p)) for label, p in NORMAL_STATEMENTS.items()]
_TRIGGER_PATTERNS = [(re.compile(p) if p == ";" else _compile([p]), kind, direction) for p, kind, direction in CONTEXT_TRIGGERS]
_ZONE_PATTERNS = [(_compile([p]), zone, side) for p, zone, side in ZONE_TERMS]
_SIDE_PATTERNS = [(re.compile(r"\b(?:" + p + r")\b"), sides) for p, sides in _SIDE_TERMS]
_ZONE_ORDER = tuple(dict.fromkeys(zone for _, zone, _ in ZONE_TERMS))
_SEVERITY_PATTERN = re.compile(r"\b(" + "|".join(SEVERITY_WORDS) + r")\b")

# ---------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """One finding stated by a report, at one region.

    Attributes:
        finding: Chest ImaGenome label string (a key of `FINDING_CATEGORY`).
        region: one of `ANATOMICAL_REGIONS`, or None when the text gives no location.
        present: False when the finding is negated ("no X", "X has resolved", "heart size is normal").
        uncertain: True for hedged findings ("possible X", "X cannot be excluded"); they stay present=True.
        severity: "mild" / "moderate" / "severe" from the words next to the finding, or None.
        phrase: the clause that states it (sentence split at ";" / "but" / "however" ...), as written.
        sentence: the whole sentence.
        section: lower-cased section header ("findings", "impression", ...) or None.
    """

    finding: str
    region: str | None
    present: bool
    uncertain: bool = False
    severity: str | None = None
    phrase: str = ""
    sentence: str = ""
    section: str | None = None

    @property
    def category(self) -> str:
        return FINDING_CATEGORY[self.finding]


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    label: str | None  # finding label / trigger kind
    direction: str = ""
    absent: bool = False  # a NORMAL_STATEMENTS match


def _lower(text: str) -> str:
    """Lower-case without changing string length, so offsets stay valid."""
    return "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)


def _longest_non_overlapping(spans: list[_Span]) -> list[_Span]:
    chosen: list[_Span] = []
    for span in sorted(spans, key=lambda s: (-(s.end - s.start), s.start)):
        if all(span.end <= c.start or span.start >= c.end for c in chosen):
            chosen.append(span)
    return sorted(chosen, key=lambda s: s.start)


def _find_findings(low: str) -> list[_Span]:
    spans = [_Span(m.start(), m.end(), label) for label, pattern in _FINDING_PATTERNS for m in pattern.finditer(low)]
    spans += [_Span(m.start(), m.end(), label, absent=True) for label, pattern in _NORMAL_PATTERNS for m in pattern.finditer(low)]
    return [s for s in _longest_non_overlapping(spans) if s.label is not None]


def _find_triggers(low: str) -> list[_Span]:
    spans = [
        _Span(m.start(), m.end(), kind, direction)
        for pattern, kind, direction in _TRIGGER_PATTERNS
        for m in pattern.finditer(low)
    ]
    return _longest_non_overlapping(spans)


def split_sections(report: str) -> list[tuple[str | None, str]]:
    """Split a report into (lower-cased header or None, body) pairs, in order."""
    sections, header, position = [], None, 0
    for match in _SECTION_HEADER.finditer(report):
        sections.append((header, report[position:match.start()]))
        header, position = " ".join(match.group(1).lower().split()), match.end()
    sections.append((header, report[position:]))
    return [(h, body) for h, body in sections if body.strip()]


_SENTENCE_END = re.compile(
    r"(?<=[.!?])(?<!\bvs\.)(?<!\bdr\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!approx\.)\s+|\n\s*\n|(?:^|(?<=\s))\d{1,2}[.)]\s+(?=[A-Za-z])",
    re.IGNORECASE,
)


def split_sentences(text: str) -> list[str]:
    """Sentences of a section body: split at ". ", blank lines and list numbers ("1. "); single newlines
    are line wraps (MIMIC-CXR reports are hard-wrapped) and become spaces."""
    sentences = []
    for part in _SENTENCE_END.split(text):
        part = " ".join(part.split()).strip(" .")
        if part and re.search(r"[A-Za-z]", part):
            sentences.append(part)
    return sentences


def _split_clauses(low: str, triggers: list[_Span]) -> list[tuple[int, int]]:
    """Clause boundaries: the scope terminators (";", "but", "however", ...)."""
    bounds, start = [], 0
    for t in triggers:
        if t.label == TERMINATE:
            bounds.append((start, t.start))
            start = t.end if low[t.start:t.end] in (";", "but", "however", "although", "though", "whereas") else t.start
    bounds.append((start, len(low)))
    return [(s, e) for s, e in bounds if low[s:e].strip(" ,.")]


def _chunks(low: str, start: int, end: int) -> list[tuple[int, int]]:
    cuts = [start] + [m.start() for m in _CHUNK_BOUNDARY.finditer(low, start, end)] + [end]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _location(text: str) -> tuple[set[str], set[str], set[str]]:
    """(sides named, zones named, sides implied by zone words) of a chunk."""
    sides, zones, implied = set(), set(), set()
    for pattern, side_names in _SIDE_PATTERNS:
        if pattern.search(text):
            sides.update(side_names)
    for pattern, zone, side in _ZONE_PATTERNS:
        for _ in pattern.finditer(text):
            zones.add(zone)
            if side:
                implied.add(side)
    return sides, zones, implied


def _regions_for(finding: str, sides: set[str], zones: set[str]) -> list[str | None]:
    """Apply `REGION_RULES` to a finding whose chunk names `sides` and `zones`."""
    rule = REGION_RULES[finding]
    ordered_sides = [s for s in ("right", "left") if s in sides]
    if rule is None:
        return [None]
    if rule == LOCATED:
        specific = [zone for zone in _ZONE_ORDER if zone in zones and zone != "lung"]
        if specific:
            return [f"{side} {zone}" for side in (ordered_sides or ["right", "left"]) for zone in specific]
        return [f"{side} lung" for side in ordered_sides] or [None]
    if "{side}" in rule:
        return [rule.format(side=side) for side in ordered_sides] or [None]
    return [rule]


def _severity(low: str, chunk: tuple[int, int], finding: _Span) -> str | None:
    """Nearest severity word before the finding in its chunk, else the first one after it."""
    before = list(_SEVERITY_PATTERN.finditer(low, chunk[0], finding.start))
    if before:
        return SEVERITY_WORDS[before[-1].group(1)]
    inside = _SEVERITY_PATTERN.search(low, finding.start, chunk[1])
    return SEVERITY_WORDS[inside.group(1)] if inside else None


def _context(low: str, finding: _Span, triggers: list[_Span], clause: tuple[int, int]) -> tuple[bool, bool]:
    """(negated, uncertain) of a finding from the triggers whose scope covers it (ConText).

    A PRE trigger covers from itself to the next terminator; a POST trigger from the previous terminator
    to itself; a BOTH trigger ("versus") both ways, but only within its comma-delimited chunk."""
    negated = uncertain = False
    in_clause = [t for t in triggers if clause[0] <= t.start < clause[1]]
    for t in in_clause:
        if t.label not in (NEGATED, UNCERTAIN):
            continue
        covered = False
        if t.direction in (PRE, BOTH):
            # scope: from the trigger to the next terminator/pseudo-trigger; a trigger inside a
            # predicate finding ("heart is not enlarged") covers it too.
            stops = [s.start for s in in_clause if s.start >= t.end and s.label in (TERMINATE, PSEUDO)]
            comma = low.find(",", t.end, clause[1])
            if t.direction == BOTH and comma >= 0:
                stops.append(comma)
            scope_end = min(stops, default=clause[1])
            covered = finding.end > t.start and finding.start < scope_end
        if t.direction in (POST, BOTH):
            stops = [s.end for s in in_clause if s.end <= t.start and s.label in (TERMINATE, PSEUDO)]
            if t.direction == BOTH:
                stops.append(low.rfind(",", clause[0], t.start) + 1)  # 0 when there is no comma
            scope_start = max(stops, default=clause[0])
            covered |= scope_start <= finding.start < t.end
        if covered:
            negated |= t.label == NEGATED
            uncertain |= t.label == UNCERTAIN
    return negated, uncertain


def parse_sentence(sentence: str, section: str | None = None) -> list[Mention]:
    """Mentions of one sentence (see `parse_report`)."""
    low = _lower(sentence)
    findings = _find_findings(low)
    if not findings:
        return []
    triggers = _find_triggers(low)
    mentions: list[Mention] = []
    previous_location: tuple[set[str], set[str]] | None = None  # of the last located chunk in the sentence
    for clause in _split_clauses(low, triggers):
        phrase = sentence[clause[0]:clause[1]].strip(" ,;.")
        for chunk in _chunks(low, *clause):
            chunk_text = _CONNECTORS.sub("", low[chunk[0]:chunk[1]].strip(" ,:"))
            sides, zones, implied = _location(chunk_text)
            sides = sides or implied
            chunk_findings = [(f, *_context(low, f, triggers, clause)) for f in findings if chunk[0] <= f.start < chunk[1]]
            # an unlocated interpretation of the previous located chunk shares its location: it opens with
            # an apposition/adjacency word ("..., likely atelectasis") or is only hedged ("though infection
            # is not excluded")
            interpretation = _INHERIT_OPENERS.match(chunk_text) or (
                chunk_findings and all(uncertain and not negated for _, negated, uncertain in chunk_findings))
            if not sides and not (zones - {"lung"}) and previous_location and interpretation:
                sides, zones = previous_location
                if _ADJACENCY_OPENERS.match(chunk_text) and not (zones - {"lung"}):
                    zones = zones | {"lower lung zone"}
            for finding, negated, uncertain in chunk_findings:
                for region in _regions_for(finding.label, sides, zones):
                    mentions.append(Mention(
                        finding=finding.label, region=region, present=not (negated or finding.absent),
                        uncertain=uncertain, severity=_severity(low, chunk, finding),
                        phrase=phrase, sentence=sentence, section=section,
                    ))
            if sides or zones:
                previous_location = (sides, zones)
    return list(dict.fromkeys(mentions))


def parse_report(text: str) -> list[Mention]:
    """Parse a radiology report (MIMIC-CXR free text or IU-Xray sections, `XXXX` tokens allowed).

    Sections named in `SKIPPED_SECTIONS` (indication, history, comparison, technique, ...) are ignored;
    every other section is split into sentences and each sentence into clauses. One `Mention` per
    (finding, region) stated; a finding named on both sides ("bilateral effusions") gives one mention per
    side. Normal statements that name no finding ("the lungs are clear") give no mention.
    """
    mentions: list[Mention] = []
    for section, body in split_sections(text):
        if section in SKIPPED_SECTIONS:
            continue
        for sentence in split_sentences(body):
            mentions.extend(parse_sentence(sentence, section))
    return mentions


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


_PERTURBERS = {"negation": flip_negation, "laterality": swap_laterality, "severity": swap_severity}


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
        candidate = _PERTURBERS[kinds[index]](text)
        if candidate and _meaning(candidate) != meaning:
            return Perturbation(candidate, kinds[index])
    return None


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
# Contrastive label generation
# ---------------------------------------------------------------------------------------------------

# The positive of a region the report calls normal or does not mention.
NORMAL_REGION_TEMPLATE = "the {region} is normal"
# Template hard negatives for regions without findings ({severity} is one of HARD_NEGATIVE_SEVERITIES).
HARD_NEGATIVE_TEMPLATES = ("the {region} is abnormal", "{severity} {finding} in the {region}")
HARD_NEGATIVE_SEVERITIES = ("mild", "moderate", "severe")

_LUNG_FINDINGS = (
    "lung opacity", "airspace opacity", "consolidation", "atelectasis", "pulmonary edema/hazy opacity", "pneumothorax",
    "mass/nodule (not otherwise specified)", "calcified nodule", "pneumonia", "lung lesion",
)
_LINES = ("picc", "ij line", "subclavian line", "chest port", "swan-ganz catheter")
# Findings plausible for each region (Chest ImaGenome labels; filtered by the vocabulary in use): the
# candidates of attribute-based negatives "<finding> in the <region>" for regions without findings.
REGION_FINDINGS: dict[str, tuple[str, ...]] = {
    **{f"{side} lung": _LUNG_FINDINGS + ("copd/emphysema", "hyperaeration", "rib fracture", "granulomatous disease")
       for side in ("right", "left")},
    **{f"{side} {zone}": _LUNG_FINDINGS for side in ("right", "left") for zone in ("mid lung zone", "lower lung zone")},
    **{f"{side} upper lung zone": _LUNG_FINDINGS + ("copd/emphysema", "granulomatous disease") for side in ("right", "left")},
    **{f"{side} apical zone": ("pneumothorax", "lung opacity", "mass/nodule (not otherwise specified)", "calcified nodule",
                               "copd/emphysema", "granulomatous disease") for side in ("right", "left")},
    **{f"{side} hilar structures": ("vascular congestion", "pulmonary edema/hazy opacity", "lung opacity", "enlarged hilum",
                                    "mass/nodule (not otherwise specified)", "calcified nodule") for side in ("right", "left")},
    **{f"{side} costophrenic angle": ("pleural effusion", "costophrenic angle blunting") for side in ("right", "left")},
    **{f"{side} hemidiaphragm": ("elevated hemidiaphragm", "sub-diaphragmatic air") for side in ("right", "left")},
    **{f"{side} clavicle": ("clavicle fracture",) for side in ("right", "left")},
    "trachea": ("endotracheal tube", "tracheostomy tube"),
    "spine": ("scoliosis", "spinal degenerative changes", "spinal fracture"),
    "aortic arch": ("tortuous aorta", "vascular calcification"),
    "mediastinum": ("hernia", "mediastinal widening", "pneumomediastinum"),
    "upper mediastinum": ("superior mediastinal mass/enlargement", "goiter", "mediastinal widening"),
    "svc": _LINES,
    "cardiac silhouette": ("enlarged cardiac silhouette", "cardiac pacer and wires"),
    "cavoatrial junction": _LINES,
    "right atrium": ("cardiac pacer and wires", "swan-ganz catheter", "picc"),
    "carina": ("endotracheal tube",),
    "abdomen": ("enteric tube", "sub-diaphragmatic air", "hernia"),
}

# region -> [(phrase, [(category, present, label), ...]), ...], as in a scene graph's `attributes`.
RegionPhrases = dict[str, list[tuple[str, list[tuple[str, bool, str]]]]]


def normalize_text(text: str) -> str:
    """Whitespace-normalised text: the identity used to deduplicate texts across a batch."""
    return " ".join(text.split())


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for t in map(normalize_text, texts) if t))


@dataclass(frozen=True)
class ImageRegionTexts:
    """Texts of one image for the region-phrase objective.

    Attributes:
        positives: [R] tuples; positives[r] are texts that describe region r of this image.
        negatives: [R] tuples; negatives[r] are explicit negatives of region r (hard negatives from
            perturbations, attribute-based and template negatives). In-batch negatives are added by
            `collate_region_texts`.
        region_names: the R region names, in query order.
    """

    positives: tuple[tuple[str, ...], ...]
    negatives: tuple[tuple[str, ...], ...]
    region_names: tuple[str, ...] = ANATOMICAL_REGIONS

    def __post_init__(self):
        if not (len(self.positives) == len(self.negatives) == len(self.region_names)):
            raise ValueError("ImageRegionTexts: positives, negatives and region_names must have one entry per region")


def region_texts_for_image(
    region_phrases: RegionPhrases,
    rng: np.random.Generator,
    perturb_prob: float = 0.2,
    num_attribute_negatives: int = 3,
    num_template_negatives: int = 1,
    findings: Sequence[str] = DEFAULT_FINDINGS,
    region_names: Sequence[str] = ANATOMICAL_REGIONS,
    prompts: RegionPrompts | None = None,
) -> ImageRegionTexts:
    """Positive and explicit negative texts of every region of one image (PAPER.md, label generation).

    For each region, with `labels` its (category, present, label) triples (category "nlp" ignored):
    - positives: every report phrase of the region; for each of its labels in `findings`, the zero-shot
      prompt that is true ("{finding} in the {region}" when present, "no {finding} in the {region}" when
      absent); and, when nothing is present there, its normal description ("the {region} is normal").
    - negatives: the opposite prompt of each such label; the normal description when something is present
      (so that text depends on the image, not only on the region); with probability `perturb_prob`, a
      meaning-changing perturbation of one sampled report phrase (`perturb_phrase`); and, when nothing is
      present, `num_attribute_negatives` prompts "{finding} in the {region}" of findings plausible there
      (`REGION_FINDINGS`) and `num_template_negatives` template hard negatives (`HARD_NEGATIVE_TEMPLATES`).
    Texts are whitespace-normalised; a text is never both a positive and a negative of the same region.
    Deterministic given the state of `rng` (a `numpy.random.Generator`).
    """
    prompts = prompts or default_region_prompts()
    vocabulary = set(findings)
    all_positives, all_negatives = [], []
    for region in region_names:
        entries = region_phrases.get(region, [])
        phrases = list(_unique(phrase for phrase, _ in entries))
        labels = {(label, present) for _, triples in entries for category, present, label in triples if category != "nlp"}
        present = sorted({label for label, is_present in labels if is_present})
        absent = sorted({label for label, is_present in labels if not is_present} - set(present))

        positives, negatives = list(phrases), []
        for label in (f for f in present if f in vocabulary):
            positives.append(prompts.render(label, region))
            negatives.append(prompts.render(label, region, negated=True))
        for label in (f for f in absent if f in vocabulary):
            positives.append(prompts.render(label, region, negated=True))
            negatives.append(prompts.render(label, region))
        if phrases and rng.random() < perturb_prob:
            perturbed = perturb_phrase(phrases[rng.integers(len(phrases))], rng)
            if perturbed is not None:
                negatives.append(perturbed.text)
        if present:  # "the <region> is normal" is false here: without this negative it would be always true
            negatives.append(NORMAL_REGION_TEMPLATE.format(region=region))
        else:
            positives.append(NORMAL_REGION_TEMPLATE.format(region=region))
            candidates = [f for f in REGION_FINDINGS.get(region, ()) if f in vocabulary and f not in absent]
            count = min(num_attribute_negatives, len(candidates))
            for index in rng.choice(len(candidates), size=count, replace=False) if count else ():
                negatives.append(prompts.render(candidates[index], region))
            plausible = [f for f in REGION_FINDINGS.get(region, ()) if f in vocabulary]
            for _ in range(num_template_negatives):
                template = HARD_NEGATIVE_TEMPLATES[rng.integers(len(HARD_NEGATIVE_TEMPLATES))]
                if "{finding}" in template and not plausible:
                    template = HARD_NEGATIVE_TEMPLATES[0]
                negatives.append(template.format(
                    region=region,
                    finding=plausible[rng.integers(len(plausible))] if plausible else "",
                    severity=HARD_NEGATIVE_SEVERITIES[rng.integers(len(HARD_NEGATIVE_SEVERITIES))],
                ))
        positives = _unique(positives)
        all_positives.append(positives)
        all_negatives.append(tuple(t for t in _unique(negatives) if t not in positives))
    return ImageRegionTexts(tuple(all_positives), tuple(all_negatives), tuple(region_names))


def possible_region_texts(
    region_phrases: RegionPhrases,
    findings: Sequence[str] = DEFAULT_FINDINGS,
    region_names: Sequence[str] = ANATOMICAL_REGIONS,
    prompts: RegionPrompts | None = None,
) -> set[str]:
    """Every text `region_texts_for_image` can produce for an image with these phrases, whatever the rng.

    The text-embedding cache embeds this set (over a data set) once, so training never runs the text tower:
    the report phrases and their meaning-changing rewrites, both prompts of every finding in every region,
    the normal descriptions and the template hard negatives.
    """
    prompts = prompts or default_region_prompts()
    texts = set()
    for entries in region_phrases.values():
        for phrase, _ in entries:
            texts.add(phrase)
            texts.update(candidate for perturb in _PERTURBERS.values() if (candidate := perturb(phrase)))
    for region in region_names:
        texts.add(NORMAL_REGION_TEMPLATE.format(region=region))
        for finding in findings:
            texts.update((prompts.render(finding, region), prompts.render(finding, region, negated=True)))
        plausible = [f for f in REGION_FINDINGS.get(region, ()) if f in set(findings)] or [""]
        for template in HARD_NEGATIVE_TEMPLATES:
            for finding in plausible:
                for severity in HARD_NEGATIVE_SEVERITIES:
                    texts.add(template.format(region=region, finding=finding, severity=severity))
    return {normalize_text(t) for t in texts}


def collate_region_texts(items: Sequence[ImageRegionTexts]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Deduplicate a batch's texts and build the region-text masks of the fine-grained InfoNCE.

    Returns:
        texts: the batch's unique texts (T), in first-seen order; identity after whitespace normalisation.
        positive: bool [B, R, T]; text t describes region r of image b.
        negative: bool [B, R, T]; text t is an explicit negative of (b, r), or a positive of any other
            region r' != r of any image in the batch (in-batch negatives across regions); never where
            `positive` is True, so a text shared by several images or regions is no negative of a region
            it is positive for.
    """
    if not items:
        raise ValueError("collate_region_texts: empty batch")
    num_regions = len(items[0].region_names)
    if any(len(item.region_names) != num_regions for item in items):
        raise ValueError("collate_region_texts: all images must have the same regions")
    index: dict[str, int] = {}
    for item in items:
        for texts in (*item.positives, *item.negatives):
            for text in texts:
                index.setdefault(normalize_text(text), len(index))
    positive = np.zeros((len(items), num_regions, len(index)), dtype=bool)  # [B, R, T]
    explicit = np.zeros_like(positive)  # [B, R, T]
    for b, item in enumerate(items):
        for r in range(num_regions):
            positive[b, r, [index[normalize_text(t)] for t in item.positives[r]]] = True
            explicit[b, r, [index[normalize_text(t)] for t in item.negatives[r]]] = True
    region_positive = positive.any(axis=0)  # [R, T]: positive of region r in some image
    other_region = (region_positive.sum(axis=0, keepdims=True) - region_positive) > 0  # [R, T]
    negative = (explicit | other_region[None]) & ~positive
    return list(index), positive, negative


# ---------------------------------------------------------------------------------------------------
# Inputs: scene graphs and parsed reports
# ---------------------------------------------------------------------------------------------------


def scene_graph_region_phrases(scene_graph: dict, region_names: Sequence[str] = ANATOMICAL_REGIONS) -> RegionPhrases:
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

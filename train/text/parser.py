"""Radiology-report parsing: ``parse_report(text) -> list[Mention]``, a self-contained, rule-based ConText-style parser.

A report is split into sections (history/indication/comparison/technique are skipped), sentences and clauses;
finding terms are matched from one synonym table (`FINDING_SYNONYMS`, longest match wins); normal statements
("the lungs are clear", "heart size and pulmonary vascularity are within normal limits") are read by
`NORMAL_RULES` as absent findings; ConText triggers (negation, uncertainty, alternatives, pseudo-triggers,
scope terminators) with a direction (``pre``: scope runs forward, ``post``: scope runs backward, ``alt``: the
two disjuncts of "X or Y" / "X versus Y" / "X/Y") decide ``present`` and ``uncertain``; laterality and zone
words in the finding's chunk decide its region through one table of default region rules (`REGION_RULES`).

Real report language this handles (DATA_FORMATS.md, "Real report language"): post-finding negation and
resolution ("pleural effusion is not seen", "has resolved", "is no longer seen", "is absent"), hedges
("cannot be excluded", "may reflect", "questionable", "likely", "suggestive of", "concerning for",
"correlate for", "X or Y"), change words that do not negate ("unchanged", "improved", "worsening", "stable",
"again seen"), `XXXX` (IU-Xray) and `___` (MIMIC-CXR) redactions, ALL-CAPS text and any other string:
`parse_report` never raises.

Why rule-based: the parser runs inside the data pipeline over hundreds of thousands of reports and its
behaviour must be inspectable and testable. `train.eval.report_parser` measures it on hand-labelled sentences
(the project's own set and real IU-Xray sentences) against a keyword baseline and ConText/NegEx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from train.text.vocabulary import FINDING_CATEGORY

# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------

_HEART = r"(?:heart|cardiac|cardiomediastinal|cardio-?mediastinal)(?:\s+(?:size|silhouette|contours?|shadow))?"
_COPULA = r"(?:\s+(?:is|are|appears?|remains?|was|seems?|xxxx))?"
_SIDE_WORD = r"(?:\s+(?:right|left|bilateral))?"
_ANGLE = r"(?:costophrenic|cp)(?: (?:angles?|sulc(?:us|i)|recess(?:es)?|xxxx))?"
_DIAPHRAGM = r"(?:hemi-?)?diaphragms?"

# One table of synonyms: label -> regular expressions over the lower-cased sentence (word boundaries
# are added around each). A label of None marks a *blocker*: a term that contains a finding word but
# is not that finding ("pericardial effusion" is not a pleural effusion); blockers win by being longer.
# Findings described as normal ("heart size is normal") are in `NORMAL_RULES` below.
FINDING_SYNONYMS: dict[str | None, tuple[str, ...]] = {
    "lung opacity": (
        r"opacit(?:y|ies)", r"opacification", r"opacified", r"infiltrat(?:e|es|ion|ive)",
        r"air[- ]?space (?:disease|process|opacit(?:y|ies)|densit(?:y|ies))", r"densit(?:y|ies)",
    ),
    "consolidation": (r"consolidat(?:ion|ions|ed|ive (?:opacit(?:y|ies)|process|changes?))",),
    "atelectasis": (r"(?:sub)?atelecta(?:sis|ses|tic(?: changes?)?)", r"collapse of the (?:\w+\s+){0,2}lobe"),
    "pleural effusion": (r"(?:pleural )?effusions?", r"pleural fluid", r"hydrothorax"),
    "costophrenic angle blunting": (
        r"blunt(?:ing|ed)(?: of)?(?: the)?(?:\s+[\w-]+){0,3}?\s+(?:" + _ANGLE + r"|sulc(?:us|i)|angles?|recess(?:es)?)",
        _ANGLE + r"(?:\s+\w+){0,2}?\s+(?:is|are|remains?|xxxx)\s+(?:\w+\s+)?blunted",
    ),
    "pneumothorax": (r"pneumothora(?:x|ces)", r"ptx"),
    "pulmonary edema/hazy opacity": (
        r"(?:pulmonary |interstitial |alveolar |perihilar )?edema", r"hazy opacit(?:y|ies)", r"haziness",
    ),
    "vascular congestion": (
        r"(?:pulmonary )?(?:vascular|venous) (?:congestion|engorgement|prominence|redistribution)",
        r"congest(?:ion|ed)", r"(?:vascular )?congestive changes", r"(?:vascular )?cephali[sz]ation",
        r"prominen(?:t|ce of)(?: the)?(?: central| upper lobe)? (?:pulmonary )?vascula(?:rity|ture|r markings)",
        r"(?:pulmonary )?vascula(?:rity|ture)(?:\s+\w+){0,2}?\s+(?:is|are|appears?|remains?)\s+(?:\w+ly\s+)?prominent",
    ),
    "enlarged cardiac silhouette": (
        r"cardiomegaly",
        r"enlarge(?:d|ment (?:of|in))(?: the)? (?:heart|cardiac (?:silhouette|shadow|size)|cardio-?mediastinal silhouette)",
        r"cardiac enlargement", r"increase(?:d)? in (?:the )?size of the (?:heart|cardiac silhouette)",
        _HEART + _COPULA + r"(?:\s+not)?(?:\s+(?!and\b|but\b|with\b|normal\b)[\w-]+){0,3}?\s+(?:enlarged|large|increased)",
        r"borderline (?:heart size|cardiac size|cardiac silhouette|enlarged heart)",
        _HEART + _COPULA + r"\s+borderline(?:\s+(?:enlarged|in size))?",
    ),
    "mass/nodule (not otherwise specified)": (
        r"nodules?", r"non-?\s?calcified (?:[\w-]+\s+){0,3}?(?:nodules?|granulom(?:a|as|ata)|densit(?:y|ies))",
        r"nodular opacit(?:y|ies)", r"nodular densit(?:y|ies)", r"mass(?:es)?",
        r"(?:cavitary|pulmonary|lung|parenchymal|spiculated) lesions?", r"cavitation",
    ),
    "calcified nodule": (r"calcifi(?:ed|c) (?:[\w-]+\s+){0,3}?(?:nodules?|nodular densit(?:y|ies))",
                         # not a density the sentence puts on a valve or vessel ("... mitral annular calcification")
                         r"calcifi(?:ed|c) densit(?:y|ies)(?: nodules?)?"
                         r"(?![^.;]*\b(?:mitral|annul|aort|valv|atheroscl|arter|vascular|vessel))"),
    "granulomatous disease": (
        r"(?:prior |old |previous |remote )?granulomatous (?:disease|infection|exposure|process|changes?)",
        r"histoplasmosis(?: infection)?",
    ),
    "pneumonia": (r"(?:broncho)?pneumonias?", r"pneumonitis", r"infection", r"infectious (?:process|infiltrates?)"),
    "copd/emphysema": (
        r"emphysema(?:tous(?: changes?)?)?", r"copd", r"chronic obstructive (?:pulmonary|lung|airways?) disease",
    ),
    "hyperaeration": (r"hyper-?(?:inflat(?:ed|ion)|expan(?:ded|sion)|aerat(?:ed|ion))", r"over-?inflat(?:ed|ion)"),
    "low lung volumes": (
        r"(?:low|lower|decreased|diminished|reduced)(?: lung| inspiratory)? volumes?",
        r"lung volumes?" + _COPULA + r"(?:\s+\w+)?\s+low",
        r"(?:hypo|under)[- ]?(?:inflat(?:ed|ion)|expan(?:ded|sion))", r"poorly (?:inflated|expanded|aerated)",
        r"(?:poor|shallow|low) inspiration", r"low volume (?:study|film|exam)",
    ),
    "elevated hemidiaphragm": (
        r"elevat(?:ed|ion)(?: of)?(?: the)?" + _SIDE_WORD + r"(?:\s+xxxx)?\s+" + _DIAPHRAGM,
        _DIAPHRAGM + _COPULA + r"(?:\s+\w+)?\s+elevated", _DIAPHRAGM + r" elevation",
    ),
    "hernia": (r"(?:hiatal |hiatus |diaphragmatic )?hernia",),
    "scoliosis": (
        r"(?:dextro|levo)?-?scoliosis", r"scoliotic(?: curvature| changes?)?",
        r"(?:dextro|levo)-?convex(?:\s+\w+){0,2}?\s+curvature",
    ),
    "spinal degenerative changes": (
        r"degenerative (?:\w+ )?(?:changes?|disease|disc disease|joint disease)", r"spondylo(?:sis|tic changes?)",
        r"osteophytes?", r"osteophytic (?:changes?|spurring|lipping)", r"dish",
    ),
    "tortuous aorta": (
        r"tortu?r?o(?:us|sity)(?: of)?(?: the)?(?:\s+(?:thoracic|descending|ascending|abdominal)){0,2}\s+aort(?:a|ic arch)",
        r"tortu?r?o(?:us|sity)(?:/[\w-]+)?(?:,?\s+(?:and\s+)?[\w-]+){0,3}?\s+aort(?:a|ic arch)",
        r"aort(?:a|ic)(?:\s+(?:arch|knob))?(?:[\s/]+\w+){0,3}?[\s/]+tortu?r?o(?:us|sity)",
    ),
    "rib fracture": (
        r"rib fractures?", r"fractures? (?:\w+\s+){0,4}?(?:of|on|in|involving) (?:the )?(?:\w+\s+){0,4}?ribs?",
        r"fractured (?:\w+\s+){0,2}ribs?",
    ),
    "clavicle fracture": (
        r"clavic(?:le|ular) fractures?", r"fractures? of the (?:\w+\s+){0,2}clavicles?", r"fractured (?:\w+\s+)?clavicles?",
    ),
    "spinal fracture": (
        r"(?:vertebral |spinal |burst )?compression (?:fractures?|deformit(?:y|ies))", r"(?:vertebral|spinal) fractures?",
        r"fractures? of (?:a|the) (?:\w+\s+){0,3}vertebra(?:e|l bod(?:y|ies))?",
        r"fractures? (?:of|at|in|involving) (?:the )?[tl]\d{1,2}",
        r"[tl]\d{1,2} (?:vertebral (?:body )?)?(?:compression )?fractures?",
        r"wedg(?:e|ing)(?: xxxx| compression)? deformit(?:y|ies)", r"wedg(?:e|ing) of (?:a|the|\w+) (?:\w+\s+){0,2}vertebra\w*",
        r"(?:xxxx )?deformit(?:y|ies) (?:of|at|in|involving) (?:the )?(?:[tl]\d{1,2}|\w+ vertebra\w*|vertebra\w*"
        r"|thoracolumbar junction)",
        r"(?:vertebral body )?(?:height|xxxx) loss (?:of|at|in|involving) (?:the )?(?:[tl]\d{1,2}|\w+ vertebra\w*|vertebra\w*)",
        r"loss of (?:vertebral body )?height (?:of|at|in|involving) (?:the )?(?:[tl]\d{1,2}|\w+ vertebra\w*|vertebra\w*)",
    ),
    "endotracheal tube": (r"endotracheal tubes?", r"et tubes?", r"ett"),
    "enteric tube": (
        r"(?:ng|og|nasogastric|orogastric|enteric|feeding|nasoenteric|nasojejunal|gastric(?: suction)?) tubes?",
        r"dobb?hoff(?: feeding)?(?: tubes?)?",
    ),
    None: (
        r"pericardial effusions?", r"chest tubes?", r"(?:tuberculosis|tuberculous|tb|mycobacterial) infection",
        r"mass effect", r"soft tissue (?:edema|mass|densit(?:y|ies))",
        r"degenerative (?:\w+ )?(?:changes?|disease)(?:\s+\w+){0,2}? (?:of|in|at|within|involving) (?:the |both )?"
        r"(?:\w+\s+)?(?:shoulders?"
        r"|glenohumeral(?: joints?)?|ac joints?|acromioclavicular joints?|knees?|hips?|costochondral(?: junctions?)?"
        r"|sternoclavicular(?: joints?)?|elbows?|wrists?|hands?)", r"tricompartmental degenerative changes?",
        r"bone densit(?:y|ies)", r"breast (?:mass|densit(?:y|ies)|tissue densit(?:y|ies))", r"subcutaneous emphysema",
    ),
}

# Terms that state several findings at once: "calcified granuloma" is a calcified nodule left by granulomatous
# disease; "calcifications ... compatible with granulomatous disease" the same.
COMPOUND_SYNONYMS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("calcified nodule", "granulomatous disease"): (
        r"(?:calcified )?granulom(?:a|as|ata)",
        r"(?:(?:pulmonary|parenchymal|lung|scattered|punctate|multiple) )?calcifications?(?:[\s,]+\w+){0,3}?[\s,]+"
        r"(?:compatible with|consistent with|from|due to|related to|of|suggest\w*|representing) (?:\w+\s+)?"
        r"granulomatous (?:disease|infection|exposure|process|changes?)",
    ),
}

# ---------------------------------------------------------------------------------------------------
# Normal statements: findings stated absent without a negation word
# ---------------------------------------------------------------------------------------------------

_NORMAL = (r"normal(?:\s+in\s+(?:size|caliber|appearance|configuration))?|(?:of\s+)?normal\s+size"
           r"|within\s+(?:the\s+)?normal\s+limits|within\s+limits\s+of\s+normal|unremarkable"
           r"|(?:(?:at|near)\s+(?:the\s+)?)?(?:upper\s+limits?\s+of\s+normal|top\s+normal|high\s+normal)")
_LUNGS = r"lungs?|lung (?:fields?|bases?|base|zones?|apices|apex|parenchyma)|(?:right|left) lung(?: base)?"


@dataclass(frozen=True)
class NormalRule:
    """A statement that names a subject and a normal predicate ("the lungs are clear") states `findings` absent.

    Attributes:
        findings: the findings the statement says are absent.
        subject: pattern of the thing described ("lungs", "heart size").
        predicate: pattern of the normal predicate ("clear", "within normal limits").
        abnormal: the predicate that states the opposite (the negation-flip perturbation writes it).
    """

    findings: tuple[str, ...]
    subject: str
    predicate: str
    abnormal: str


NORMAL_RULES: tuple[NormalRule, ...] = (
    NormalRule(("enlarged cardiac silhouette",),
               r"heart(?:\s+(?:size|silhouette|contours?|shadow))?|cardiac(?:\s+(?:size|silhouette|contours?|shadow))"
               r"|cardiac(?=\s+and\s+mediastinal)|cardio-?\s?mediastinal\s+(?:silhouette|contours?|shadow)",
               _NORMAL, "enlarged"),
    NormalRule(("lung opacity",), _LUNGS, r"clear(?:ed)?", "opacified"),
    NormalRule(("low lung volumes",), r"lungs?",
               r"(?:(?:well|normally|fully)[- ])?(?:expanded|inflated)|well[- ]aerated", "hypoinflated"),
    NormalRule(("low lung volumes",), r"lung volumes?|inspiratory volumes?", _NORMAL, "low"),
    NormalRule(("pleural effusion", "pneumothorax"), r"pleural spaces?|pleural surfaces?", r"clear|normal", "not clear"),
    NormalRule(("vascular congestion",),
               r"(?:pulmonary\s+)?(?:vascularity|vasculature|vascular\s+markings)|pulmonary\s+vessels", _NORMAL, "congested"),
)

# Words allowed between a normal rule's subject and its predicate: a copula, list words, adverbs and
# other normal predicates ("lungs are expanded and clear"). Anything that opens a new statement is not.
_COPULAS = frozenset({"is", "are", "was", "were", "appear", "appears", "remain", "remains", "seem", "seems",
                      "look", "looks", "xxxx", "___"})
_NORMAL_BOUNDARIES = frozenset({
    "with", "without", "no", "not", "but", "however", "except", "which", "that", "there", "than", "although",
    "though", "whereas", "while", "for", "by", "to", "from", ";", ":", "(", ")", "has", "have", "had", "show",
    "shows", "demonstrate", "demonstrates", "since", "previously", "prior", "compared",
})
_AFTER_COPULA = frozenset({
    "otherwise", "grossly", "again", "relatively", "both", "also", "still", "now", "overall", "essentially",
    "and", ",", "bilaterally", "stable", "well", "currently", "largely", "mostly", "expanded", "inflated",
    "clear", "normal", "unremarkable", "aerated", "well-expanded", "well-inflated", "well-aerated", "fully",
    "normally", "xxxx", "___", "at", "the", "near",
})
_MAX_LIST_WORDS = 12
_MAX_NORMAL_DISTANCE = 160  # characters between a subject and its predicate
_BUT_OTHERWISE = re.compile(r"\bbut\s+otherwise\s*$")

# ---------------------------------------------------------------------------------------------------
# Default region of every finding (the single table of region choices)
# ---------------------------------------------------------------------------------------------------

LOCATED = "located"  # rule: placed by the zone and side words of its chunk (see `_regions_for`)

# finding -> rule. A rule is one of:
#   LOCATED        zone + side -> "{side} {zone}"; an adjectival zone ("perihilar", "basilar") or a plural one
#                  ("the lung bases", "both apices") without side -> both sides; a singular zone without side
#                  ("at the apex", "the left" unnamed) -> None (the side is unknown); side without zone
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
    (r"rll", "lower lung zone", "right"),
    (r"lul", "upper lung zone", "left"),
    (r"lll", "lower lung zone", "left"),
    (r"(?:bi)?apical|apex|apices", "apical zone", None),
    # the first of two coordinated zones: "mid and lower lung zones", "upper to mid lungs"
    (r"upper" + _COORDINATED_ZONE, "upper lung zone", None),
    (r"mid(?:dle)?" + _COORDINATED_ZONE, "mid lung zone", None),
    (r"lower" + _COORDINATED_ZONE, "lower lung zone", None),
    (r"upper (?:lobes?|lungs?|(?:lung )?zones?|lung fields?)", "upper lung zone", None),
    (r"(?:right )?middle lobe|rml", "mid lung zone", "right"),
    (r"(?:mid(?:dle)?[- ]?lungs?(?: zones?| fields?)?|mid[- ]zones?|mid[- ]?hemithorax)", "mid lung zone", None),
    (r"lower (?:lobes?|lungs?|(?:lung )?zones?|lung fields?)|bases?|(?:bi)?basilar|(?:bi)?basal", "lower lung zone", None),
    (r"(?:peri|infra|supra)?hil(?:ar|um|a|us)", "hilar structures", None),
    (_ANGLE, "costophrenic angle", None),
    (r"lungs?|hemithora(?:x|ces)", "lung", None),
)
# A zone named by a singular noun ("at the apex", "in the lower lobe") without a side word has an unknown side.
_SINGULAR_ZONE = re.compile(r"(?:apex|base|lobe|lung|zone|field|hilum|hilus|hemithorax|angle|sulcus|recess|xxxx)$")

_SIDE_TERMS = (
    (r"right", ("right",)),
    (r"left", ("left",)),
    (r"bilateral(?:ly)?|bibasilar|bibasal|biapical|both(?=\s+(?:the\s+)?(?:lungs?|sides|bases|lung|hemithora|apices"
     r"|upper|lower|mid|middle|costophrenic|cp|hil|hemidiaphragms|pleural|lateral|posterior))", ("right", "left")),
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
PRE, POST, ALT = "pre", "post", "alt"

_SEEN = r"(?:seen|identified|visualized|visualised|appreciated|demonstrated|present|evident|detected|noted|observed|visible)"
_FUNCTION_WORD = r"(?:at|in|on|of|is|are|was|were|with|to|and|or|the|a|an|for|by|from|xxxx)"
_HEDGE_CAUSE = r"(?:represent\w*|reflect\w*|due|related|secondary|indicat\w*|suggest\w*)"

# (pattern, kind, direction). PSEUDO triggers contain a trigger word but are not triggers ("no change in");
# they only block. TERMINATE ends the scope of every trigger. ALT triggers ("or", "versus", "/") make the
# two alternatives next to them uncertain. Overlaps are resolved longest first.
CONTEXT_TRIGGERS: tuple[tuple[str, str, str], ...] = (
    # negation, scope forward
    (r"no", NEGATED, PRE),
    (r"not", NEGATED, PRE),
    (r"without", NEGATED, PRE),
    (r"negative for", NEGATED, PRE),
    (r"(?:(?:is|are|was|were|remains?|appears?)\s+)?(?:free|clear) of", NEGATED, PRE),
    (r"absence of", NEGATED, PRE),
    (r"(?:interval |complete )?resolution of", NEGATED, PRE),
    (r"(?:interval )?removal of", NEGATED, PRE),
    (r"rules? out", NEGATED, PRE),
    (r"no longer", NEGATED, PRE),
    # negation, scope backward
    (r"(?:(?:is|are|was|were|has been|have been)\s+)?not (?:(?:well|clearly|definitely|convincingly|currently|"
     r"radiographically)\s+)?" + _SEEN, NEGATED, POST),
    (r"(?:(?:has|have)\s+)?(?:(?:since|completely|nearly|almost|now)\s+)?(?:resolved|cleared)", NEGATED, POST),
    (r"(?:(?:is|are|was|were)\s+)?(?:now\s+)?(?:absent|gone)", NEGATED, POST),
    (r"(?:(?:has|have)\s+been|(?:was|were))\s+removed", NEGATED, POST),
    (r"(?:(?:is|are|was|were)\s+)?no longer (?:seen|present|visualized|identified|evident|visible|demonstrated|apparent)",
     NEGATED, POST),
    # uncertainty, scope forward
    (r"possibl[ey]|possibility of|probabl[ey]|likely|questionabl[ey]|question of|presum(?:ed|ably)|suspected"
     r"|equivocal|borderline", UNCERTAIN, PRE),
    (r"(?:may|could|might|can) (?:also )?(?:represent|reflect|be|indicate|suggest|relate)", UNCERTAIN, PRE),
    (r"suggestive of|suggests?|suggesting|suggestion of|concerning for|concern for|worrisome for|suspicious for"
     r"|cannot exclude|can't exclude|cannot rule out|differential (?:diagnosis )?includes?|correlat(?:e|ion) for"
     r"|suspicion (?:for|of)",
     UNCERTAIN, PRE),
    # a redaction in front of a causal word or in an apposition hides likely/probably ("opacity, XXXX atelectasis")
    (r"xxxx(?=\s+" + _HEDGE_CAUSE + r")|(?<=, )xxxx(?=\s+(?!" + _FUNCTION_WORD + r"\b)[a-z])|most xxxx", UNCERTAIN, PRE),
    # alternatives: "atelectasis or scarring", "atelectasis versus infiltrate", "scarring/atelectasis"
    (r"or|and/or|versus|vs\.?", UNCERTAIN, ALT),
    ("/", UNCERTAIN, ALT),
    # uncertainty, scope backward
    (r"(?:cannot|can not|could not|not) be (?:entirely |completely )?(?:excluded|ruled out)"
     r"|(?:is|are)? ?not (?:excluded|ruled out)"
     r"|(?:is|are)? ?difficult to exclude|(?:is|are) (?:possible|suspected|likely|questioned|not excluded)(?=\s*(?:[.,;]|$))",
     UNCERTAIN, POST),
    # pseudo-triggers: contain a trigger word but negate nothing
    (r"no (?:significant |interval |appreciable |substantial )*(?:change|increase|decrease|worsening|improvement)"
     r"|not (?:significantly )?changed|without (?:significant |interval )*change|not only|no longer (?:requires?|needed)"
     r"|without (?:a |the )?(?:prior |previous )?(?:comparisons?|priors?|lateral view)"
     r"|not (?:well |clearly )?(?:seen|visualized|present|identified|evident|demonstrated|appreciated) "
     r"(?:on|in) (?:the )?(?:prior|previous|earlier|preceding|old|comparison)(?: \w+)?|gram-negative|rule out\b(?= \w+ on)",
     PSEUDO, PRE),
    # scope terminators
    (r"but|however|although|though|aside from|apart from|except|whereas|while|otherwise|nevertheless|which"
     r"|and (?:the|there)", TERMINATE, PRE),
    (";", TERMINATE, PRE),
    ("(", TERMINATE, PRE),
)

# Words that bound the two alternatives of an ALT trigger ("opacities compatible with scarring or atelectasis":
# the alternatives are "scarring" and "atelectasis", not the opacities).
_ALTERNATIVE_STOP = re.compile(
    r",|\b(?:with|without|of|for|to|in|on|at|by|from|is|are|was|were|be|been|may|might|could|can|represent\w*"
    r"|reflect\w*|suggest\w*|compatible|consistent|likely|possibl\w*|probabl\w*|due|which|there|noted|seen"
    r"|identified|present|concerning|worrisome|suspicious|and|no|not|xxxx)\b"
)

_HEDGE_STOP = re.compile(r"(?<!consistent )(?<!compatible )\bwith\b")

# Words that open an interpretive apposition ("opacity, likely atelectasis") or an adjacency phrase
# ("effusion with adjacent atelectasis"): a chunk starting with them inherits the previous chunk's location.
_INHERIT_OPENERS = re.compile(
    r"^(?:likely|probably|possibly|possible|which|may|could|might|concerning|suggest\w*|suspicious|worrisome"
    r"|consistent|compatible|representing|reflecting|due|adjacent|associated|compressive|subjacent|overlying|adjoining"
    r"|xxxx|most)\b"
)
_ADJACENCY_OPENERS = re.compile(r"^(?:adjacent|associated|compressive|subjacent|overlying|adjoining)\b")
_CONNECTORS = re.compile(r"^(?:and|with|without|or|but|which|as well as|plus)\s+")
# Findings spread through a lung or both: placed only by their own location words.
_DIFFUSE = frozenset({"pulmonary edema/hazy opacity", "vascular congestion", "copd/emphysema", "hyperaeration"})
# Chunk (location) boundaries inside a clause.
# ("mid and lower zones" and "consistent with" are not boundaries.)
_CHUNK_BOUNDARY = re.compile(
    r",|:|(?<!upper )(?<!mid )(?<!middle )(?<!lower )(?<!right )(?<!left )\band\b(?!/)|(?<!consistent )(?<!compatible )\bwith\b"
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


_FINDING_PATTERNS = [((label,), _compile(p)) for label, p in FINDING_SYNONYMS.items()]
_FINDING_PATTERNS += [(labels, _compile(p)) for labels, p in COMPOUND_SYNONYMS.items()]
_NORMAL_PATTERNS = [(rule, _compile([rule.subject]), _compile([rule.predicate])) for rule in NORMAL_RULES]
_TRIGGER_PATTERNS = [
    (re.compile(re.escape(p)) if p in (";", "/", "(") else _compile([p]), kind, direction)
    for p, kind, direction in CONTEXT_TRIGGERS
]
_ZONE_PATTERNS = [(_compile([p]), zone, side) for p, zone, side in ZONE_TERMS]
_SIDE_PATTERNS = [(re.compile(r"\b(?:" + p + r")\b"), sides) for p, sides in _SIDE_TERMS]
_ZONE_ORDER = tuple(dict.fromkeys(zone for _, zone, _ in ZONE_TERMS))
_SEVERITY_PATTERN = re.compile(r"\b(" + "|".join(SEVERITY_WORDS) + r")\b")
_WORDS = re.compile(r"[\w'-]+|[,;:()]")
_PAIRED_PLURAL = re.compile(r"\b(?:effusions|angles|sulci|recesses|hemidiaphragms|diaphragms|clavicles)\b")

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
        uncertain: True for hedged findings ("possible X", "X cannot be excluded", "X or Y"); they stay present=True.
        severity: "mild" / "moderate" / "severe" from the words next to the finding, or None.
        phrase: the clause that states it (sentence split at ";" / "but" / "however" ...), as written.
        sentence: the whole sentence.
        section: lower-cased section header ("findings", "impression", ...) or None.
        span: (start, end) character offsets of the finding's words in `sentence` (not part of equality).
    """

    finding: str
    region: str | None
    present: bool
    uncertain: bool = False
    severity: str | None = None
    phrase: str = ""
    sentence: str = ""
    section: str | None = None
    span: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def category(self) -> str:
        return FINDING_CATEGORY[self.finding]


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    label: str | None  # finding label / trigger kind
    direction: str = ""
    normal: NormalRule | None = None  # set for a finding stated absent by a normal statement
    predicate: tuple[int, int] | None = None  # the normal statement's predicate

    @property
    def absent(self) -> bool:
        return self.normal is not None


def _lower(text: str) -> str:
    """Lower-case without changing string length, so offsets stay valid."""
    return "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)


def _longest_non_overlapping(spans: list[_Span]) -> list[_Span]:
    chosen: list[_Span] = []
    for span in sorted(spans, key=lambda s: (-(s.end - s.start), s.start)):
        if all(span.end <= c.start or span.start >= c.end for c in chosen):
            chosen.append(span)
    return sorted(chosen, key=lambda s: s.start)


def _normal_binds(low: str, gap: tuple[int, int], findings: list[_Span], predicate_first: bool) -> bool:
    """Whether the words between a normal rule's subject and predicate keep them in one statement."""
    if not predicate_first and _BUT_OTHERWISE.search(low, gap[0], gap[1]):
        return len(_WORDS.findall(low[gap[0]:gap[1]])) <= _MAX_LIST_WORDS  # "lungs are hyperinflated but otherwise clear"
    if any(gap[0] < f.end and f.start < gap[1] for f in findings):
        return False  # another finding in between: "normal heart size, mild edema and clear lungs"
    words = _WORDS.findall(low[gap[0]:gap[1]])
    if len(words) > _MAX_LIST_WORDS or any(w in _NORMAL_BOUNDARIES for w in words):
        return False
    copulas = [i for i, w in enumerate(words) if w in _COPULAS and w not in ("xxxx", "___")]
    if predicate_first:  # "normal heart size and pulmonary vasculature": a noun list, no verb
        return not copulas
    if len(copulas) > 1:
        return False
    return not copulas or all(w in _AFTER_COPULA for w in words[copulas[0] + 1:])


def _find_normal_statements(low: str, findings: list[_Span]) -> list[_Span]:
    """Absent-finding spans (at the subject) of the normal statements of a lower-cased sentence."""
    spans = []
    for rule, subject_pattern, predicate_pattern in _NORMAL_PATTERNS:
        predicates = list(predicate_pattern.finditer(low))
        if not predicates:
            continue
        for subject in subject_pattern.finditer(low):
            if any(f.start < subject.end() and subject.start() < f.end for f in findings):
                continue  # "low lung volumes": the subject is part of a finding term
            for predicate in predicates:
                if abs(predicate.start() - subject.start()) > _MAX_NORMAL_DISTANCE:
                    continue
                if predicate.start() >= subject.end():
                    binds = _normal_binds(low, (subject.end(), predicate.start()), findings, predicate_first=False)
                elif predicate.end() <= subject.start():
                    binds = _normal_binds(low, (predicate.end(), subject.start()), findings, predicate_first=True)
                else:
                    binds = False
                if binds:
                    spans += [_Span(subject.start(), subject.end(), finding, normal=rule,
                                    predicate=(predicate.start(), predicate.end())) for finding in rule.findings]
                    break
    return spans


def _find_findings(low: str) -> list[_Span]:
    """Finding spans of a lower-cased sentence: synonym matches (longest wins, blockers dropped) and normal statements."""
    candidates = [_Span(m.start(), m.end(), "|".join(labels) if labels[0] else None)
                  for labels, pattern in _FINDING_PATTERNS for m in pattern.finditer(low)]
    chosen = _longest_non_overlapping(candidates)
    findings = [_Span(s.start, s.end, label) for s in chosen if s.label for label in s.label.split("|")]
    normal = _find_normal_statements(low, chosen)
    stated = {f.label for f in findings}
    # a finding that is also named in the sentence is read from its own words ("lungs are clear without edema")
    findings += [s for s in normal if s.label not in stated]
    return sorted(findings, key=lambda s: s.start)


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
        if part and re.search(r"[^\W\d_]", part):
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


@dataclass
class _Location:
    sides: set[str] = field(default_factory=set)  # sides named or implied
    zones: set[str] = field(default_factory=set)
    singular: bool = False  # every zone word is a singular noun ("the base"): no side means an unknown side
    first: int = -1  # offset of its first side/zone word in the sentence

    def __bool__(self) -> bool:
        return bool(self.sides or (self.zones - {"lung"}))


def _location(low: str, start: int, end: int) -> _Location:
    """Sides and zones named in low[start:end] (sides implied by zone words, e.g. "lingula", count when none is named)."""
    sides, zones, implied, words, offsets = set(), set(), set(), [], []
    for pattern, side_names in _SIDE_PATTERNS:
        for match in pattern.finditer(low, start, end):
            sides.update(side_names)
            offsets.append(match.start())
    for pattern, zone, side in _ZONE_PATTERNS:
        for match in pattern.finditer(low, start, end):
            zones.add(zone)
            words.append(match.group())
            if zone != "lung":
                offsets.append(match.start())
            if side:
                implied.add(side)
    specific = [w for w in words if not re.fullmatch(r"lungs?|hemithora(?:x|ces)", w)]
    singular = bool(specific) and all(_SINGULAR_ZONE.search(w) for w in specific)
    return _Location(sides or implied, zones, singular, min(offsets, default=-1))


def _regions_for(finding: str, location: _Location, plural: bool = False) -> list[str | None]:
    """Apply `REGION_RULES` to a finding whose chunk names `location`; a paired structure named in the plural
    without a side ("small effusions", "blunting of the costophrenic angles") is on both sides."""
    rule = REGION_RULES[finding]
    ordered_sides = [s for s in ("right", "left") if s in location.sides]
    if plural and not ordered_sides and rule is not None and "{side}" in rule:
        ordered_sides = ["right", "left"]
    if rule is None:
        return [None]
    if rule == LOCATED:
        specific = [zone for zone in _ZONE_ORDER if zone in location.zones and zone != "lung"]
        if specific and not ordered_sides and location.singular:
            return [None]
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


@dataclass(frozen=True)
class Scope:
    """A NEGATED or UNCERTAIN trigger and the stretch of its clause it applies to (ConText)."""

    trigger: _Span
    start: int
    end: int

    def covers(self, finding: _Span) -> bool:
        t = self.trigger
        if t.direction == PRE:  # also a trigger inside a predicate finding ("heart is not enlarged")
            return finding.end > t.start and finding.start < self.end
        if t.direction == POST:
            return self.start <= finding.start < t.end
        # ALT: the alternatives, not a slash inside the finding's own words ("tortuous/ectatic aorta")
        return self.start <= finding.start < self.end and not (finding.start <= t.start < finding.end)


def trigger_scopes(low: str, triggers: list[_Span], clause: tuple[int, int]) -> list[Scope]:
    """The scope of every NEGATED/UNCERTAIN trigger of a clause.

    A PRE trigger reaches from itself to the next terminator or pseudo-trigger (a hedge also stops at "with":
    "... with blunting"); a POST trigger from the previous terminator to itself; an ALT trigger ("or",
    "versus", "/") covers the two alternatives next to it, back to the previous and on to the next stop word."""
    in_clause = [t for t in triggers if clause[0] <= t.start < clause[1]]
    stops = [s for s in in_clause if s.label in (TERMINATE, PSEUDO)]
    alternative_stops = [(m.start(), m.end()) for m in _ALTERNATIVE_STOP.finditer(low, clause[0], clause[1])]
    hedge_stops = [m.start() for m in _HEDGE_STOP.finditer(low, clause[0], clause[1])]
    scopes = []
    for t in in_clause:
        if t.label not in (NEGATED, UNCERTAIN):
            continue
        if t.direction == PRE:
            ends = [s.start for s in stops if s.start >= t.end]
            if t.label == UNCERTAIN:
                ends += [h for h in hedge_stops if h >= t.end]
            scopes.append(Scope(t, t.start, min(ends, default=clause[1])))
        elif t.direction == POST:
            scopes.append(Scope(t, max((s.end for s in stops if s.end <= t.start), default=clause[0]), t.end))
        else:
            before = [b for a, b in alternative_stops if b <= t.start]
            after = [a for a, b in alternative_stops if a >= t.end]
            scopes.append(Scope(t, max(before, default=clause[0]), min(after, default=clause[1])))
    return scopes


def _context(finding: _Span, scopes: list[Scope]) -> tuple[bool, bool]:
    """(negated, uncertain) of a finding."""
    kinds = {scope.trigger.label for scope in scopes if scope.covers(finding)}
    return NEGATED in kinds, UNCERTAIN in kinds


@dataclass
class _Chunk:
    """A comma/"and"/"with"-delimited part of a clause: the unit that location words apply to."""

    start: int
    end: int
    text: str  # lower-cased, without its leading connector
    location: _Location
    findings: list[tuple[_Span, bool, bool]]  # (finding, negated, uncertain)


def _borrowed_sides(chunks: list[_Chunk], index: int) -> _Location | None:
    """The location a stated finding without a side shares with its neighbours (`chunks`: its clause, and a
    relative clause after it that names no finding: "opacity which appears to be within the left lower lobe").

    A location phrase after a coordination covers all of it ("atelectasis and airspace disease in the left base",
    "calcified granuloma, right base", "atelectasis, most notably in the right middle lobe"); a location before
    it too ("left lower lobe infiltrate and focal atelectasis")."""
    after = next((c for c in chunks[index + 1:] if c.location.sides), None)
    if after is not None and (not after.findings or after.location.first > after.findings[0][0].start):
        return after.location
    return next((c.location for c in reversed(chunks[:index]) if c.location.sides), None)


def _place(finding: _Span, negated: bool, own: _Location, chunks: list[_Chunk], index: int, low: str) -> _Location:
    """Where a finding is: its chunk's own location, with sides borrowed from its neighbours when it names none.

    Negated findings, diffuse ones (edema, congestion, emphysema), unsided ones and a paired structure named in
    the plural ("effusions": both sides) are only placed by their own words."""
    rule = REGION_RULES[finding.label]
    if (own.sides or negated or finding.label in _DIFFUSE or not (rule == LOCATED or (rule and "{side}" in rule))
            or _PAIRED_PLURAL.search(low, finding.start, finding.end)):
        return own
    borrowed = _borrowed_sides(chunks, index)
    if borrowed is None:
        return own
    zones = own.zones if own.zones - {"lung"} else borrowed.zones
    return _Location(set(borrowed.sides), set(zones), False, own.first)


def parse_sentence(sentence: str, section: str | None = None) -> list[Mention]:
    """Mentions of one sentence (see `parse_report`)."""
    low = _lower(sentence)
    findings = _find_findings(low)
    if not findings:
        return []
    triggers = _find_triggers(low)
    clauses = []  # (clause bounds, its chunks)
    for clause in _split_clauses(low, triggers):
        scopes = trigger_scopes(low, triggers, clause)
        chunks = [
            _Chunk(a, b, _CONNECTORS.sub("", low[a:b].strip(" ,:")), _location(low, a, b),
                   [(f, *_context(f, scopes)) for f in findings if a <= f.start < b])
            for a, b in _chunks(low, *clause)
        ]
        for before, chunk in zip(chunks, chunks[1:]):
            if (not before.findings and before.location and chunk.findings and not chunk.location.sides
                    and low.startswith("and ", chunk.start)):
                # coordinated locations: "right middle lobe and lower lobe pneumonia"
                zones = chunk.location.zones - {"lung"}
                chunk.location = _Location(before.location.sides, before.location.zones | chunk.location.zones,
                                           before.location.singular and (chunk.location.singular or not zones),
                                           before.location.first)
        clauses.append((clause, chunks))
    mentions: list[Mention] = []
    previous: _Location | None = None  # of the last located chunk in the sentence
    for number, (clause, chunks) in enumerate(clauses):
        phrase = sentence[clause[0]:clause[1]].strip(" ,;.")
        neighbours = list(chunks)
        if number + 1 < len(clauses):
            following = clauses[number + 1][1]
            if low.startswith("which", following[0].start) and not any(c.findings for c in following):
                neighbours += following
        for index, chunk in enumerate(chunks):
            location = chunk.location
            # an interpretation of the previous located chunk shares its location: it opens with an
            # apposition/adjacency word ("..., likely atelectasis", "with adjacent atelectasis") or is only
            # hedged ("though infection is not excluded")
            interpretation = _INHERIT_OPENERS.match(chunk.text) or (chunk.findings and all(
                uncertain and not negated for _, negated, uncertain in chunk.findings))
            if previous and interpretation and not location.sides:
                zones = location.zones | previous.zones if location.zones - {"lung"} else set(previous.zones)
                if _ADJACENCY_OPENERS.match(chunk.text) and not (zones - {"lung"}):
                    zones.add("lower lung zone")
                location = _Location(set(previous.sides), zones, previous.singular, previous.first)
            for finding, negated, uncertain in chunk.findings:
                place = _place(finding, negated, location, neighbours, index, low)
                mentions += _mentions(finding, negated, uncertain, place, low, (chunk.start, chunk.end), phrase,
                                      sentence, section)
            if location:
                previous = location
    # a hedged restatement of a finding stated outright at the same place adds nothing
    # ("opacity in the right base, may indicate infiltrate")
    stated = {(m.finding, m.region) for m in mentions if m.present and not m.uncertain}
    mentions = [m for m in mentions if not (m.uncertain and m.present and (m.finding, m.region) in stated)]
    return list(dict.fromkeys(mentions))


def _mentions(finding: _Span, negated: bool, uncertain: bool, location: _Location, low: str, chunk: tuple[int, int],
              phrase: str, sentence: str, section: str | None) -> list[Mention]:
    return [
        Mention(finding=finding.label, region=region, present=not (negated or finding.absent), uncertain=uncertain,
                severity=_severity(low, chunk, finding), phrase=phrase, sentence=sentence, section=section,
                span=(finding.start, finding.end))
        for region in _regions_for(finding.label, location, plural=not negated and bool(_PAIRED_PLURAL.search(
            low, finding.start, finding.end)))
    ]


def parse_report(text: str) -> list[Mention]:
    """Parse a radiology report (MIMIC-CXR free text or IU-Xray sections, `XXXX` / `___` tokens allowed).

    Sections named in `SKIPPED_SECTIONS` (indication, history, comparison, technique, ...) are ignored;
    every other section is split into sentences and each sentence into clauses. One `Mention` per
    (finding, region) stated; a finding named on both sides ("bilateral effusions") gives one mention per
    side. Normal statements give absent findings ("the lungs are clear": lung opacity absent); those that
    name none ("no acute process") give no mention. Any string is accepted (no exception).
    """
    if not isinstance(text, str):
        return []
    mentions: list[Mention] = []
    for section, body in split_sections(text):
        if section in SKIPPED_SECTIONS:
            continue
        for sentence in split_sentences(body):
            mentions.extend(parse_sentence(sentence, section))
    return mentions

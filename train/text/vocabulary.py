"""The one table of what the project's words mean: findings (with their Chest ImaGenome category) and regions
(side, zone, mirror, plausible findings).

Everything that needs to know what a region or finding is reads it here: label generation (`train.text.region_texts`),
the phantom generator, evaluation (laterality uses `Region.mirror`). Adding a region is a `REGIONS` entry here
plus its name in the model config's `region_names`; a dataset whose scene graphs lack its box leaves it masked.
"""

from __future__ import annotations

from dataclasses import dataclass

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

# Chest ImaGenome label vocabulary (category -> labels), used to validate attribute strings.
IMAGENOME_VOCABULARY = {
    "anatomicalfinding": (
        "lung opacity", "airspace opacity", "consolidation", "infiltration", "atelectasis",
        "linear/patchy atelectasis", "lobar/segmental collapse", "pulmonary edema/hazy opacity",
        "vascular congestion", "vascular redistribution", "increased reticular markings/ild pattern",
        "pleural effusion", "costophrenic angle blunting", "pleural/parenchymal scarring", "bronchiectasis",
        "enlarged cardiac silhouette", "mediastinal displacement", "mediastinal widening", "enlarged hilum",
        "tortuous aorta", "vascular calcification", "pneumomediastinum", "pneumothorax", "hydropneumothorax",
        "lung lesion", "mass/nodule (not otherwise specified)", "multiple masses/nodules", "calcified nodule",
        "superior mediastinal mass/enlargement", "rib fracture", "clavicle fracture", "spinal fracture",
        "hyperaeration", "cyst/bullae", "elevated hemidiaphragm", "diaphragmatic eventration (benign)",
        "sub-diaphragmatic air", "subcutaneous air", "hernia", "scoliosis", "spinal degenerative changes",
        "shoulder osteoarthritis", "bone lesion",
    ),
    "nlp": ("abnormal", "normal"),
    "disease": (
        "pneumonia", "fluid overload/heart failure", "copd/emphysema", "granulomatous disease",
        "interstitial lung disease", "goiter", "lung cancer", "aspiration", "alveolar hemorrhage",
        "pericardial effusion",
    ),
    "technicalassessment": ("low lung volumes", "rotated", "artifact", "breast/nipple shadows", "skin fold"),
    "tubesandlines": (
        "chest tube", "mediastinal drain", "pigtail catheter", "endotracheal tube", "tracheostomy tube", "picc",
        "ij line", "chest port", "subclavian line", "swan-ganz catheter", "intra-aortic balloon pump",
        "enteric tube",
    ),
    "device": ("sternotomy wires", "cabg grafts", "aortic graft/repair", "prosthetic valve", "cardiac pacer and wires"),
}

_LUNG_FINDINGS = (
    "lung opacity", "airspace opacity", "consolidation", "atelectasis", "pulmonary edema/hazy opacity", "pneumothorax",
    "mass/nodule (not otherwise specified)", "calcified nodule", "pneumonia", "lung lesion",
)
_LINES = ("picc", "ij line", "subclavian line", "chest port", "swan-ganz catheter")
_PLAUSIBLE: dict[str, tuple[str, ...]] = {
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


@dataclass(frozen=True)
class Region:
    """One anatomical region.

    Attributes:
        name: the Chest ImaGenome box name ("right costophrenic angle").
        side: "right" / "left" (the patient's) or None for midline regions.
        zone: the name without its side ("costophrenic angle"); the parser's zone words map to it.
        mirror: the same zone on the other side, or None: laterality is scored over (region, mirror) pairs.
        findings: findings plausible there (Chest ImaGenome labels): the candidates of attribute-based negatives
            "<finding> in the <region>" when the region has no findings.
    """

    name: str
    side: str | None
    zone: str
    mirror: str | None
    findings: tuple[str, ...] = ()


def _region(name: str) -> Region:
    side = next((s for s in ("right", "left") if name.startswith(s + " ")), None)
    zone = name[len(side) + 1:] if side else name
    other = {"right": "left", "left": "right"}.get(side)
    # "right atrium" has a side in its name but no mirror region
    mirror = f"{other} {zone}" if other and f"{other} {zone}" in _PLAUSIBLE else None
    return Region(name, side, zone, mirror, _PLAUSIBLE[name])


REGIONS: dict[str, Region] = {name: _region(name) for name in _PLAUSIBLE}


def region(name: str) -> Region:
    """The vocabulary entry of region `name`; a name that is not in `REGIONS` is an error saying where to add it."""
    try:
        return REGIONS[name]
    except KeyError:
        raise KeyError(f"region {name!r} is not in train.text.vocabulary.REGIONS: add a Region entry there "
                       f"(side, zone, mirror, plausible findings)") from None


def check_regions(names) -> None:
    """Every name of a model config's `region_names` must be in the vocabulary (called before training)."""
    for name in names:
        region(name)


def plausible_findings(name: str) -> tuple[str, ...]:
    return region(name).findings


def mirror_pairs(names) -> list[tuple[int, int]]:
    """(index of a right-side region, index of its left mirror) for each pair present in `names`."""
    index = {n: i for i, n in enumerate(names)}
    return [(i, index[REGIONS[n].mirror]) for i, n in enumerate(names)
            if n in REGIONS and REGIONS[n].side == "right" and REGIONS[n].mirror in index]


def parse_attribute(attribute: str) -> tuple[str, bool, str]:
    """A scene-graph attribute string "category|yes|label" -> (category, present, label); anything else is a
    `ValueError` naming the string."""
    parts = attribute.split("|", 2) if isinstance(attribute, str) else ()
    if len(parts) != 3 or parts[1] not in ("yes", "no"):
        raise ValueError(f"attribute {attribute!r} is not 'category|yes|label' or 'category|no|label'")
    return parts[0], parts[1] == "yes", parts[2]


def format_attribute(label: str, present: bool, category: str | None = None) -> str:
    """(label, present) -> "category|yes|label", the category from `FINDING_CATEGORY` unless given."""
    return f"{category or FINDING_CATEGORY[label]}|{'yes' if present else 'no'}|{label}"

"""The report written from the drawn findings, its CheXpert labels, and the Chest ImaGenome scene graph."""

from __future__ import annotations

from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS
from train.data.phantom.findings import Finding
from train.text.vocabulary import FINDING_CATEGORY

CHEXPERT_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)

SIZE_WORD = {"mild": "small", "moderate": "moderate", "severe": "large"}
ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}

ZONE_TEXT = {
    "upper lung zone": ("{side} upper lung", "{side} upper lobe", "{side} upper lung zone"),
    "mid lung zone": ("{side} mid lung", "{side} mid lung zone", "{side} perihilar region"),
    "lower lung zone": ("{side} lung base", "{side} lower lung", "{side} lower lobe", "{side} lower lung zone"),
}


class _Sentence:
    def __init__(self, text, section, regions=(), attrs=(), severity=(), texture=(), chexpert=None, uncertain=False):
        self.text, self.section = text, section
        self.regions, self.attrs = list(regions), list(attrs)
        self.severity, self.texture = list(severity), list(texture)
        self.chexpert = chexpert or {}
        self.uncertain = uncertain


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def _finding_sentences(rng, label, group: list[Finding], spec) -> tuple[_Sentence, _Sentence]:
    """(findings-section sentence, impression sentence) for one finding (all its instances)."""
    f0 = group[0]
    sev = f0.severity
    sides = sorted({f.side for f in group if f.side}, key=["right", "left"].index)
    side = "bilateral" if len(sides) == 2 else (sides[0] if sides else "")
    regions = []
    for f in group:
        regions += [r for r in f.regions if r not in regions]
    yes = [f"{FINDING_CATEGORY[label]}|yes|{label}", "nlp|yes|abnormal"]
    sev_cue = [f"severity|yes|{sev}"] if sev else []
    uncertain = False
    cx = {}
    if label in ("lung opacity", "consolidation"):
        zone = f0.region.split(" ", 1)[1]
        loc = _choice(rng, ZONE_TEXT[zone]).format(side=f0.side)
        if label == "lung opacity":
            options = [
                ("{Sev} opacity in the {loc}.", False, False),
                ("There is a {sev} patchy opacity in the {loc}.", False, False),
                ("{Sev} hazy opacity is seen in the {loc}.", False, False),
                ("Possible {sev} opacity in the {loc}.", True, False),
                ("{Sev} opacity in the {loc} may represent early pneumonia.", True, True),
            ]
            texture = ["texture|yes|patchy"]
            cx = {"Lung Opacity": 1.0}
        else:
            options = [
                ("{Sev} consolidation in the {loc}.", False, False),
                ("There is {sev} consolidation in the {loc}, concerning for pneumonia.", False, True),
                ("Focal {sev} airspace consolidation is present in the {loc}.", False, False),
                ("Possible {sev} consolidation in the {loc}.", True, False),
            ]
            texture = []
            cx = {"Consolidation": 1.0}
        tpl, uncertain, pneu = options[int(rng.integers(len(options)))]
        text = tpl.format(Sev=_cap(sev), sev=sev, loc=loc)
        attrs = yes + (["disease|yes|pneumonia"] if pneu else [])
        if pneu:
            cx["Pneumonia"] = -1.0
        imp = _Sentence(f"{_cap(sev)} {label} in the {loc}" + (", possibly pneumonia." if pneu else "."), "impression",
                        regions, attrs, sev_cue, texture, uncertain=uncertain)
        find = _Sentence(text, "findings", regions, attrs, sev_cue, texture, uncertain=uncertain)
    elif label == "pleural effusion":
        size = SIZE_WORD[sev]
        if side == "bilateral":
            options = [f"{_cap(size)} bilateral pleural effusions.", f"There are {size} bilateral pleural effusions.",
                       f"Bilateral pleural effusions, {size} in size, with blunting of the costophrenic angles."]
        else:
            options = [f"{_cap(size)} {side} pleural effusion.",
                       f"There is a {size} {side} pleural effusion with blunting of the {side} costophrenic angle.",
                       f"{_cap(side)} pleural effusion, {size} in size.",
                       f"A {size} {side} pleural effusion may be present."]
        text = _choice(rng, options)
        uncertain = "may be" in text
        find = _Sentence(text, "findings", regions, yes, [f"severity|yes|{sev}"], [], uncertain=uncertain)
        # costophrenic angles also get blunting
        find.extra = {r: ["anatomicalfinding|yes|costophrenic angle blunting"] for r in regions if "costophrenic" in r}
        imp_text = f"{_cap(size)} {'bilateral pleural effusions' if side == 'bilateral' else side + ' pleural effusion'}."
        imp = _Sentence(imp_text, "impression", regions, yes, [f"severity|yes|{sev}"], [])
        imp.extra = find.extra
        cx = {"Pleural Effusion": -1.0 if uncertain else 1.0}
    elif label == "pneumothorax":
        size = SIZE_WORD[sev]
        options = [f"{_cap(size)} {side} apical pneumothorax.", f"There is a {size} {side} pneumothorax.",
                   f"A {side} pneumothorax is present, {size} in size.",
                   f"{_cap(size)} {side} pneumothorax with a visible pleural line."]
        text = _choice(rng, options)
        find = _Sentence(text, "findings", regions, yes, [f"severity|yes|{sev}"], [])
        imp = _Sentence(f"{_cap(size)} {side} pneumothorax.", "impression", regions, yes, [f"severity|yes|{sev}"], [])
        cx = {"Pneumothorax": 1.0}
    elif label == "atelectasis":
        zone = f0.region.split(" ", 1)[1]
        loc = _choice(rng, ZONE_TEXT[zone]).format(side=f0.side)
        options = [(f"{_cap(sev)} linear atelectasis in the {loc}.", False),
                   (f"Plate-like atelectasis in the {loc}, {sev}.", False),
                   (f"Streaky opacity in the {loc} likely reflects {sev} atelectasis.", True),
                   (f"There is {sev} subsegmental atelectasis in the {loc}.", False)]
        text, uncertain = options[int(rng.integers(len(options)))]
        find = _Sentence(text, "findings", regions, yes, sev_cue, ["texture|yes|linear"], uncertain=uncertain)
        imp = _Sentence(f"{_cap(sev)} atelectasis in the {loc}.", "impression", regions, yes, sev_cue, ["texture|yes|linear"])
        cx = {"Atelectasis": 1.0}
    elif label == "enlarged cardiac silhouette":
        adv = ADVERB[sev]
        text = _choice(rng, [f"The heart is {adv} enlarged.", f"{_cap(sev)} cardiomegaly.",
                             f"The cardiac silhouette is {adv} enlarged.", f"Heart size is {adv} enlarged."])
        find = _Sentence(text, "findings", regions, yes, sev_cue, [])
        imp = _Sentence(f"{_cap(sev)} cardiomegaly.", "impression", regions, yes, sev_cue, [])
        cx = {"Cardiomegaly": 1.0}
    elif label == "mass/nodule (not otherwise specified)":
        zone = f0.region.split(" ", 1)[1]
        loc = _choice(rng, ZONE_TEXT[zone]).format(side=f0.side)
        size = spec.get("size", "small")
        options = [(f"A {size} nodule is seen in the {loc}.", False),
                   (f"{_cap(size)} nodular opacity in the {loc} may represent a pulmonary nodule.", True),
                   (f"There is a {size} rounded density in the {loc}, possibly a mass.", True),
                   (f"{_cap(size)} well-circumscribed nodule in the {loc}.", False)]
        text, uncertain = options[int(rng.integers(len(options)))]
        find = _Sentence(text, "findings", regions, yes, [], [], uncertain=uncertain)
        imp = _Sentence(f"{_cap(size)} {f0.side} lung nodule; recommend CT for further evaluation.", "impression",
                        regions, yes, [], [])
        cx = {"Lung Lesion": -1.0 if uncertain else 1.0}
    elif label == "calcified nodule":  # incidental: named in the findings section only
        zone = f0.region.split(" ", 1)[1]
        loc = _choice(rng, ZONE_TEXT[zone]).format(side=f0.side)
        text = _choice(rng, [f"Calcified nodule in the {loc}.", f"A small calcified nodule is seen in the {loc}.",
                             f"There is a punctate calcified nodule in the {loc}."])
        find = _Sentence(text, "findings", regions, yes, [], [])
        imp = None
        cx = {"Lung Lesion": 1.0}
    elif label == "elevated hemidiaphragm":
        text = _choice(rng, [f"Elevation of the {side} hemidiaphragm.", f"The {side} hemidiaphragm is elevated.",
                             f"There is mild elevation of the {side} hemidiaphragm.",
                             f"Elevated {side} hemidiaphragm, possibly due to eventration."])
        uncertain = "possibly" in text
        find = _Sentence(text, "findings", regions, yes, [], [], uncertain=uncertain)
        imp = _Sentence(f"Elevated {side} hemidiaphragm.", "impression", regions, yes, [], [])
    elif label == "pulmonary edema/hazy opacity":
        options = [(f"{_cap(sev)} pulmonary edema.", False),
                   (f"There is {sev} bilateral perihilar haziness consistent with pulmonary edema.", False),
                   (f"Bilateral hazy perihilar opacities may represent {sev} pulmonary edema.", True),
                   (f"Findings are suggestive of {sev} interstitial edema.", True)]
        text, uncertain = options[int(rng.integers(len(options)))]
        find = _Sentence(text, "findings", regions, yes, sev_cue, ["texture|yes|hazy"], uncertain=uncertain)
        imp = _Sentence(f"{_cap(sev)} pulmonary edema.", "impression", regions, yes, sev_cue, [])
        cx = {"Edema": -1.0 if uncertain else 1.0}
    elif label == "scoliosis":
        convex = "dextro" if spec.get("convex", 1) < 0 else "levo"  # convex to the patient's right = image left
        text = _choice(rng, [f"{_cap(sev)} scoliosis of the thoracic spine.", f"There is {sev} {convex}convex scoliosis.",
                             f"The thoracic spine demonstrates {sev} scoliosis."])
        find = _Sentence(text, "findings", regions, yes, sev_cue, [])
        imp = None
    elif label == "endotracheal tube":
        cm = max(2.0, min(6.0, float(spec.get("tip_cm", 4.0))))
        text = _choice(rng, [f"Endotracheal tube terminates {cm:.1f} cm above the carina.",
                             f"An endotracheal tube is in place with the tip approximately {cm:.1f} cm above the carina.",
                             "The endotracheal tube is in standard position above the carina."])
        attrs = [f"tubesandlines|yes|{label}"]
        find = _Sentence(text, "findings", regions, attrs, [], [])
        imp = _Sentence("Endotracheal tube in appropriate position.", "impression", regions, attrs, [], [])
        cx = {"Support Devices": 1.0}
    elif label == "enteric tube":
        text = _choice(rng, ["An enteric tube courses below the diaphragm with the tip in the stomach.",
                             "Enteric tube tip is in the stomach.",
                             "A nasogastric tube extends into the stomach."])
        attrs = [f"tubesandlines|yes|{label}"]
        find = _Sentence(text, "findings", regions, attrs, [], [])
        imp = None
        cx = {"Support Devices": 1.0}
    else:  # pragma: no cover
        raise ValueError(label)
    for f in group:
        f.uncertain = uncertain
    find.chexpert = cx
    return find, imp


def _negations(rng, findings: list[Finding]) -> list[_Sentence]:
    labels = {f.label for f in findings}
    lung_labels = {"lung opacity", "consolidation", "atelectasis", "pleural effusion", "pneumothorax",
                   "mass/nodule (not otherwise specified)", "pulmonary edema/hazy opacity", "calcified nodule"}
    out = []
    both = ["right lung", "left lung"]
    if not labels & lung_labels:
        out.append(_Sentence(_choice(rng, ["The lungs are clear.", "Lungs are clear bilaterally.",
                                           "The lungs are well expanded and clear."]),
                             "findings", both, ["anatomicalfinding|no|lung opacity", "nlp|yes|normal"]))
    elif "consolidation" not in labels and rng.random() < 0.7:
        out.append(_Sentence(_choice(rng, ["No focal consolidation.", "There is no focal consolidation."]), "findings",
                             both, ["anatomicalfinding|no|consolidation"], chexpert={"Consolidation": 0.0}))
    if "pneumothorax" not in labels:
        out.append(_Sentence(_choice(rng, ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."]),
                             "findings", both, ["anatomicalfinding|no|pneumothorax"], chexpert={"Pneumothorax": 0.0}))
    else:
        side = next(f.side for f in findings if f.label == "pneumothorax")
        other = "left" if side == "right" else "right"
        if rng.random() < 0.5:
            out.append(_Sentence(f"No {other} pneumothorax.", "findings", [f"{other} lung"],
                                 ["anatomicalfinding|no|pneumothorax"]))
    if "pleural effusion" not in labels:
        if rng.random() < 0.5:
            out.append(_Sentence(_choice(rng, ["No pleural effusion.", "There is no pleural effusion.",
                                               "No pleural effusions."]), "findings", both,
                                 ["anatomicalfinding|no|pleural effusion"], chexpert={"Pleural Effusion": 0.0}))
        else:
            out.append(_Sentence("The costophrenic angles are sharp without pleural effusion.", "findings",
                                 ["right costophrenic angle", "left costophrenic angle", "right lung", "left lung"],
                                 ["anatomicalfinding|no|costophrenic angle blunting",
                                  "anatomicalfinding|no|pleural effusion", "nlp|yes|normal"],
                                 chexpert={"Pleural Effusion": 0.0}))
    elif not any(f.label == "pleural effusion" and f.bilateral for f in findings):
        side = next(f.side for f in findings if f.label == "pleural effusion")
        other = "left" if side == "right" else "right"
        if rng.random() < 0.6:
            out.append(_Sentence(f"No {other} pleural effusion.", "findings", [f"{other} lung"],
                                 ["anatomicalfinding|no|pleural effusion"]))
    if "pulmonary edema/hazy opacity" not in labels and rng.random() < 0.4:
        out.append(_Sentence(_choice(rng, ["No pulmonary edema.", "There is no evidence of pulmonary edema."]),
                             "findings", both, ["anatomicalfinding|no|pulmonary edema/hazy opacity"],
                             chexpert={"Edema": 0.0}))
    if "enlarged cardiac silhouette" not in labels:
        if rng.random() < 0.5:
            out.insert(0, _Sentence(_choice(rng, ["Heart size is normal.", "The heart is normal in size.",
                                                  "The cardiac silhouette is within normal limits."]),
                                    "findings", ["cardiac silhouette"],
                                    ["anatomicalfinding|no|enlarged cardiac silhouette", "nlp|yes|normal"],
                                    chexpert={"Cardiomegaly": 0.0}))
        else:
            out.insert(0, _Sentence(_choice(rng, ["The cardiomediastinal silhouette is normal.",
                                                  "Cardiomediastinal contours are within normal limits."]),
                                    "findings", ["cardiac silhouette", "mediastinum"],
                                    ["anatomicalfinding|no|enlarged cardiac silhouette", "nlp|yes|normal"],
                                    chexpert={"Cardiomegaly": 0.0}))
    elif rng.random() < 0.5:
        out.append(_Sentence("The mediastinal contours are unremarkable.", "findings", ["mediastinum"], ["nlp|yes|normal"]))
    if rng.random() < 0.3:
        out.append(_Sentence("Hilar contours are normal.", "findings", ["right hilar structures", "left hilar structures"],
                             ["nlp|yes|normal"]))
    if "scoliosis" not in labels and rng.random() < 0.3:
        out.append(_Sentence("No acute osseous abnormality.", "findings", [], []))
    return out


INDICATIONS = (
    "___-year-old {sex} with shortness of breath.",
    "___-year-old {sex} with cough and fever, evaluate for pneumonia.",
    "History: ___{g} with chest pain.",
    "___-year-old {sex} with dyspnea, evaluate for effusion.",
    "Preoperative evaluation.",
    "___{g} with hypoxia.",
)


def write_report(rng, findings: list[Finding], specs, patient):
    sex = "woman" if patient["gender"] == "F" else "man"
    indication = _choice(rng, INDICATIONS).format(sex=sex, g=patient["gender"])
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.label, []).append(f)
    spec_of = {s["label"]: s for s in specs}
    positives, impressions = [], []
    for label, group in groups.items():
        find, imp = _finding_sentences(rng, label, group, spec_of.get(label, {}))
        positives.append(find)
        if imp is not None:
            impressions.append(imp)
    negs = _negations(rng, findings)
    body = positives + negs if rng.random() < 0.6 else negs[:1] + positives + negs[1:]
    if not impressions:
        if findings:  # only incidental findings (scoliosis, enteric tube, calcified nodule)
            impressions = [_Sentence("No acute cardiopulmonary process.", "impression")]
        else:
            impressions = [_Sentence(_choice(rng, ["No acute cardiopulmonary process.",
                                                   "No acute cardiopulmonary abnormality.",
                                                   "Normal chest radiograph."]), "impression")]
    sentences = body + impressions
    report = (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n\n"
        f" INDICATION:  {indication}\n\n"
        " COMPARISON:  None.\n\n"
        " FINDINGS:\n \n"
        " " + " ".join(s.text for s in body) + "\n \n"
        " IMPRESSION:\n \n"
        " " + " ".join(s.text for s in impressions) + "\n"
    )
    chexpert: dict[str, float | None] = {c: None for c in CHEXPERT_COLUMNS}
    for s in negs:
        chexpert.update(s.chexpert)
    for s in positives:
        for k, v in s.chexpert.items():
            if chexpert.get(k) != 1.0:
                chexpert[k] = v
    pathology = [c for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices") and chexpert[c] in (1.0, -1.0)]
    if not pathology and not any(f.label not in ("endotracheal tube", "enteric tube") for f in findings):
        chexpert["No Finding"] = 1.0
    return report, sentences, chexpert


def _object_name(bbox_name: str) -> str:
    return "SVC" if bbox_name == "svc" else _cap(bbox_name)


def build_scene_graph(dicom_id, subject_id, study_id, patient, boxes, W, H, sentences, rng) -> dict:
    scale = 224.0 / max(W, H)
    pad_x, pad_y = (224.0 - W * scale) / 2, (224.0 - H * scale) / 2
    objects = []
    for name in ANATOMICAL_REGIONS:
        x1, y1, x2, y2 = boxes[name]
        sx1, sy1 = int(round(x1 * scale + pad_x)), int(round(y1 * scale + pad_y))
        sx2, sy2 = int(round(x2 * scale + pad_x)), int(round(y2 * scale + pad_y))
        objects.append({
            "object_id": f"{dicom_id}_{name}", "x1": sx1, "y1": sy1, "x2": sx2, "y2": sy2,
            "width": sx2 - sx1, "height": sy2 - sy1, "bbox_name": name, "synsets": [], "name": _object_name(name),
            "original_x1": x1, "original_y1": y1, "original_x2": x2, "original_y2": y2,
            "original_width": x2 - x1, "original_height": y2 - y1,
        })
    per_region: dict[str, dict] = {}
    for s in sentences:
        extra = getattr(s, "extra", {})
        for region in s.regions:
            entry = per_region.setdefault(region, {
                "name": _object_name(region), "bbox_name": region, "synsets": [], "phrases": [], "attributes": [],
                "comparison_cues": [], "temporal_cues": [], "severity_cues": [], "texture_cues": [],
                "phrase_IDs": [], "sections": [],
            })
            attrs = list(s.attrs) + list(extra.get(region, []))
            if s.text in entry["phrases"]:
                k = entry["phrases"].index(s.text)
                entry["attributes"][k] = list(dict.fromkeys(entry["attributes"][k] + attrs))
                continue
            entry["phrases"].append(s.text)
            entry["attributes"].append(list(dict.fromkeys(attrs)))
            entry["comparison_cues"].append([])
            entry["temporal_cues"].append([])
            entry["severity_cues"].append(list(s.severity))
            entry["texture_cues"].append(list(s.texture))
            entry["phrase_IDs"].append(f"{study_id}|{sentences.index(s)}")
            entry["sections"].append("finalreport" if s.section == "findings" else "impression")
    attributes = [per_region[name] for name in ANATOMICAL_REGIONS if name in per_region]
    reasons = ("shortness of breath", "cough, fever", "chest pain", "dyspnea", "preoperative", "hypoxia")
    return {
        "image_id": dicom_id,
        "viewpoint": "PA",
        "patient_id": int(subject_id),
        "study_id": int(study_id),
        "gender": patient["gender"],
        "age_decile": patient["age_decile"],
        "reason_for_exam": _choice(rng, reasons),
        "StudyOrder": 1,
        "StudyDateTime": "",
        "objects": objects,
        "attributes": attributes,
        "relationships": [],
    }

"""Tests of the procedural phantom generator (train/data/phantom/)."""

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS, DEFAULT_FINDINGS
from train.data import phantom as P
from train.data.rle import chexmask_rle_decode as rle_decode, chexmask_rle_encode as rle_encode
from train.text.vocabulary import IMAGENOME_VOCABULARY

N_RENDER = 64
SEED = 3


@pytest.fixture(scope="module")
def phantoms():
    return [P.render_phantom(i, SEED) for i in range(N_RENDER)]


def _centre(box):
    return 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])


def _inside(inner, outer, tol=2):
    return (inner[0] >= outer[0] - tol and inner[1] >= outer[1] - tol
            and inner[2] <= outer[2] + tol and inner[3] <= outer[3] + tol)


def test_images_sizes_and_boxes_valid(phantoms):
    aspects = set()
    for ph in phantoms:
        H, W = ph.image.shape
        assert ph.image.dtype == np.uint8 and max(H, W) == 512
        assert 0.84 <= H / W <= 1.26
        aspects.add(round(H / W, 2))
        assert list(ph.boxes) == list(ANATOMICAL_REGIONS)
        for name, (x1, y1, x2, y2) in ph.boxes.items():
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, (ph.index, name, ph.boxes[name])
            assert x2 - x1 >= 2 and y2 - y1 >= 2
        assert ph.boxes_array().shape == (29, 4)
        # image is a radiograph: dark air/lungs, bright mediastinum, real contrast
        assert ph.image.std() > 25
        rl = ph.masks["right lung"]
        assert ph.image[rl].mean() + 30 < ph.image[ph.masks["heart"]].mean()
    assert len(aspects) > 10  # aspect ratio varies


def test_anatomy_nests(phantoms):
    for ph in phantoms:
        b = ph.boxes
        for side in ("right", "left"):
            lung = b[f"{side} lung"]
            assert lung == P.mask_box(ph.masks[f"{side} lung"])
            zones = [b[f"{side} {z} lung zone"] for z in ("upper", "mid", "lower")]
            for name in ("upper lung zone", "mid lung zone", "lower lung zone", "apical zone"):
                assert _inside(b[f"{side} {name}"], lung), (ph.index, side, name)
            assert zones[0][1] <= lung[1] + 2 and zones[2][3] >= lung[3] - 2
            assert _centre(zones[0])[1] < _centre(zones[1])[1] < _centre(zones[2])[1]
            assert zones[0][3] <= zones[1][1] + 2 and zones[1][3] <= zones[2][1] + 2
            apical = b[f"{side} apical zone"]
            assert abs(apical[1] - lung[1]) <= 2 and apical[3] <= zones[1][1]
            cp = b[f"{side} costophrenic angle"]
            assert _centre(cp)[1] > _centre(zones[1])[1]  # at the base
            hemi = b[f"{side} hemidiaphragm"]
            assert _centre(hemi)[1] > _centre(lung)[1]
            hil = b[f"{side} hilar structures"]
            assert lung[1] < _centre(hil)[1] < lung[3]
        # patient's right = image left
        rl, ll = b["right lung"], b["left lung"]
        assert _centre(rl)[0] < _centre(ll)[0]
        for name in ("upper lung zone", "hilar structures", "costophrenic angle", "hemidiaphragm", "apical zone"):
            assert _centre(b[f"right {name}"])[0] < _centre(b[f"left {name}"])[0]
        assert _centre(b["right clavicle"])[0] < _centre(b["left clavicle"])[0]
        # cardiac silhouette between the lung centres, mostly on image right
        heart = b["cardiac silhouette"]
        assert _centre(rl)[0] < _centre(heart)[0] < _centre(ll)[0]
        # trachea / carina / aortic arch / svc / right atrium
        tr, car = b["trachea"], b["carina"]
        assert car[1] > tr[1] and _centre(car)[1] > _centre(tr)[1]
        assert tr[0] - 10 < _centre(car)[0] < tr[2] + 10
        assert _centre(b["aortic arch"])[0] > _centre(tr)[0]  # knob left of trachea = image right
        assert _centre(b["svc"])[0] < _centre(tr)[0]
        assert _centre(b["right atrium"])[0] < _centre(heart)[0]
        assert _centre(b["cavoatrial junction"])[0] < _centre(heart)[0]
        assert _inside(b["upper mediastinum"], b["mediastinum"], tol=0)
        assert _inside(heart, b["mediastinum"], tol=0)
        # abdomen below both hemidiaphragms
        ab = b["abdomen"]
        for side in ("right", "left"):
            hemi = b[f"{side} hemidiaphragm"]
            assert ab[1] >= hemi[1] and _centre(ab)[1] > _centre(hemi)[1]
        # spine spans the image top to (near) the bottom
        sp = b["spine"]
        assert sp[1] <= 0.05 * ph.height and sp[3] >= 0.9 * ph.height


def test_findings_masks_inside_their_regions(phantoms):
    n_normal = 0
    labels = set()
    for ph in phantoms:
        if not ph.findings:
            n_normal += 1
        assert set(ph.masks) >= {"right lung", "left lung", "heart"}
        for f in ph.findings:
            labels.add(f.label)
            assert f.label in DEFAULT_FINDINGS
            assert f.region in ANATOMICAL_REGIONS and f.region in f.regions
            mask = ph.masks[f.mask_key]
            assert mask.shape == ph.image.shape and mask.sum() >= 4
            x1, y1, x2, y2 = ph.boxes[f.region]
            assert not mask[:y1].any() and not mask[y2:].any()
            assert not mask[:, :x1].any() and not mask[:, x2:].any()
            if f.side:
                assert f.side in f.region or f.region in ("spine",)
                assert any(r == f"{f.side} lung" for r in f.regions) or "hemidiaphragm" in f.region
            if f.severity is not None:
                assert f.severity in ("mild", "moderate", "severe")
            if f.label == "enlarged cardiac silhouette":
                assert (mask == ph.masks["heart"]).mean() > 0.99
    assert 0.15 <= n_normal / len(phantoms) <= 0.55
    assert len(labels) >= 8


def test_drawn_findings_change_pixels():
    # consolidation in a lung zone must be brighter than the same patient's lung elsewhere
    found = 0
    for i in range(200):
        ph = P.render_phantom(i, 11)
        for f in ph.findings:
            if f.label in ("consolidation", "pleural effusion"):
                lung = ph.masks[f"{f.side} lung"] & ~ph.masks[f.mask_key]
                m = ph.masks[f.mask_key]
                if m.sum() > 200 and lung.sum() > 200:
                    assert ph.image[m].mean() > ph.image[lung].mean() + 5
                    found += 1
        if found >= 4:
            break
    assert found >= 4


def test_determinism():
    a, b = P.render_phantom(5, 123), P.render_phantom(5, 123)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.report == b.report and json.dumps(a.scene_graph) == json.dumps(b.scene_graph)
    assert a.boxes == b.boxes
    c = P.render_phantom(5, 124)
    assert c.image.shape != a.image.shape or c.image.tobytes() != a.image.tobytes()
    d = P.render_phantom(6, 123)
    assert d.dicom_id != a.dicom_id


def test_reports(phantoms):
    negation_seen = uncertain_seen = False
    for ph in phantoms:
        r = ph.report
        assert "FINDINGS:" in r and "IMPRESSION:" in r and r.index("FINDINGS:") < r.index("IMPRESSION:")
        assert "XXXX" not in r
        negation_seen |= bool(re.search(r"\bNo (pneumothorax|pleural effusion|focal consolidation)|There is no", r))
        uncertain_seen |= bool(re.search(r"\b(possible|Possible|may represent|possibly)\b", r))
        findings_text = r.split("IMPRESSION:")[0]
        for f in ph.findings:
            if f.side and not f.bilateral and f.label not in ("scoliosis",):
                assert f.side in findings_text.lower()
            if f.bilateral:
                assert "bilateral" in r.lower() or "edema" in r.lower()
        if not ph.findings:
            assert re.search(r"clear|normal|No acute", r)
    assert negation_seen and uncertain_seen


ATTR_RE = re.compile(r"^([a-z]+)\|(yes|no)\|(.+)$")


def test_scene_graphs(phantoms):
    for ph in phantoms:
        sg = json.loads(json.dumps(ph.scene_graph))
        for key in ("image_id", "patient_id", "study_id", "viewpoint", "gender", "age_decile", "reason_for_exam",
                    "objects", "attributes", "relationships"):
            assert key in sg
        assert sg["image_id"] == ph.dicom_id and sg["viewpoint"] == "PA"
        assert [o["bbox_name"] for o in sg["objects"]] == list(ANATOMICAL_REGIONS)
        for o in sg["objects"]:
            assert o["object_id"] == f"{ph.dicom_id}_{o['bbox_name']}"
            assert (o["original_x1"], o["original_y1"], o["original_x2"], o["original_y2"]) == ph.boxes[o["bbox_name"]]
            assert o["original_width"] == o["original_x2"] - o["original_x1"]
            assert 0 <= o["x1"] < o["x2"] <= 224 and 0 <= o["y1"] < o["y2"] <= 224
            assert o["width"] == o["x2"] - o["x1"] and o["height"] == o["y2"] - o["y1"]
        for entry in sg["attributes"]:
            assert entry["bbox_name"] in ANATOMICAL_REGIONS
            n = len(entry["phrases"])
            assert n >= 1
            for key in ("attributes", "comparison_cues", "temporal_cues", "severity_cues", "texture_cues"):
                assert len(entry[key]) == n
            for phrase, attrs in zip(entry["phrases"], entry["attributes"]):
                assert phrase in ph.report
                for a in attrs:
                    m = ATTR_RE.match(a)
                    assert m, a
                    assert m.group(3) in IMAGENOME_VOCABULARY[m.group(1)], a
        by_region = {e["bbox_name"]: e for e in sg["attributes"]}
        for f in ph.findings:  # every finding is attributed (yes) to its region and its lung
            for region in f.regions:
                flat = [a for attrs in by_region[region]["attributes"] for a in attrs]
                assert any(a.endswith(f"|yes|{f.label}") for a in flat), (region, f.label)
        labels = {f.label for f in ph.findings}
        if "pneumothorax" not in labels and "No pneumothorax." in ph.report:
            for side in ("right lung", "left lung"):
                flat = [a for attrs in by_region[side]["attributes"] for a in attrs]
                assert "anatomicalfinding|no|pneumothorax" in flat


def test_rle_roundtrip():
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (64, 48), (1, 1)):
        m = rng.random(shape) > 0.5
        m[0, 0] = True
        m[-1, -1] = True
        assert np.array_equal(rle_decode(rle_encode(m), *shape), m)
    m = np.zeros((3, 4), dtype=bool)
    m[0, 1:3] = True
    m[2, 3] = True
    assert rle_encode(m) == "2 2 12 1"  # 1-based starts, row-major
    assert rle_encode(np.zeros((4, 4), bool)) == ""
    assert not rle_decode("", 4, 4).any()
    ph = P.render_phantom(0, 0)
    lung = ph.masks["left lung"]
    assert np.array_equal(rle_decode(rle_encode(lung), *lung.shape), lung)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_generate_dataset_layout_and_cache(tmp_path, capsys):
    n = 24
    out = P.generate_dataset(tmp_path / "ph", n=n, seed=7, size=256, workers=1, progress=False)
    meta = _read_csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")
    assert len(meta) == n and list(meta[0]) == list(P.METADATA_COLUMNS)
    split = _read_csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv")
    chex = _read_csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv")
    assert list(chex[0]) == ["subject_id", "study_id", *P.CHEXPERT_COLUMNS]
    assert {r["split"] for r in split} <= {"train", "validate", "test"}
    assert len({r["dicom_id"] for r in meta}) == n and len({r["study_id"] for r in meta}) == n
    assert {r["study_id"] for r in chex} == {r["study_id"] for r in meta}
    subj_split = {}
    for r in split:  # split by subject
        assert subj_split.setdefault(r["subject_id"], r["split"]) == r["split"]
    cm = {r["dicom_id"]: r for r in _read_csv(out / "chexmask/MIMIC-CXR-JPG.csv")}
    assert list(next(iter(cm.values()))) == list(P.CHEXMASK_COLUMNS)
    ig = {}
    for name in ("train", "valid", "test"):
        for r in _read_csv(out / f"chest-imagenome/silver_dataset/splits/{name}.csv"):
            ig[r["dicom_id"]] = (name, r)
    assert len(ig) == n
    mimic_to_ig = {"train": "train", "validate": "valid", "test": "test"}
    for r in meta:
        sid, stid, did = r["subject_id"], r["study_id"], r["dicom_id"]
        assert re.fullmatch(r"1\d{7}", sid) and re.fullmatch(r"5\d{7}", stid)
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", did)
        jpg = out / f"mimic-cxr-jpg/files/p{sid[:2]}/p{sid}/s{stid}/{did}.jpg"
        with Image.open(jpg) as im:
            assert im.mode == "L" and im.size == (int(r["Columns"]), int(r["Rows"])) and max(im.size) == 256
        report = (out / f"mimic-cxr-reports/files/p{sid[:2]}/p{sid}/s{stid}.txt").read_text()
        assert "FINDINGS:" in report
        sg = json.loads((out / f"chest-imagenome/silver_dataset/scene_graph/{did}_SceneGraph.json").read_text())
        assert sg["image_id"] == did and str(sg["study_id"]) == stid and str(sg["patient_id"]) == sid
        split_name = next(s["split"] for s in split if s["dicom_id"] == did)
        assert ig[did][0] == mimic_to_ig[split_name]
        assert ig[did][1]["path"] == f"files/p{sid[:2]}/p{sid}/s{stid}/{did}.dcm"
        masks = P.load_masks(out / f"phantom/masks/{did}.npz")
        H, W = int(r["Rows"]), int(r["Columns"])
        assert np.array_equal(rle_decode(cm[did]["Left Lung"], H, W), masks["left lung"])
        assert np.array_equal(rle_decode(cm[did]["Right Lung"], H, W), masks["right lung"])
        assert np.array_equal(rle_decode(cm[did]["Heart"], H, W), masks["heart"])
        assert (int(cm[did]["Height"]), int(cm[did]["Width"])) == (H, W)
        lungs_box = P.mask_box(masks["right lung"])
        right = next(o for o in sg["objects"] if o["bbox_name"] == "right lung")
        assert lungs_box == (right["original_x1"], right["original_y1"], right["original_x2"], right["original_y2"])
        with np.load(out / f"phantom/masks/{did}.npz") as z:
            assert len(z["finding_labels"]) == sum(k.startswith("finding_") for k in masks)
    avoid = _read_csv(out / "chest-imagenome/silver_dataset/splits/images_to_avoid.csv")
    test_ids = {d for d, (s, _) in ig.items() if s == "test"}
    assert {r["dicom_id"] for r in avoid} <= test_ids
    manifest = json.loads((out / "phantom/manifest.json").read_text())
    assert manifest["complete"] and manifest["n"] == n and manifest["seed"] == 7 and manifest["size"] == 256

    # cached: nothing rewritten
    jpg0 = next((out / "mimic-cxr-jpg/files").rglob("*.jpg"))
    mtime = jpg0.stat().st_mtime_ns
    capsys.readouterr()
    P.generate_dataset(out, n=n, seed=7, size=256, workers=1, progress=False)
    assert "cached" in capsys.readouterr().out
    assert jpg0.stat().st_mtime_ns == mtime
    # different seed: regenerated fresh, old files gone
    P.generate_dataset(out, n=8, seed=8, size=256, workers=1, progress=False)
    assert not jpg0.exists()
    assert len(list((out / "mimic-cxr-jpg/files").rglob("*.jpg"))) == 8
    assert len(_read_csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")) == 8


def test_workers_give_identical_output(tmp_path):
    a = P.generate_dataset(tmp_path / "a", n=12, seed=2, size=128, workers=1, progress=False)
    b = P.generate_dataset(tmp_path / "b", n=12, seed=2, size=128, workers=2, progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "manifest.json")
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files_a == files_b and len(files_a) > 12 * 4
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_ids_unique_and_split_fractions():
    ids = [P.make_ids(0, i) for i in range(4000)]
    assert len({i[1] for i in ids}) == 4000 and len({i[2] for i in ids}) == 4000
    assert len({i[0] for i in ids}) == 2000  # two studies per subject
    splits = [P.split_of(0, i) for i in range(4000)]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "validate", "test")}
    assert 0.74 < frac["train"] < 0.86 and 0.06 < frac["validate"] < 0.14 and 0.06 < frac["test"] < 0.14


def test_incidental_calcified_nodule_is_drawn_named_and_leaves_other_images_as_they_were(monkeypatch):
    from train.data.phantom import findings as phantom_findings
    from train.text.parser import parse_report

    rendered = [P.render_phantom(i, 3, 256) for i in range(60)]
    with_nodule = [ph for ph in rendered if any(f.label == "calcified nodule" for f in ph.findings)]
    assert 1 <= len(with_nodule) <= 15  # about 8 % of images
    for ph in with_nodule:
        nodule = next(f for f in ph.findings if f.label == "calcified nodule")
        assert nodule.region.endswith("lung zone") and nodule.regions[-1] == f"{nodule.side} lung"
        mask = ph.masks[nodule.mask_key]
        lung = ph.masks[f"{nodule.side} lung"] & ~mask
        assert 4 <= mask.sum() <= 80 and ph.image[mask].mean() > ph.image[lung].mean() + 40  # a small, dense dot
        sentence = next(s for s in re.split(r"(?<=\.)\s+", ph.report) if "calcified nodule" in s.lower())
        assert {(m.finding, m.present) for m in parse_report(sentence)} == {("calcified nodule", True)}
        flat = [a for e in ph.scene_graph["attributes"] if e["bbox_name"] == nodule.region for attrs in e["attributes"]
                for a in attrs]
        assert "anatomicalfinding|yes|calcified nodule" in flat
    # without incidental findings the generator draws exactly what it drew before they were added
    monkeypatch.setattr(phantom_findings, "INCIDENTAL_RATES", {})
    for index, ph in enumerate(rendered[:20]):
        again = P.render_phantom(index, 3, 256)
        same = again.image.tobytes() == ph.image.tobytes() and again.report == ph.report
        assert same == (index not in {nodule_image.index for nodule_image in with_nodule})

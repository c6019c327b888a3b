"""Chest ImaGenome + MIMIC-CXR-JPG loader on phantom data and on hand-broken copies of it."""

import functools
import csv
import json
import logging
import shutil

import numpy as np
import pytest

from modeling_anatomy_vlm import ANATOMICAL_REGIONS, DEFAULT_FINDINGS, AnatomyVLMConfig, AnatomyVLMImageProcessor, ImageLoadError
from train.data.common import make_transform, region_phrases_of
from train.data.imagenome import load_imagenome as load_imagenome_with

# The loaders take the regions and findings from the model config; these tests use the defaults.
DEFAULTS = AnatomyVLMConfig()
load_imagenome = functools.partial(load_imagenome_with, region_names=DEFAULTS.region_names, findings=DEFAULTS.findings)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _split_ids(root, name):
    return [r["dicom_id"] for r in _rows(root / "chest-imagenome/silver_dataset/splits" / f"{name}.csv")]


def _graph_path(root, dicom_id):
    return root / "chest-imagenome/silver_dataset/scene_graph" / f"{dicom_id}_SceneGraph.json"


@pytest.fixture
def phantom_copy(phantom_root, tmp_path):
    return shutil.copytree(phantom_root, tmp_path / "copy")


def test_rows_match_scene_graphs(phantom_root, dataset_cache):
    dataset = load_imagenome(phantom_root, "train")
    avoid = {r["dicom_id"] for r in _rows(phantom_root / "chest-imagenome/silver_dataset/splits/images_to_avoid.csv")}
    assert dataset["image_id"] == [i for i in _split_ids(phantom_root, "train") if i not in avoid]
    row = dataset[0]
    graph = json.loads(_graph_path(phantom_root, row["image_id"]).read_text())
    boxes = np.asarray(row["boxes"])
    assert boxes.shape == (29, 4)
    for obj in graph["objects"]:
        expected = [obj[k] for k in ("original_x1", "original_y1", "original_x2", "original_y2")]
        np.testing.assert_allclose(boxes[ANATOMICAL_REGIONS.index(obj["bbox_name"])], expected)
    metadata = {r["dicom_id"]: r for r in _rows(phantom_root / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")}
    assert (row["height"], row["width"]) == (int(metadata[row["image_id"]]["Rows"]), int(metadata[row["image_id"]]["Columns"]))
    assert row["report"].strip() and "FINDINGS" in row["report"].upper()
    # every phrase of the scene graph is kept with its attributes
    phrases = {(a["bbox_name"], p) for a in graph["attributes"] for p in a["phrases"]}
    assert {(r, p) for r, entries in region_phrases_of(row["region_phrases"]).items() for p, _ in entries} == phrases
    # labels agree with the attribute strings
    region_labels = np.asarray(row["region_labels"])
    for entry in graph["attributes"]:
        for attributes in entry["attributes"]:
            for attribute in attributes:
                _, answer, label = attribute.split("|")
                if label in DEFAULT_FINDINGS:
                    value = region_labels[ANATOMICAL_REGIONS.index(entry["bbox_name"]), DEFAULT_FINDINGS.index(label)]
                    assert value == 1 or (answer == "no" and value == 0)
                    assert row["global_labels"][DEFAULT_FINDINGS.index(label)] >= (1 if answer == "yes" else 0)


def test_images_to_avoid_skipped_only_when_asked(phantom_root, dataset_cache):
    avoid = {r["dicom_id"] for r in _rows(phantom_root / "chest-imagenome/silver_dataset/splits/images_to_avoid.csv")}
    assert avoid
    kept = load_imagenome(phantom_root, "test")
    every = load_imagenome(phantom_root, "test", skip_images_to_avoid=False)
    assert not avoid & set(kept["image_id"])
    assert set(every["image_id"]) - set(kept["image_id"]) == avoid & set(every["image_id"])


def test_second_load_reads_the_arrow_cache(phantom_root, dataset_cache, monkeypatch):
    first = load_imagenome(phantom_root, "validate")
    import train.data.imagenome as module

    def fail(*args):
        raise AssertionError("scene graphs parsed again")

    monkeypatch.setattr(module, "_parse_one", fail)
    second = load_imagenome(phantom_root, "validate")
    assert second["image_id"] == first["image_id"]
    assert second.features["image"].decode is False  # paths, not embedded bytes
    assert second[0]["image"]["bytes"] is None and second[0]["image"]["path"].endswith(".jpg")


def test_bad_boxes_clipped_dropped_and_counted(phantom_copy, dataset_cache, caplog):
    dicom_id = _split_ids(phantom_copy, "train")[0]
    path = _graph_path(phantom_copy, dicom_id)
    graph = json.loads(path.read_text())
    by_name = {o["bbox_name"]: o for o in graph["objects"]}
    by_name["right lung"]["original_x1"] = -40  # sticks out: clipped to 0
    by_name["trachea"]["original_x2"] = by_name["trachea"]["original_x1"]  # zero width: dropped
    graph["objects"] = [o for o in graph["objects"] if o["bbox_name"] != "spine"]  # missing
    path.write_text(json.dumps(graph))
    with caplog.at_level(logging.INFO, logger="anatomy_vlm.data"):
        row = load_imagenome(phantom_copy, "train")[0]
    boxes = np.asarray(row["boxes"])
    assert row["image_id"] == dicom_id
    assert boxes[ANATOMICAL_REGIONS.index("right lung"), 0] == 0
    assert np.isnan(boxes[ANATOMICAL_REGIONS.index("trachea")]).all()
    assert np.isnan(boxes[ANATOMICAL_REGIONS.index("spine")]).all()
    assert "boxes clipped 1" in caplog.text and "boxes dropped (no area) 1" in caplog.text
    assert "boxes missing 1" in caplog.text
    processor = AnatomyVLMImageProcessor(size=64)
    encoded = make_transform(processor)({k: [v] for k, v in row.items()})
    mask = encoded["box_mask"][0]
    assert not mask[ANATOMICAL_REGIONS.index("trachea")] and not mask[ANATOMICAL_REGIONS.index("spine")]
    assert int(mask.sum()) == 27


def test_a_region_named_twice_gets_the_union_of_its_boxes(phantom_copy, dataset_cache, caplog):
    dicom_id = _split_ids(phantom_copy, "train")[0]
    path = _graph_path(phantom_copy, dicom_id)
    graph = json.loads(path.read_text())
    heart = next(o for o in graph["objects"] if o["bbox_name"] == "cardiac silhouette")
    x1, y1, x2, y2 = (heart[k] for k in ("original_x1", "original_y1", "original_x2", "original_y2"))
    graph["objects"].append({**heart, "original_x1": x1 + 5, "original_y1": y1 - 7, "original_x2": x2 + 9,
                             "original_y2": y2 - 3})  # a second, shifted box for the same region
    path.write_text(json.dumps(graph))
    with caplog.at_level(logging.INFO, logger="anatomy_vlm.data"):
        row = load_imagenome(phantom_copy, "train")[0]
    assert row["image_id"] == dicom_id
    box = np.asarray(row["boxes"])[ANATOMICAL_REGIONS.index("cardiac silhouette")]
    np.testing.assert_allclose(box, [x1, y1 - 7, x2 + 9, y2])  # covers both, not the last one read
    assert "duplicate region boxes united 1" in caplog.text


def test_malformed_scene_graph_and_missing_image(phantom_copy, dataset_cache, caplog):
    ids = _split_ids(phantom_copy, "train")
    _graph_path(phantom_copy, ids[0]).write_text('{"objects": [ {"bbox_name": ')  # truncated JSON
    jpg = next((phantom_copy / "mimic-cxr-jpg/files").rglob(f"{ids[1]}.jpg"))
    jpg.unlink()
    with pytest.raises(ValueError, match=rf"{ids[0]}_SceneGraph.json: malformed scene graph"):
        load_imagenome(phantom_copy, "train", on_error="raise")
    with caplog.at_level(logging.INFO, logger="anatomy_vlm.data"):
        dataset = load_imagenome(phantom_copy, "train", on_error="skip")
    assert ids[0] not in dataset["image_id"] and ids[1] not in dataset["image_id"]
    assert len(dataset) == len(ids) - 2 - len(set(ids) & _avoid(phantom_copy))
    assert "scene graph malformed 1" in caplog.text and "image missing 1" in caplog.text
    assert f"{ids[1]}.jpg: image file not found" in caplog.text


def _avoid(root):
    return {r["dicom_id"] for r in _rows(root / "chest-imagenome/silver_dataset/splits/images_to_avoid.csv")}


def test_corrupt_image_skipped_or_raised_by_transform(phantom_copy, dataset_cache):
    dataset = load_imagenome(phantom_copy, "validate")
    path = dataset[1]["image"]["path"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])  # truncated JPEG
    processor = AnatomyVLMImageProcessor(size=64)
    dataset.set_transform(make_transform(processor, on_error="skip"))
    batch = dataset[0:3]
    assert batch["image_ok"] == [True, False, True]
    assert batch["pixels"][1].sum() == 0 and batch["pixels"][0].sum() > 0
    dataset.set_transform(make_transform(processor, on_error="raise"))
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        dataset[0:3]


def test_wrong_paths_name_what_is_missing(tmp_path, phantom_root, dataset_cache):
    with pytest.raises(FileNotFoundError, match="split table not found|silver_dataset folder not found"):
        load_imagenome(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_imagenome(phantom_root, "dev")

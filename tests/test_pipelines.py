"""transformers pipelines registered with a checkpoint give `interpret`'s numbers, with remote code where the project
is absent; the project's own classes load its checkpoints without `trust_remote_code`."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, AutoProcessor

from conftest import write_dicom
from modeling_anatomy_vlm import (
    AnatomyVLMForSemanticSegmentation,
    AnatomyVLMImageFeatureExtractionPipeline,
    AnatomyVLMImageProcessor,
    AnatomyVLMModel,
    AnatomyVLMProcessor,
    AnatomyVLMZeroShotImageClassificationPipeline,
    AnatomyVLMZeroShotObjectDetectionPipeline,
)
from train.release import compat

FINDINGS = compat.FINDINGS
TASKS = ("zero-shot-image-classification", "zero-shot-object-detection", "image-feature-extraction")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    path = tmp_path_factory.mktemp("pipelines") / "checkpoint"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def png16(checkpoint):
    """A 16-bit PNG (180 x 140): transformers' own `load_image` would cut it to 8-bit RGB."""
    yy, xx = np.mgrid[0:180, 0:140]
    pixels = 50000 - 80.0 * yy
    for cx in (40, 100):
        pixels = np.where(((xx - cx) / 25.0) ** 2 + ((yy - 80) / 55.0) ** 2 < 1, 15000 + 50.0 * yy, pixels)
    path = checkpoint.parent / "cxr16.png"
    Image.fromarray(pixels.astype(np.uint16)).save(path)
    return path


@pytest.fixture(scope="module")
def pipelines(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    parts = {"model": model, "processor": processor}
    return {
        "zero-shot-image-classification": AnatomyVLMZeroShotImageClassificationPipeline(**parts),
        "zero-shot-object-detection": AnatomyVLMZeroShotObjectDetectionPipeline(**parts),
        "image-feature-extraction": AnatomyVLMImageFeatureExtractionPipeline(**parts),
    }


def assert_matches_interpret(classification, detections, expected):
    """Pipeline outputs against one `interpret` result: scores within 1e-5, boxes within 0.5 px."""
    assert [r["score"] for r in classification] == sorted((r["score"] for r in classification), reverse=True)
    assert {r["label"] for r in classification} == set(expected["findings"])
    for result in classification:
        assert result["score"] == pytest.approx(expected["findings"][result["label"]], abs=1e-5)
    by_pair = {(r["region"], r["label"]): r for r in detections}
    assert len(by_pair) == len(detections) == sum(len(region["scores"]) for region in expected["regions"])
    for region in expected["regions"]:
        for finding, score in region["scores"].items():
            found = by_pair[(region["name"], finding)]
            assert found["score"] == pytest.approx(score, abs=1e-5)
            box = [found["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")]
            np.testing.assert_allclose(box, region["box"], atol=0.5)


def test_pipelines_with_remote_code_give_interpret_numbers_without_the_project(
    checkpoint, png16, tiny_model_and_processor
):
    config = json.loads((checkpoint / "config.json").read_text())
    assert set(config["custom_pipelines"]) == set(TASKS)
    assert all(entry["impl"].startswith("pipeline_anatomy_vlm.") and entry["pt"] == ["AutoModel"]
               for entry in config["custom_pipelines"].values())
    assert (checkpoint / "pipeline_anatomy_vlm.py").is_file()

    # `pipeline(task, model=<checkpoint>, trust_remote_code=True)` in an interpreter that cannot import the project
    result = compat.run_probe(sys.executable, checkpoint, png16, checkpoint.parent / "probe.json", timeout=300)
    assert result["model_module"].startswith("transformers_modules.")
    assert all(result["pipelines"][task]["module"].startswith("transformers_modules.") for task in TASKS)
    outputs = {task: result["pipelines"][task]["output"] for task in TASKS}

    model, processor = tiny_model_and_processor
    expected = model.interpret(str(png16), processor, findings=FINDINGS)[0]
    assert result["interpret"]["image_size"] == expected["image_size"] == [140, 180]
    assert_matches_interpret(outputs["zero-shot-image-classification"], outputs["zero-shot-object-detection"], expected)

    with torch.no_grad():
        features = model.encode_image(processor(images=str(png16))["pixel_values"])
    np.testing.assert_allclose(outputs["image-feature-extraction"]["image_embeds"], features["image_embeds"], atol=1e-5)
    np.testing.assert_allclose(outputs["image-feature-extraction"]["region_embeds"], features["region_embeds"],
                               atol=1e-5)
    assert outputs["image-feature-extraction"]["region_names"] == model.config.region_names
    assert compat.pipeline_mismatches(result) == []


def test_pipelines_read_dicom_as_interpret_does(pipelines, tiny_model_and_processor, tmp_path):
    model, processor = tiny_model_and_processor
    pixels = (np.linspace(0, 4000, 96 * 80).reshape(96, 80)).astype(np.uint16)
    path = str(write_dicom(tmp_path / "cxr.dcm", pixels, photometric="MONOCHROME1", bits_stored=12))
    expected = model.interpret(path, processor, findings=FINDINGS)[0]
    classification = pipelines["zero-shot-image-classification"](path, candidate_labels=FINDINGS)
    detections = pipelines["zero-shot-object-detection"](path, candidate_labels=FINDINGS, threshold=0.0)
    assert_matches_interpret(classification, detections, expected)


def test_detection_threshold_top_k_and_default_findings(pipelines, png16, tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    detect = pipelines["zero-shot-object-detection"]
    everything = detect(str(png16), threshold=0.0)  # default labels: config.findings
    assert len(everything) == len(model.config.region_names) * len(model.config.findings)
    default = detect(str(png16))  # transformers' default threshold, 0.1
    assert default == [r for r in everything if r["score"] >= 0.1]
    assert detect(str(png16), threshold=0.0, top_k=3) == everything[:3]
    labels = [r["label"] for r in pipelines["zero-shot-image-classification"](str(png16))]
    assert sorted(labels) == sorted(model.config.findings)
    for bad in ([], [""], ["pleural effusion", 3]):
        with pytest.raises(ValueError, match="findings must be a non-empty list"):
            detect(str(png16), candidate_labels=bad)


def test_image_feature_extraction_returns_the_image_embedding_and_regions_on_request(
    pipelines, png16, tiny_model_and_processor
):
    model, processor = tiny_model_and_processor
    extract = pipelines["image-feature-extraction"]
    pixel_values = processor(images=str(png16))["pixel_values"]
    with torch.no_grad():
        image_embeds, region_embeds = model.get_image_features(pixel_values), model.get_region_features(pixel_values)
    embedding = extract(str(png16))
    assert np.asarray(embedding).shape == (1, model.config.projection_dim)
    np.testing.assert_allclose(embedding, image_embeds, atol=1e-6)
    tensor = extract(str(png16), return_tensors=True)
    assert isinstance(tensor, torch.Tensor) and torch.allclose(tensor, image_embeds, atol=1e-6)
    both = extract(str(png16), regions=True)
    assert both["region_names"] == model.config.region_names
    np.testing.assert_allclose(both["region_embeds"], region_embeds, atol=1e-6)
    assert len(extract([str(png16), str(png16)])) == 2  # a list of images gives a list of results


def test_forward_returns_clip_style_logits_whose_sigmoid_is_the_finding_score(tiny_model_and_processor, png16):
    model, processor = tiny_model_and_processor
    inputs = processor(images=str(png16), text=FINDINGS)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (1, len(FINDINGS))
    assert torch.equal(out.logits_per_text, out.logits_per_image.T)
    expected = model.interpret(str(png16), processor, findings=FINDINGS)[0]["findings"]  # one "{finding}" template
    np.testing.assert_allclose(out.logits_per_image.sigmoid()[0].numpy(), [expected[f] for f in FINDINGS], atol=1e-5)


def test_project_classes_load_checkpoints_without_trust_remote_code(
    checkpoint, tmp_path, png16, tiny_model_and_processor
):
    model, processor = tiny_model_and_processor
    expected = model.interpret(str(png16), processor, findings=FINDINGS)[0]

    loaded = AnatomyVLMModel.from_pretrained(checkpoint).eval()
    loaded_processor = AnatomyVLMProcessor.from_pretrained(checkpoint)
    image_processor = AnatomyVLMImageProcessor.from_pretrained(checkpoint)
    assert image_processor.size == loaded_processor.image_processor.size == 64
    got = loaded.interpret(str(png16), loaded_processor, findings=FINDINGS)[0]
    assert got["findings"] == pytest.approx(expected["findings"], abs=1e-6)
    # The Auto classes too: the project's classes are registered when it is imported, as transformers' own are.
    assert type(AutoModel.from_pretrained(checkpoint)) is AnatomyVLMModel
    assert type(AutoProcessor.from_pretrained(checkpoint)) is AnatomyVLMProcessor
    assert type(AutoImageProcessor.from_pretrained(checkpoint)) is AnatomyVLMImageProcessor

    segmentation = AnatomyVLMForSemanticSegmentation.from_anatomy_vlm(model, labels=["right lung", "heart"]).eval()
    assert "custom_pipelines" not in segmentation.config.to_dict()  # those serve AnatomyVLMModel checkpoints only
    segmentation.save_pretrained(tmp_path / "segmentation")
    pixel_values = processor(images=str(png16))["pixel_values"]
    with torch.no_grad():
        reference = segmentation(pixel_values).logits
        for cls in (AnatomyVLMForSemanticSegmentation, AutoModelForSemanticSegmentation):
            reloaded = cls.from_pretrained(tmp_path / "segmentation").eval()
            assert type(reloaded) is AnatomyVLMForSemanticSegmentation
            torch.testing.assert_close(reloaded(pixel_values).logits, reference)


def test_compat_comparison_flags_differences_beyond_the_tolerances():
    region = {"name": "right lung", "box": [10.0, 20.0, 60.0, 90.0], "scores": {"effusion": 0.7}}
    result = {
        "interpret": {"image_size": [140, 180], "regions": [region], "findings": {"effusion": 0.2}},
        "pipelines": {
            "zero-shot-image-classification": {"output": [{"score": 0.2, "label": "effusion"}]},
            "zero-shot-object-detection": {"output": [{
                "score": 0.7, "label": "effusion", "region": "right lung",
                "box": {"xmin": 10.0, "ymin": 20.0, "xmax": 60.0, "ymax": 90.4},
            }]},
            "image-feature-extraction": {"output": {"image_embeds": [[0.6, 0.8]], "region_embeds": [[[1.0, 0.0]]],
                                                    "region_names": ["right lung"]}},
        },
    }
    assert compat.pipeline_mismatches(result) == [] and compat.output_mismatches(result, result) == []
    moved = json.loads(json.dumps(result))
    moved["interpret"]["findings"]["effusion"] += 2e-5
    moved["interpret"]["regions"][0]["box"][0] += 0.6
    moved["pipelines"]["image-feature-extraction"]["output"]["image_embeds"][0][0] += 2e-5
    problems = compat.output_mismatches(result, moved)
    assert any("interpret finding effusion" in p for p in problems)
    assert any("box" in p for p in problems)
    assert any("image_embeds" in p for p in problems)
    assert any("zero-shot-image-classification effusion" in p for p in compat.pipeline_mismatches(moved))

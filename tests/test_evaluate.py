"""train.eval.zero_shot (thresholds from validation only, laterality, metrics.json, plots), the Hub card generator,
push_to_hub --dry-run without network, and the ablation runner with a tiny config."""

import csv
import json
import math
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY_VISION, tiny_config
from modeling_anatomy_vlm import AnatomyVLMModel, AnatomyVLMProcessor
from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS
from train.eval.thresholds import THRESHOLDS_FILE
from train.eval.zero_shot import IU_XRAY_FINDINGS, laterality_accuracy, mirrored_region_pairs, run_evaluation

# The IU-Xray five (so the saved thresholds serve IU-Xray too), one more finding, and one the phantom never draws.
FINDINGS = [*IU_XRAY_FINDINGS, "pneumothorax", "hernia"]
PLOTS = ("roc_global.png", "region_auc_heatmap.png", "boxes.png")


def save_tiny_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    config = tiny_config(findings=FINDINGS)
    AnatomyVLMModel.from_encoders(config).save_pretrained(folder)
    AnatomyVLMProcessor.from_model_config(config).save_pretrained(folder)
    return folder


def quick_eval(model_dir, data, **kwargs):
    kwargs = {"n_bootstrap": 0, "plots": False, "progress": False, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny splits: most classes are undefined
        return run_evaluation(model_dir, data, **kwargs)


@pytest.fixture(scope="module")
def evaluated(phantom_root, tmp_path_factory):
    """One full evaluation (bootstrap, plots) of a tiny checkpoint on the phantom test split, warnings recorded."""
    root = tmp_path_factory.mktemp("evaluated")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANATOMY_VLM_CACHE", str(root / "cache"))
        model_dir = save_tiny_checkpoint(root / "run" / "model")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = run_evaluation(model_dir, phantom_root, out_dir=root / "eval", n_bootstrap=20, progress=False)
        yield {"model_dir": model_dir, "out_dir": root / "eval", "metrics": metrics, "data": phantom_root,
               "warnings": [str(w.message) for w in caught], "cache": root / "cache"}


# --- thresholds ------------------------------------------------------------------------------------------


def test_thresholds_come_from_the_validation_split_only(evaluated, tmp_path, monkeypatch):
    monkeypatch.setenv("ANATOMY_VLM_CACHE", str(evaluated["cache"]))
    model_dir = tmp_path / "model"
    shutil.copytree(evaluated["model_dir"], model_dir)
    path = model_dir / THRESHOLDS_FILE
    # a few findings (fewer prompts to embed), two of them positive in the validation split
    data, findings = evaluated["data"], ["pneumothorax", "pulmonary edema/hazy opacity", "hernia"]

    first = quick_eval(model_dir, data, findings=findings, max_images=2, recompute_thresholds=True,
                       out_dir=tmp_path / "a")
    saved = path.read_bytes()
    second = quick_eval(model_dir, data, findings=findings, recompute_thresholds=True, out_dir=tmp_path / "b")
    assert first["num_images"] == 2 < second["num_images"]  # two different test subsets ...
    assert path.read_bytes() == saved  # ... refit from scratch: the same thresholds
    assert not second["thresholds"]["reused"]  # (reuse without --recompute: the IU-Xray test)

    thresholds = json.loads(saved)
    assert thresholds["validation"]["split"] == "validate"
    assert thresholds["global"]["pneumothorax"] is not None and thresholds["global"]["hernia"] is None
    assert set(thresholds["global"]) == set(findings)
    assert len(thresholds["region"]) == len(ANATOMICAL_REGIONS) * len(findings)
    assert all("|" in key for key in thresholds["region"])

    # another validation split: without its pneumothorax images -> another hash, refitted, other thresholds
    from train.data.imagenome import load_imagenome

    validation = load_imagenome(data, "validate", region_names=ANATOMICAL_REGIONS, findings=findings)
    positive = {i for i, labels in zip(validation["image_id"], validation["global_labels"]) if labels[0] == 1}
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    valid_csv = other / "chest-imagenome" / "silver_dataset" / "splits" / "valid.csv"
    rows = list(csv.DictReader(valid_csv.open()))
    with valid_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if row["dicom_id"] not in positive)
    third = quick_eval(model_dir, data, findings=findings, threshold_data=other, out_dir=tmp_path / "d")
    refitted = json.loads(path.read_text())
    assert not third["thresholds"]["reused"]
    assert refitted["validation"]["image_ids_sha256"] != thresholds["validation"]["image_ids_sha256"]
    assert refitted["validation"]["num_images"] == thresholds["validation"]["num_images"] - len(positive) > 0
    assert refitted["global"]["pneumothorax"] is None  # no positives left to fit it on
    assert refitted["global"]["pulmonary edema/hazy opacity"] is not None


def test_iu_xray_uses_the_saved_thresholds_or_refuses(evaluated, tmp_path, monkeypatch):
    monkeypatch.setenv("ANATOMY_VLM_CACHE", str(evaluated["cache"]))
    reports, images = tmp_path / "iu" / "ecgen-radiology", tmp_path / "iu" / "NLMCXR_png"
    reports.mkdir(parents=True)
    images.mkdir()
    sources = sorted(Path(evaluated["data"]).glob("mimic-cxr-jpg/files/**/*.jpg"))
    texts = ["Small right pleural effusion. Heart size is normal.", "Cardiomegaly. No pleural effusion.",
             "No acute cardiopulmonary process. No effusion or consolidation."]
    for n, text in enumerate(texts, start=1):
        Image.open(sources[n]).save(images / f"CXR{n}_IM-000{n}.png")
        (reports / f"{n}.xml").write_text(
            f'<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="FINDINGS">{text}</AbstractText><AbstractText Label="IMPRESSION">{text}'
            f'</AbstractText></Abstract></Article></MedlineCitation><parentImage id="CXR{n}_IM-000{n}"/></eCitation>')

    metrics = quick_eval(evaluated["model_dir"], tmp_path / "iu", dataset="iu_xray", out_dir=tmp_path / "out")
    assert metrics["split"] == "all" and metrics["num_images"] == 3
    assert metrics["thresholds"]["reused"] and metrics["findings"] == list(IU_XRAY_FINDINGS)
    assert metrics["region"] is metrics["detection"] is metrics["laterality"] is None
    assert metrics["global"]["per_class"]["pleural effusion"]["positives"] == 1

    bare = tmp_path / "bare"
    shutil.copytree(evaluated["model_dir"], bare)
    (bare / THRESHOLDS_FILE).unlink()
    with pytest.raises(ValueError, match="threshold-data"):
        quick_eval(bare, tmp_path / "iu", dataset="iu_xray", out_dir=tmp_path / "out2")


# --- laterality --------------------------------------------------------------------------------------------


def test_laterality_accuracy_on_hand_made_predictions():
    regions = ["right lung", "left lung", "right costophrenic angle", "left costophrenic angle", "trachea"]
    findings = ["pleural effusion", "pneumothorax"]
    labels = np.full((3, 5, 2), -1)
    scores = np.full((3, 5, 2), 0.5)
    # image 0: effusion in the right lung (correct) and right angle (left angle unmentioned; wrong)
    labels[0, [0, 1, 2], 0] = 1, 0, 1
    scores[0, [0, 1, 2, 3], 0] = 0.9, 0.2, 0.3, 0.6
    # image 1: pneumothorax in both lungs (no trial); effusion in the left angle, tied scores (wrong)
    labels[1, [0, 1], 1] = 1
    labels[1, [2, 3], 0] = 0, 1
    # image 2: effusion in the left lung (correct); trachea has no mirror
    labels[2, [0, 1, 4], 0] = 0, 1, 1
    scores[2, [0, 1], 0] = 0.1, 0.7

    result = laterality_accuracy(scores, labels, regions, findings)
    assert (result["num_trials"], result["num_correct"], result["accuracy"]) == (4, 2, 0.5)
    assert result["per_pair"]["right lung / left lung"] == {"accuracy": 1.0, "num_trials": 2}
    angles = result["per_pair"]["right costophrenic angle / left costophrenic angle"]
    assert angles == {"accuracy": 0.0, "num_trials": 2}
    assert set(result["per_finding"]) == {"pleural effusion"}
    # unmentioned as unknown: the unmentioned left angle of image 0 no longer makes a trial
    assert laterality_accuracy(scores, labels, regions, findings, unmentioned_as_negative=False)["accuracy"] == 2 / 3
    with pytest.warns(UserWarning, match="laterality"):
        assert laterality_accuracy(scores, np.zeros_like(labels), regions, findings)["accuracy"] is None

    pairs = [(ANATOMICAL_REGIONS[r], ANATOMICAL_REGIONS[l]) for r, l in mirrored_region_pairs(ANATOMICAL_REGIONS)]
    assert len(pairs) == 9 and ("right clavicle", "left clavicle") in pairs
    assert all(r.removeprefix("right ") == l.removeprefix("left ") for r, l in pairs)


# --- metrics.json and plots -----------------------------------------------------------------------------


def test_metrics_json_keys_and_undefined_classes_are_null(evaluated):
    def no_nan(token):
        raise AssertionError(f"{token} in metrics.json")

    written = json.loads((evaluated["out_dir"] / "metrics.json").read_text(), parse_constant=no_nan)
    for key in ("num_images", "detection_miou", "global_auc_macro", "region_auc_macro", "undefined_global",
                "global", "region", "detection", "laterality", "thresholds", "bootstrap", "plots"):
        assert key in written, key
    assert written["global_auc_macro"] == written["global"]["macro"]["auc"]
    assert written["detection_miou"] == written["detection"]["miou"]
    for key in ("auc", "ap", "bmac", "f1"):
        assert key in written["global"]["macro"] and key in written["region"]["macro"]
    for key in ("miou", "map", "map_50", "acc50"):
        assert 0 <= written["detection"][key] <= 1
    low, high = written["detection"]["ci95"]["miou"]
    assert low <= written["detection"]["miou"] <= high
    assert set(written["laterality"]) >= {"accuracy", "num_trials", "per_pair"}

    hernia = written["global"]["per_class"]["hernia"]  # never drawn by the phantom generator
    assert hernia["positives"] == 0 and hernia["auc"] is None and hernia["bmac"] is None and hernia["f1"] is None
    assert "hernia" in written["undefined_global"]
    assert any("undefined" in w and "hernia" in w for w in evaluated["warnings"])
    assert all(k.count("|") == 1 for k in written["region"]["per_class"])


def test_plots_are_valid_pngs(evaluated):
    assert evaluated["metrics"]["plots"] == list(PLOTS)
    for name in PLOTS:
        path = evaluated["out_dir"] / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


# --- Hub card and upload -------------------------------------------------------------------------------


def test_generated_hub_card_parses_with_a_well_formed_model_index(evaluated, tmp_path):
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from train.release.model_card import write_card

    path = write_card(evaluated["model_dir"], evaluated["out_dir"] / "metrics.json", "someone/anatomy-vlm-tiny",
                      path=tmp_path / "README.md")
    metadata = metadata_load(path)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "zero-shot-image-classification"
    assert metadata["license"] == "apache-2.0" and "medical" in metadata["tags"]
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "anatomy-vlm-tiny"
    assert all(r.task_type and r.dataset_type and r.dataset_split == "test" and math.isfinite(r.metric_value)
               for r in results)
    by_key = {(r.metric_config, r.metric_type): r.metric_value for r in results}
    metrics = evaluated["metrics"]
    assert by_key[("global", "roc_auc")] == round(metrics["global_auc_macro"], 4)
    assert by_key[("detection", "mean_iou")] == round(metrics["detection_miou"], 4)
    assert ModelCard.load(path).data.eval_results == results
    text = path.read_text()
    assert "trust_remote_code=True" in text and "{finding} in the {region}" in text and "Not for clinical use" in text

    # the quickstart's eval.json (contract keys only) makes a smaller model-index
    contract = {k: metrics[k] for k in ("num_images", "detection_miou", "global_auc_macro", "region_auc_macro",
                                        "undefined_global")}
    (tmp_path / "eval.json").write_text(json.dumps(contract))
    small = write_card(evaluated["model_dir"], tmp_path / "eval.json", path=tmp_path / "small.md")
    assert len(model_index_to_eval_results(metadata_load(small)["model-index"])[1]) == 3


def test_push_to_hub_dry_run_lists_the_checkpoint_without_network(evaluated, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from train.release import push_to_hub

    def no_network(*args, **kwargs):
        raise AssertionError("network access during --dry-run")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", no_network)
    model_dir = evaluated["model_dir"]
    push_to_hub.main(["--model", str(model_dir), "--repo-id", "someone/anatomy-vlm-tiny", "--dry-run"])
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert {"model.safetensors", "config.json", "README.md", "processor_config.json", "tokenizer.json",
            "thresholds.json", "configuration_anatomy_vlm.py", "modeling_anatomy_vlm.py", "loss_anatomy_vlm.py",
            "image_processing_anatomy_vlm.py", "processing_anatomy_vlm.py"} <= listed
    assert not (model_dir / "README.md").exists()  # a dry run leaves the folder alone

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "processor_config.json", "configuration_anatomy_vlm.py"):
        shutil.copy(model_dir / name, partial / name)
    with pytest.raises(FileNotFoundError, match="modeling_anatomy_vlm.py"):
        push_to_hub.push(partial, "someone/x", dry_run=True)


# --- ablation ------------------------------------------------------------------------------------------------


def test_ablation_varies_only_the_last_stage_from_one_shared_checkpoint(phantom_root, tmp_path, dataset_cache):
    from train.experiments import ablation

    cfg = {
        "model": {"vision_config": dict(TINY_VISION), "projection_dim": 32,
                  "findings": ["pleural effusion", "pneumothorax", "atelectasis"]},
        "data": {"root": str(phantom_root), "num_workers": 0, "on_error": "skip"},
        "training": {"output_dir": "unused", "batch_size": 4, "log_with": None, "log_every": 1, "checkpoint_every": 0},
        "stages": [
            {"name": "detection", "steps": 1, "lr": 1e-3, "loss_weights": {"anatomy": 1.0}},
            {"name": "global", "steps": 1, "lr": 5e-4, "loss_weights": {"anatomy": 1.0, "global": 0.5}},
            {"name": "fine", "steps": 2, "lr": 5e-4,
             "loss_weights": {"anatomy": 0.2, "global": 1.0, "fine": 1.0, "region": 2.0}},
        ],
    }
    derived = {name: ablation.variant_config(cfg, name, "x") for name in ablation.VARIANTS}
    last = {name: (d["stages"][-1]["loss_weights"], d["stages"][-1]["shuffle_images"]) for name, d in derived.items()}
    assert last == {
        "none": ({"anatomy": 0.2, "global": 1.0}, False),
        "fine": ({"anatomy": 0.2, "global": 1.0, "fine": 1.0}, False),
        "region": ({"anatomy": 0.2, "global": 1.0, "region": 2.0}, False),
        "both": ({"anatomy": 0.2, "global": 1.0, "fine": 1.0, "region": 2.0}, False),
        "image-blind": ({"anatomy": 0.2, "global": 1.0, "fine": 1.0, "region": 2.0}, True),
    }
    assert all(d["stages"][:-1] == cfg["stages"][:-1] for d in derived.values())
    assert ablation.prefix_config(cfg, "p")["training"]["stop_after_steps"] == 2
    no_region = {**cfg, "stages": cfg["stages"][:2] + [{**cfg["stages"][2], "loss_weights": {"anatomy": 1.0, "fine": 1.0}}]}
    with pytest.raises(ValueError, match=r"variant 'region': the config's last stage has no weight for \['region'\]"):
        ablation.variant_config(no_region, "region", "x")
    warm = {**cfg, "stages": cfg["stages"][:2] + [{**cfg["stages"][2], "warmup_steps": 3}]}
    scaled = ablation.scale_steps(warm, 0.5)["stages"]
    assert [(s["steps"], s.get("warmup_steps")) for s in scaled] == [(1, None), (1, None), (1, 1)]
    assert warm["stages"][2]["steps"] == 2  # the config itself is left alone
    with pytest.raises(ValueError, match="steps-fraction"):
        ablation.scale_steps(cfg, 1.5)

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "ablation"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ablation.main(["--config", str(config_path), "--steps-fraction", "1", "--out", str(out), "--bootstrap", "0",
                       "--no-plots"])
    summary = json.loads((out / "ablation.json").read_text())
    assert (out / "ablation.md").read_text() == ablation.markdown_table(summary)  # the table comes from the JSON
    rows = (out / "ablation.md").read_text().splitlines()
    rows = rows[rows.index("|---|---|---|---|---|---|---|") + 1:]
    rows = rows[:rows.index("")]
    assert [row.split(" | ")[0] for row in rows] == [f"| {label}" for label, *_ in ablation.VARIANTS.values()]
    assert "images shuffled" in rows[-1] and not any("shuffled" in row for row in rows[:-1])
    # every variant resumed from the one shared checkpoint at the end of stage 2
    assert ablation.latest_checkpoint(out / "prefix").name == "step_2"
    from safetensors.torch import load_file

    weights = {}
    for variant in summary["variants"]:
        assert (out / variant["variant"] / "checkpoints" / "step_2").is_dir()
        assert Path(variant["metrics"]).is_file()
        assert {"global_auc", "region_auc", "region_auc_heldout_wording", "laterality_accuracy"} <= set(variant)
        assert variant["validation"]["num_images"] > 0 and variant["validation"]["detection_miou"] is not None
        weights[variant["variant"]] = load_file(out / variant["variant"] / "model" / "model.safetensors")
    # shuffled images change what the same losses learn
    name = "anatomy_queries"
    key = next(k for k in weights["both"] if name in k)
    assert not torch.equal(weights["both"][key], weights["image-blind"][key])

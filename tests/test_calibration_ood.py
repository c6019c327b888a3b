"""Calibration and out-of-distribution warnings ("safe to serve"): `train.eval.calibration` fits a tiny trained
model's `calibration.safetensors` on the phantom set; `interpret` applies it and warns on images unlike the
training images; the file round-trips through save_pretrained / from_pretrained, also where the project cannot be
imported (the shipped `calibration_anatomy_vlm` alone)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import BLOCK_PROJECT_IMPORTS
from modeling_anatomy_vlm import AnatomyVLMModel, AnatomyVLMProcessor
from modeling_anatomy_vlm.calibration_anatomy_vlm import CALIBRATION_FILE, Calibration
from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS
from modeling_anatomy_vlm.image_processing_anatomy_vlm import load_grayscale
from conftest import tiny_train_config
from train.engine import train
from train.eval import calibration
from train.eval.thresholds import weights_fingerprint
from train.eval.zero_shot import format_table, load_split, run_evaluation

# Findings the phantom draws, so both heads have positives in the small validation split.
FINDINGS = ["pleural effusion", "pneumothorax", "atelectasis", "enlarged cardiac silhouette"]


def natural_photograph(height: int = 180, width: int = 240) -> np.ndarray:
    """A colourful outdoor-looking RGB picture: a sky gradient, a sun, textured grass."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width], dtype=float)[:, None, None]
    picture = np.stack([0.3 + 0.5 * xx, 0.5 + 0.3 * np.sin(8 * xx + 3 * yy), 1.0 - 0.6 * yy], axis=-1)
    grass = yy > 0.6
    picture[grass] = np.stack([0.2 + 0.1 * rng.random(grass.sum()), 0.5 + 0.3 * rng.random(grass.sum()),
                               0.1 * rng.random(grass.sum())], axis=-1)
    picture[(xx - 0.75) ** 2 + (yy - 0.25) ** 2 < 0.01] = [1.0, 0.85, 0.2]
    return (np.clip(picture, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def calibrated(phantom_root, tmp_path_factory):
    """A tiny model trained a few steps, a copy of it without calibration, then `python -m train.eval.calibration`
    on the phantom set."""
    root = tmp_path_factory.mktemp("calibrated")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANATOMY_VLM_CACHE", str(root / "cache"))
        cfg = tiny_train_config(phantom_root, root / "run", steps=(2, 2, 2))
        cfg["model"]["findings"] = FINDINGS
        train(cfg)
        model_dir = root / "run" / "model"
        uncalibrated = root / "uncalibrated"
        shutil.copytree(model_dir, uncalibrated)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny splits: undefined classes
            report = calibration.main(["--model", str(model_dir), "--data", str(phantom_root),
                                       "--out", str(root / "report")])
        test_set = load_split("imagenome", phantom_root, "test", ANATOMICAL_REGIONS, FINDINGS)
        yield {"model_dir": model_dir, "uncalibrated": uncalibrated, "report": report, "data": phantom_root,
               "cache": root / "cache", "test_images": [image["path"] for image in test_set["image"]],
               "weights_sha256": weights_fingerprint(uncalibrated)}


def load(folder):
    return AnatomyVLMModel.from_pretrained(folder).eval(), AnatomyVLMProcessor.from_pretrained(folder)


# --- out-of-distribution warnings -----------------------------------------------------------------------------


def test_ood_warns_on_unlike_images_but_not_on_held_out_phantoms(calibrated):
    model, processor = load(calibrated["model_dir"])
    phantoms = calibrated["test_images"]
    unlike = {
        "natural photograph": [natural_photograph()],
        "uniform noise": [np.random.default_rng(1).integers(0, 256, (192, 192), dtype=np.uint8)],
        "inverted phantom": [((1.0 - load_grayscale(path)) * 255).astype(np.uint8) for path in phantoms],
    }
    held_out = [result["ood"] for result in model.interpret(phantoms, processor, findings=FINDINGS[:1])]
    print(f"\nOOD threshold {held_out[0]['threshold']:.3f}; held-out phantoms "
          f"{[round(ood['score'], 2) for ood in held_out]}")
    assert phantoms and not any(ood["warning"] for ood in held_out)
    for name, images in unlike.items():
        oods = [result["ood"] for result in model.interpret(images, processor, findings=FINDINGS[:1])]
        print(f"{name}: {[round(ood['score'], 2) for ood in oods]}")
        assert all(ood["warning"] and ood["score"] > ood["threshold"] for ood in oods), name
    assert held_out[0]["threshold"] == pytest.approx(calibrated["report"]["ood"]["threshold"])


def test_ood_threshold_extrapolates_small_validation_sets():
    rng = np.random.default_rng(0)
    small = rng.lognormal(0.0, 0.2, size=6)
    assert calibration.ood_threshold(small) > small.max()  # the empirical 99th percentile would be ~ the maximum
    large = rng.lognormal(0.0, 0.2, size=20000)
    assert calibration.ood_threshold(large) == pytest.approx(np.quantile(large, 0.99), rel=0.02)


# --- calibrated probabilities ---------------------------------------------------------------------------------


def test_calibration_reduces_validation_ece(calibrated):
    report = calibrated["report"]
    for head in calibration.HEADS:
        ece = report["validation_ece"][head]
        print(f"\n{head}: validation ECE {ece['ece_before']:.4f} -> {ece['ece_after']:.4f} "
              f"({ece['labels']} labels, {ece['positives']} positive)")
        assert ece["positives"] > 0
        assert ece["ece_after"] < ece["ece_before"]
    assert (calibrated["model_dir"].parent.parent / "report" / "reliability_validation.png").stat().st_size > 0
    saved = json.loads((calibrated["model_dir"].parent.parent / "report" / "calibration.json").read_text())
    assert saved["validation_ece"] == report["validation_ece"]
    assert saved["validation"]["split"] == "validate" and saved["train"]["split"] == "train"


def test_platt_scaling_fixes_mis_scaled_logits():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 2.0, size=4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    logits = 6.0 * true_logits + 3.0  # overconfident and shifted
    labels[:200] = -1  # unknown labels take no part
    platt = calibration.fit_platt(logits, labels)
    before = calibration.expected_calibration_error(1 / (1 + np.exp(-logits)), labels)
    after = calibration.expected_calibration_error(platt(torch.as_tensor(logits)).numpy(), labels)
    print(f"\nmis-scaled logits: ECE {before:.4f} -> {after:.4f} (scale {platt.scale:.3f}, bias {platt.bias:.3f})")
    assert platt.scale == pytest.approx(1 / 6, rel=0.15) and platt.bias == pytest.approx(-0.5, abs=0.15)
    assert before > 0.1 and after < 0.03


def test_expected_calibration_error_of_known_cases():
    labels = np.array([1] * 8 + [0] * 2 + [-1] * 5)
    assert calibration.expected_calibration_error(np.full(15, 0.8), labels) == pytest.approx(0.0, abs=1e-12)
    assert calibration.expected_calibration_error(np.ones(15), labels) == pytest.approx(0.2)
    assert np.isnan(calibration.expected_calibration_error(np.ones(3), np.full(3, -1)))


def test_interpret_reports_ood_only_with_the_file(calibrated):
    image = calibrated["test_images"][0]
    bare_model, processor = load(calibrated["uncalibrated"])
    model, _ = load(calibrated["model_dir"])
    assert bare_model.calibration is None and model.calibration is not None
    bare = bare_model.interpret(image, processor, findings=FINDINGS)[0]
    result = model.interpret(image, processor, findings=FINDINGS)[0]
    assert "ood" not in bare
    assert set(result["ood"]) == {"score", "threshold", "warning"}
    assert set(result) == set(bare) | {"ood"}

    inputs = processor(images=image)
    raw = model.zero_shot_scores(inputs["pixel_values"], model.prompt_embeds(FINDINGS, processor.tokenizer))
    assert list(bare["findings"].values()) == pytest.approx(raw["global_scores"][0].tolist(), abs=1e-6)
    expected = model.calibration.global_platt(raw["global_logits"][0])
    assert list(result["findings"].values()) == pytest.approx(expected.tolist(), abs=1e-6)
    expected = model.calibration.region_platt(raw["region_log_odds"][0, 3])
    assert list(result["regions"][3]["scores"].values()) == pytest.approx(expected.tolist(), abs=1e-6)


# --- the file -------------------------------------------------------------------------------------------------


def test_calibration_round_trips_through_save_pretrained(calibrated, tmp_path):
    model, processor = load(calibrated["model_dir"])
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    assert {CALIBRATION_FILE, "calibration_anatomy_vlm.py"} <= set(os.listdir(tmp_path / "copy"))
    copy, _ = load(tmp_path / "copy")
    original = Calibration.load(calibrated["model_dir"] / CALIBRATION_FILE)
    for name in ("global_platt", "region_platt", "info"):
        assert getattr(copy.calibration, name) == getattr(original, name)
    assert copy.calibration.ood.threshold == original.ood.threshold
    for name in ("embedding", "image"):
        ours, theirs = getattr(copy.calibration.ood, name), getattr(original.ood, name)
        assert all(torch.equal(getattr(ours, key), getattr(theirs, key)) for key in ("center", "scale", "precision"))

    bare, _ = load(calibrated["uncalibrated"])
    bare.save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / CALIBRATION_FILE).exists()
    # Writing the file does not change what the decision thresholds (`thresholds.json`) are tied to.
    assert weights_fingerprint(calibrated["model_dir"]) == calibrated["weights_sha256"]


LOADER = BLOCK_PROJECT_IMPORTS + textwrap.dedent(
    """
    import json
    import numpy as np
    from transformers import AutoModel, AutoProcessor

    checkpoint, image_path, out_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    noise = np.random.default_rng(1).integers(0, 256, (192, 192), dtype=np.uint8)
    results = model.interpret([image_path, noise], processor, findings=["pleural effusion"])
    json.dump({"module": type(model.calibration).__module__, "results": results}, open(out_path, "w"))
    """
)


def test_calibration_loads_where_the_project_cannot_be_imported(calibrated, tmp_path):
    out_path = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    image = calibrated["test_images"][0]
    subprocess.run([sys.executable, "-c", LOADER, str(calibrated["model_dir"]), image, str(out_path)],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    loaded = json.loads(out_path.read_text())
    assert loaded["module"].startswith("transformers_modules.")
    model, processor = load(calibrated["model_dir"])
    noise = np.random.default_rng(1).integers(0, 256, (192, 192), dtype=np.uint8)
    expected = model.interpret([image, noise], processor, findings=["pleural effusion"])
    for ours, theirs in zip(expected, loaded["results"]):
        assert theirs["ood"]["warning"] == ours["ood"]["warning"]
        assert theirs["ood"]["score"] == pytest.approx(ours["ood"]["score"], rel=1e-5)
        assert theirs["findings"]["pleural effusion"] == pytest.approx(ours["findings"]["pleural effusion"], abs=1e-6)
    assert [result["ood"]["warning"] for result in loaded["results"]] == [False, True]


def test_a_foreign_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / CALIBRATION_FILE
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match=CALIBRATION_FILE):
        Calibration.load(path)
    (tmp_path / "empty").mkdir()
    assert Calibration.from_pretrained(tmp_path / "empty") is None


def test_calibration_is_reused_while_it_matches_and_refitted_on_request(calibrated, monkeypatch, capsys):
    monkeypatch.setenv("ANATOMY_VLM_CACHE", str(calibrated["cache"]))
    before = (calibrated["model_dir"] / CALIBRATION_FILE).read_bytes()
    args = ["--model", str(calibrated["model_dir"]), "--data", str(calibrated["data"]), "--no-plots",
            "--out", str(calibrated["model_dir"].parent / "again")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert calibration.main(args)["reused"]
        assert (calibrated["model_dir"] / CALIBRATION_FILE).read_bytes() == before
        assert not calibration.main([*args, "--refit"])["reused"]
    assert "ECE before" in capsys.readouterr().out


# --- evaluation -----------------------------------------------------------------------------------------------


def test_evaluation_reports_calibration_and_ood_on_the_test_split(calibrated, tmp_path, monkeypatch):
    monkeypatch.setenv("ANATOMY_VLM_CACHE", str(calibrated["cache"]))
    model_dir = tmp_path / "model"
    shutil.copytree(calibrated["model_dir"], model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = run_evaluation(model_dir, calibrated["data"], out_dir=tmp_path / "eval", n_bootstrap=0,
                                 progress=False)
    section = metrics["calibration"]
    assert section["fitted_on"]["split"] == "validate"
    assert section["validation_ece"] == calibrated["report"]["validation_ece"]
    assert set(section["ece"]) == {"global", "region"}
    assert section["ood"]["warnings"] == 0 and section["ood"]["images"] == metrics["num_images"]
    assert "reliability.png" in metrics["plots"] and (tmp_path / "eval" / "reliability.png").is_file()
    assert "out-of-distribution warnings: 0 of" in format_table(metrics)
    shutil.copytree(calibrated["uncalibrated"], tmp_path / "bare_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = run_evaluation(tmp_path / "bare_model", calibrated["data"], out_dir=tmp_path / "bare",
                              n_bootstrap=0, progress=False, plots=False)
    assert bare["calibration"] is None
    assert bare["global"]["macro"] == metrics["global"]["macro"]  # calibration leaves every other metric alone


def test_validation_metrics_of_the_calibration_pass_equal_an_evaluation_of_the_validation_split(calibrated):
    """What the quickstart selects settings by: the calibration pass's validation metrics, no extra inference."""
    from train.eval.zero_shot import evaluate_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny splits: undefined classes
        evaluated = evaluate_checkpoint(calibrated["model_dir"], calibrated["data"], "validate")
    reported = calibrated["report"]["validation_metrics"]
    assert reported["num_images"] == evaluated["num_images"] == calibrated["report"]["validation"]["num_images"]
    for key in ("detection_miou", "global_auc_macro", "region_auc_macro"):
        assert reported[key] == pytest.approx(evaluated[key], abs=1e-6), key


def test_unseen_findings_and_heldout_wording_score_the_same_images_with_other_prompts(calibrated, tmp_path):
    """A finding left out of the model's findings and scored by name gets exactly the AUC it had as a trained
    finding (its prompt embedding does not depend on the other findings); the held-out wording is another score."""
    from train.eval.zero_shot import HELDOUT_WORDING, evaluate_checkpoint, load_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny splits: undefined classes
        full = evaluate_checkpoint(calibrated["model_dir"], calibrated["data"], "test")
        defined = [f for f, auc in full["global_auc"].items() if auc is not None]
        withheld = defined[0]
        model, processor = load_checkpoint(calibrated["model_dir"])
        model.config.findings = [f for f in model.config.findings if f != withheld]
        model.save_pretrained(tmp_path / "model")
        processor.save_pretrained(tmp_path / "model")
        unseen = evaluate_checkpoint(tmp_path / "model", calibrated["data"], "test", unseen_findings=[withheld])
    assert unseen["global_auc_unseen_findings"] == {withheld: pytest.approx(full["global_auc"][withheld])}
    assert unseen["global_auc_macro_unseen_findings"] == pytest.approx(full["global_auc"][withheld])
    assert withheld not in unseen["global_auc"] and full["global_auc_macro_unseen_findings"] is None
    assert unseen["global_auc"] == {f: auc for f, auc in full["global_auc"].items() if f != withheld}
    for key in ("global_auc_macro_heldout_wording", "region_auc_macro_heldout_wording"):
        assert 0.0 <= full[key] <= 1.0
    assert full["heldout_wording"] == {key: list(value) for key, value in HELDOUT_WORDING.items()}

"""The Hub card a checkpoint gets, and MODEL_CARD.md, carry every section a medical model card needs and parse."""

import json

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from conftest import ROOT, tiny_config
from modeling_anatomy_vlm import AnatomyVLMProcessor
from train.release.compat import supported_range
from train.release.model_card import METRIC_MEANINGS, SECTIONS, missing_sections, validate_card, write_card

METRICS = {  # the layout of train.eval.zero_shot's metrics.json
    "split": "test",
    "num_images": 12,
    "global": {"macro": {"auc": 0.81, "ap": 0.52, "bmac": 0.7, "f1": 0.41}, "ci95": {"auc": [0.7, 0.9]}},
    "region": {"macro": {"auc": 0.77, "ap": 0.3, "bmac": 0.66, "f1": 0.25}, "ci95": None},
    "detection": {"miou": 0.61, "map": 0.2, "map_50": 0.45, "acc50": 0.68, "ci95": None},
    "laterality": {"accuracy": 0.74, "ci95": [0.6, 0.85]},
    "train_seconds": 95.0,
}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as `train.run` leaves it: model/ (config + processor) and train_config.yaml, phantom data."""
    config = tiny_config()
    config.save_pretrained(tmp_path / "model")
    AnatomyVLMProcessor.from_model_config(config).save_pretrained(tmp_path / "model")
    train_config = {
        "data": {"dataset": "phantom", "root": "data/phantom-x", "phantom": {"n": 40, "seed": 3, "size": 128}},
        "training": {"batch_size": 8, "gradient_accumulation_steps": 1, "mixed_precision": "no"},
        "stages": [{"name": "detection", "steps": 5, "loss_weights": {"anatomy": 1.0}},
                   {"name": "global", "steps": 7, "loss_weights": {"anatomy": 0.2, "global": 10.0}}],
    }
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump(train_config))
    (tmp_path / "evaluation" / "imagenome-test").mkdir(parents=True)
    (tmp_path / "evaluation" / "imagenome-test" / "metrics.json").write_text(json.dumps(METRICS))
    return tmp_path


def test_generated_card_parses_and_carries_every_section(run_dir):
    path = write_card(run_dir / "model", repo_id="someone/anatomy-vlm-tiny")
    metadata = metadata_load(path)
    card = ModelCard.load(path)
    assert metadata["library_name"] == "transformers" and metadata["license"] == "apache-2.0"
    assert card.data.model_name == "anatomy-vlm-tiny" and "phantom-data" in metadata["tags"]
    _, results = model_index_to_eval_results(metadata["model-index"])
    assert len(results) == 4 + 4 + 4 + 1
    assert validate_card(path)["num_results"] == 13
    assert missing_sections(card.text) == []
    text = card.text
    assert "{{" not in text and "Not for clinical use" in text
    for meaning in METRIC_MEANINGS.values():  # every number of the evaluation says what it measures
        assert meaning in text
    assert "`sentence-transformers/all-MiniLM-L6-v2`: Apache-2.0" in text
    assert "trained on generated phantom images only" in text and "no patient data" in text
    assert "12 optimiser steps of batch 8" in text and "95 s" in text  # compute: train_config.yaml, eval JSON
    assert "(x - 0.5) / 0.5" in text and "long side is 64 px" in text  # preprocessing of this checkpoint
    assert "MONOCHROME1" in text and f"transformers {supported_range()}" in text
    assert 'pipeline("zero-shot-object-detection"' in text and "trust_remote_code=True" in text
    assert "python -m train.eval.zero_shot" in text and "make compat" in text


def test_card_shows_heldout_wording_and_unseen_findings_beside_the_trained_prompts(run_dir):
    plain = ModelCard.load(write_card(run_dir / "model", path=run_dir / "plain.md")).text
    assert "Held-out wording" not in plain and "withheld from training" not in plain
    # metrics.json of train.eval.zero_shot: a section
    metrics = {**METRICS, "heldout_wording": {"global_auc_macro": 0.734, "region_auc_macro": 0.702}}
    (run_dir / "evaluation" / "imagenome-test" / "metrics.json").write_text(json.dumps(metrics))
    text = ModelCard.load(write_card(run_dir / "model", path=run_dir / "a.md")).text
    assert "Held-out wording: global macro AUC 0.734, anatomy-wise macro AUC 0.702" in text
    # the quickstart's eval.json: flat keys, and a finding withheld from training
    quickstart = {"num_images": 9, "global_auc_macro": 0.86, "region_auc_macro": 0.84, "detection_miou": 0.85,
                  "global_auc_macro_heldout_wording": 0.811, "region_auc_macro_heldout_wording": None,
                  "heldout_wording": {"global": ["a chest radiograph showing {finding}"]},  # templates, as written
                  "global_auc_unseen_findings": {"calcified nodule": 0.642, "hernia": None}}
    (run_dir / "eval.json").write_text(json.dumps(quickstart))
    text = ModelCard.load(write_card(run_dir / "model", eval_json=run_dir / "eval.json", path=run_dir / "b.md")).text
    assert "Held-out wording: global macro AUC 0.811, the same images" in text
    assert "anatomy-wise macro AUC" not in text.split("Held-out wording")[1][:60]
    assert "scored by name: calcified nodule global AUC 0.642." in text and "hernia global AUC" not in text


def test_card_of_real_data_names_the_data_terms(run_dir):
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "imagenome", "root": "/data/x"}}))
    text = ModelCard.load(write_card(run_dir / "model", path=run_dir / "card.md")).text
    assert "PhysioNet credentialed access" in text and "Chest ImaGenome 1.0.0" in text
    assert "check its data use agreement before sharing them" in text
    assert "trained on generated phantom images only" not in text


def test_a_card_without_a_required_section_is_refused(run_dir, tmp_path):
    path = write_card(run_dir / "model", path=tmp_path / "card.md")
    path.write_text(path.read_text().replace("## Bias, risks and limitations", "## Caveats"))
    with pytest.raises(ValueError, match="Bias, risks and limitations"):
        validate_card(path)


def test_model_card_md_carries_every_section_and_the_licence_of_every_part():
    text = (ROOT / "MODEL_CARD.md").read_text()
    assert missing_sections(text) == [], SECTIONS
    for part in ("all-MiniLM-L6-v2", "Apache-2.0", "PhysioNet", "IU-Xray", supported_range()):
        assert part in text

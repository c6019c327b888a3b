"""All three stages train on a Chest ImaGenome-layout set whose scene-graph phrases are real report sentences.

The phantom set's phrases are rewritten with sentences from the real IU-Xray reports (shipped in the torchxrayvision
wheel) and `train/text/data/report_sentences.jsonl`, post-finding negations ("Pleural effusion is not seen.") included,
and trained with `data.perturb_prob: 1.0`, so every region with a phrase has a perturbation tried on real language.
Rule 4 is checked on the same set with the oracle of `test_region_texts`.
"""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_region_texts import CONFIG, FINDINGS, NAMES, check_batch, text_table
from conftest import tiny_train_config

import train.tasks.anatomy_vlm as anatomy_vlm_task
from train.data.common import region_phrases_of
from train.data.imagenome import load_imagenome
from train.data.iu_xray import read_report
from train.engine import train
from train.tasks.anatomy_vlm import AnatomyVLMTask
from train.text.parser import parse_report
from train.text.region_texts import RegionPrompts, region_text_masks, region_texts_for_image

ROOT = Path(__file__).resolve().parents[1]
POST_FINDING_NEGATIONS = {
    "anatomicalfinding|no|pleural effusion": "Pleural effusion is not seen.",
    "anatomicalfinding|no|pneumothorax": "Pneumothorax is not identified.",
}


def real_sentences(reports_dir: Path, max_reports: int = 600) -> list[str]:
    """Sentences of the FINDINGS and IMPRESSION sections of the first real reports, and of report_sentences.jsonl."""
    sentences = []
    for path in sorted(reports_dir.glob("*.xml"), key=lambda p: int(p.stem))[:max_reports]:
        sections = read_report(path).sections
        for label in ("FINDINGS", "IMPRESSION"):
            sentences += re.split(r"(?<=\.)\s+", sections.get(label, ""))
    lines = (ROOT / "train" / "text" / "data" / "report_sentences.jsonl").read_text().splitlines()
    sentences += [json.loads(line)["text"] for line in lines if line.strip()]
    return list(dict.fromkeys(s.strip() for s in sentences if re.search(r"[A-Za-z]{3}", s)))


def rewrite_phrases(root: Path, sentences: list[str], seed: int = 0) -> int:
    """Replace every scene-graph phrase with a real sentence stating its first finding attribute where one does
    (a post-finding negation for "no pleural effusion" / "no pneumothorax" every other time), else any real
    sentence; never one naming the other side of a lateral region. Phrases keep their attribute, cue and id lists
    (one entry each). Returns the number of phrases rewritten."""
    rng = np.random.default_rng(seed)
    stating: dict[str, list[str]] = {}
    for sentence in sentences:
        for mention in parse_report(sentence):
            key = f"{mention.category}|{'yes' if mention.present else 'no'}|{mention.finding}"
            stating.setdefault(key, []).append(sentence)
    pools: dict[tuple[str | None, str | None], list[str]] = {}

    def pool(attribute: str | None, region: str) -> list[str]:
        other = {"right": "left", "left": "right"}.get(region.split()[0])
        if (attribute, other) not in pools:
            fitting = [s for s in stating.get(attribute, sentences)
                       if not other or not re.search(rf"\b{other}\b", s, re.IGNORECASE)]
            pools[attribute, other] = fitting or pool(None, region)
        return pools[attribute, other]

    count = 0
    for path in sorted((root / "chest-imagenome" / "silver_dataset" / "scene_graph").glob("*_SceneGraph.json")):
        graph = json.loads(path.read_text())
        for entry in graph["attributes"]:
            assert len(entry["phrases"]) == len(entry["attributes"])
            for k, attributes in enumerate(entry["attributes"]):
                first = next((a for a in attributes if not a.startswith("nlp|")), None)
                if first in POST_FINDING_NEGATIONS and count % 2 == 0:
                    entry["phrases"][k] = POST_FINDING_NEGATIONS[first]
                else:
                    candidates = pool(first, entry["bbox_name"])
                    entry["phrases"][k] = candidates[rng.integers(len(candidates))]
                count += 1
        path.write_text(json.dumps(graph))
    return count


@pytest.fixture(scope="module")
def real_sentence_set(phantom_root, real_reports, tmp_path_factory):
    """(a copy of the phantom set with real report sentences as its phrases, the sentences used)."""
    data = shutil.copytree(phantom_root, tmp_path_factory.mktemp("real_sentences") / "data")
    sentences = real_sentences(real_reports)
    assert len(sentences) > 1000 and set(POST_FINDING_NEGATIONS.values()) <= set(sentences)
    assert rewrite_phrases(data, sentences) > 100
    scene_graphs = data / "chest-imagenome" / "silver_dataset" / "scene_graph"
    graphs = "".join(path.read_text() for path in scene_graphs.glob("*.json"))
    assert all(json.dumps(s) in graphs for s in POST_FINDING_NEGATIONS.values()) and "XXXX" in graphs
    return data, sentences


def test_rule_4_holds_on_real_report_sentences(real_sentence_set, dataset_cache):
    data, _ = real_sentence_set
    rows = list(load_imagenome(data, "train", region_names=NAMES, findings=FINDINGS)
                .select_columns(["image_id", "region_phrases", "region_labels"]))
    prompts = RegionPrompts.from_config(CONFIG)
    table = text_table(prompts)
    rng = np.random.default_rng(5)
    for batch in range(10):
        chosen = [rows[i] for i in rng.choice(len(rows), size=int(rng.integers(2, 13)), replace=False)]
        items = [region_texts_for_image(region_phrases_of(row["region_phrases"]), np.random.default_rng([batch, i]),
                                        perturb_prob=1.0, findings=FINDINGS, region_names=NAMES, prompts=prompts)
                 for i, row in enumerate(chosen)]
        assert check_batch(chosen, items, table) > 0


def test_three_stages_train_on_real_report_sentences(real_sentence_set, tmp_path, dataset_cache, monkeypatch):
    data, sentences = real_sentence_set
    real_loss, fine_losses = AnatomyVLMTask.loss, []
    real_supervision, collated = anatomy_vlm_task.region_text_supervision, []

    def recording_loss(self, output, weights):
        loss, parts = real_loss(self, output, weights)
        if "fine" in parts:
            fine_losses.append(float(parts["fine"].detach()))
        return loss, parts

    def recording_supervision(items):
        supervision = real_supervision(items)
        positive, negative = region_text_masks(**supervision.tensors())
        collated.append((supervision.texts, positive.numpy(), negative.numpy()))
        return supervision

    monkeypatch.setattr(AnatomyVLMTask, "loss", recording_loss)
    monkeypatch.setattr(anatomy_vlm_task, "region_text_supervision", recording_supervision)
    output = tmp_path / "run"
    config = tiny_train_config(data, output, steps=(2, 2, 3))
    config["data"]["perturb_prob"] = 1.0
    train(config)

    assert (output / "model" / "model.safetensors").is_file()
    assert len(fine_losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in fine_losses)
    # the fine stage's batches held real sentences; no text was a positive and a negative of one region
    assert len({text for texts, _, _ in collated for text in texts} & set(sentences)) > 10
    assert all(negative.any() and not (positive & negative).any() for _, positive, negative in collated)

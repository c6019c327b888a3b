"""Write a Hub model card (README.md) into an Anatomy-VLM checkpoint folder, and check it offline.

    python -m train.release.model_card --model outputs/quickstart/model [--eval outputs/quickstart/eval.json]
                               [--repo-id you/anatomy-vlm]

The card is made with huggingface_hub's `ModelCard` / `ModelCardData`: YAML metadata (``library_name:
transformers``, ``pipeline_tag: zero-shot-image-classification``, ``license: apache-2.0``, tags, datasets,
metrics, and a ``model-index`` built from an evaluation JSON: `train.eval.zero_shot`'s ``metrics.json`` or the
quickstart's ``eval.json``), then the `SECTIONS` the best medical cards carry (RAD-DINO, MAIRA-2): model details
and prompts, intended and out-of-scope use, training data (from ``train_config.yaml`` next to the model folder,
when there) and preprocessing, evaluation with what each number means, bias, risks and limitations, compute, the
commands that reproduce each number, how to use it (``trust_remote_code=True``, the pipelines, the transformers
range of pyproject.toml), the licence of every part, citation. Without ``--eval``,
``<model>/../evaluation/imagenome-test/metrics.json`` or ``<model>/../eval.json`` is used when present; without
any, the card has no ``model-index``.

`validate_card` reads the file back with `metadata_load`, `ModelCard.load` and `model_index_to_eval_results`,
all offline (a local `Path` is never looked up on the Hub), and checks that every section is there.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import yaml

from modeling_anatomy_vlm.text_encoder_anatomy_vlm import EMBEDDED_TEXT_ENCODER
from train.config import REPO_ROOT
from train.release.compat import supported_range

CARD_NAME = "README.md"
PIPELINE_TAG = "zero-shot-image-classification"
LICENSE = "apache-2.0"
TAGS = ["medical", "radiology", "chest-x-ray", "vision-language", "zero-shot", "anatomy", "object-detection",
        "custom_code"]
# The embedded default text encoder is this Hub model, shipped inside a PyPI package (see the config).
EMBEDDED_TEXT_ENCODER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
VISION_NAMES = {"vit": "ViT", "dinov2": "DINOv2"}

# (section of metrics.json, task type, [(key, metric type, metric name)]). The Hub groups a model-index by task
# type and data set, so the three zero-shot sections share one task and are told apart by `metric_config`
# (the section) and the metric name.
TASK_NAMES = {PIPELINE_TAG: "Zero-shot classification (image level, anatomy-wise, laterality)",
              "object-detection": "Anatomical region detection"}
TASKS = (
    ("global", PIPELINE_TAG, [("auc", "roc_auc", "global macro AUC"), ("ap", "average_precision", "global macro AP"),
                              ("bmac", "bmac", "global macro BMAC"), ("f1", "f1", "global macro F1")]),
    ("region", PIPELINE_TAG, [("auc", "roc_auc", "anatomy-wise macro AUC"),
                              ("ap", "average_precision", "anatomy-wise macro AP"),
                              ("bmac", "bmac", "anatomy-wise macro BMAC"), ("f1", "f1", "anatomy-wise macro F1")]),
    ("detection", "object-detection", [("miou", "mean_iou", "mean IoU"), ("map", "map", "AP@[.5:.95]"),
                                       ("map_50", "map_50", "AP@.5"), ("acc50", "acc50", "boxes with IoU >= .5")]),
    ("laterality", PIPELINE_TAG, [("accuracy", "accuracy", "laterality accuracy")]),
)
# quickstart eval.json key -> (section, key) of metrics.json
CONTRACT_KEYS = {"global_auc_macro": ("global", "auc"), "region_auc_macro": ("region", "auc"),
                 "detection_miou": ("detection", "miou")}

# The sections every card carries (RAD-DINO's and MAIRA-2's cards are the models); `validate_card` checks them.
SECTIONS = ("Model details", "Intended use", "Out-of-scope use", "Training data and preprocessing", "Evaluation",
            "Bias, risks and limitations", "Compute", "How to reproduce", "How to use", "License", "Citation")

# What each number of the evaluation means, by (metrics.json section, metric type).
METRIC_MEANINGS = {
    ("global", "roc_auc"): "image level: per finding, how well the image score (sigmoid of the image-vs-finding logit) "
                       "ranks images with the finding above images without it (ROC AUC), averaged over findings",
    ("global", "average_precision"): "image level: average precision per finding, averaged over findings",
    ("global", "bmac"): "image level: balanced accuracy (mean of sensitivity and specificity) at each finding's "
                        "threshold chosen on the validation split, averaged",
    ("global", "f1"): "image level: F1 at the validation-chosen thresholds, averaged over findings",
    ("region", "roc_auc"): "anatomy-wise: the same ROC AUC per (region, finding) pair with positives in the split, "
                       "scored by that region's prompt-pair softmax, averaged over pairs",
    ("region", "average_precision"): "anatomy-wise: average precision per (region, finding) pair, averaged",
    ("region", "bmac"): "anatomy-wise: balanced accuracy at validation-chosen thresholds, averaged over pairs",
    ("region", "f1"): "anatomy-wise: F1 at validation-chosen thresholds, averaged over pairs",
    ("detection", "mean_iou"): "mean IoU of each region's predicted box with its annotated box, averaged over regions",
    ("detection", "map"): "COCO-style AP averaged over IoU .50:.95, one box per region and no confidence score "
                          "(so about the square of the share of boxes above each IoU)",
    ("detection", "map_50"): "the same AP at IoU .5",
    ("detection", "acc50"): "share of annotated boxes whose prediction has IoU >= .5",
    ("laterality", "accuracy"): "over (image, finding, left/right region pair) where the finding is on one side only: "
                                "how often the true side scores higher than its mirror (0.5 = chance)",
}

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

Anatomy-VLM localises {{ num_regions }} anatomical regions of a frontal chest X-ray and scores any finding you
type, for the whole image and for each region, zero-shot. It implements *Anatomy-VLM: A Fine-grained
Vision-Language Model for Medical Interpretation* (arXiv 2511.08402): a ViT whose sequence is
[CLS] + patches + {{ num_regions }} learnable anatomy queries (query *i* is region *i* and predicts its box), a
frozen text encoder with a trainable projection, and three objectives: box L1 + GIoU, image-finding sigmoid
loss and region-phrase InfoNCE.

> **Not for clinical use.** {{ data_warning }}

## Model details

| | |
|---|---|
| vision tower | {{ vision }} |
| text tower (frozen, in the weights) | `{{ text_encoder }}`, {{ text_pooling }} pooling, trainable projection |
| joint embedding space | {{ projection_dim }} dimensions |
| regions ({{ num_regions }}) | {{ regions }} |
| default findings ({{ num_findings }}) | {{ findings }} |

Scores. A region score is the softmax over the pair "positive prompt" / "negated prompt" of that region
(templates averaged per side); a global score is the sigmoid of the image-vs-finding logit, prompts averaged over
the templates. Findings are independent: several can be present at once.

| use | templates |
|---|---|
| global (`global_prompt_templates`) | {{ global_templates }} |
| region, positive (`region_prompt_templates`) | {{ region_templates }} |
| region, negated (`region_negated_prompt_templates`) | {{ negated_templates }} |

## Intended use

Research on anatomy-grounded vision-language models for chest radiographs: zero-shot finding scores per image
and per region, region boxes, and region / image embeddings for retrieval or as features for downstream models
(e.g. the segmentation transfer of the project). Outputs are scores for a research pipeline, not diagnoses.

## Out-of-scope use

- Diagnosis, triage, reporting, screening or any other use in patient care: this is not a medical device and
  is not validated clinically. Do not use its outputs to make clinical decisions.
- Lateral views, other modalities (CT, MRI, ultrasound) and non-chest radiographs.
- Reading the scores as calibrated probabilities of disease, or using findings outside the training vocabulary
  without checking them.
- {{ data_out_of_scope }}

## Training data and preprocessing

{{ training_text }}

Preprocessing (`AnatomyVLMImageProcessor`, shipped with the checkpoint; training and inference share it):

- Inputs: PNG, JPEG or TIFF files (PIL), DICOM files (pydicom; compressed transfer syntaxes through the pylibjpeg
  plugins), PIL images or arrays.
- Every image becomes grayscale in [0, 1]: 8- and 16-bit integers by their type's range, colour by ITU-R 601
  luma. DICOM: the modality LUT (rescale slope / intercept), then the first window (centre / width, DICOM's linear
  window) or else the VOI LUT sequence, else the stored bit depth; MONOCHROME1 is inverted so that dense is white;
  multi-frame files are refused. Patient metadata is never read into outputs or messages.
- Resized (bilinear, antialiased) with the aspect ratio kept so the long side is {{ image_size }} px, padded
  with black at the bottom and right to {{ image_size }} x {{ image_size }}, normalised as
  (x - {{ image_mean }}) / {{ image_std }}, repeated to {{ num_channels }} channels.
- Boxes are normalised (cx, cy, w, h) in that padded square; post-processing maps them back to original pixels.

## Evaluation

{{ evaluation_text }}

## Bias, risks and limitations

- {{ data_limitation }}
- Not evaluated by sex, age, ethnicity, device or acquisition protocol; performance on any subgroup is unknown.
- Labels used for training and evaluation come from automatic report parsing or scene graphs (silver
  standard), with their errors. A finding a report does not mention counts as {{ unmentioned }}, which pushes
  scores of under-reported findings down. Rare findings and small regions (e.g. cavoatrial junction, carina)
  are the weakest in the paper.
- Zero-shot scores depend on the wording of the prompts. Where the checkpoint holds `calibration.safetensors`,
  `interpret` applies one Platt scaling per head (image level, anatomy-wise) fitted on the validation split of the
  training data (`python -m train.eval.calibration`): calibrated for that split only, not for another population,
  and only approximately for findings outside the training vocabulary. The same file holds out-of-distribution
  statistics of the training images; `interpret` reports `ood.warning` for an image unlike them. Decision thresholds (`thresholds.json`, when present) were chosen on one validation split by
  balanced accuracy and do not transfer to other populations without re-checking.
- "Right" is the patient's right. A mirrored or rotated image swaps or distorts regions without warning.
- Weights trained on MIMIC-CXR / Chest ImaGenome derive from credentialed PhysioNet data: check its data use
  agreement before sharing such weights.

## Compute

{{ compute_text }}

## How to reproduce

{{ reproduce_text }}

## How to use

The model code ships in this repository (`configuration_anatomy_vlm.py`, `modeling_anatomy_vlm.py`,
`pipeline_anatomy_vlm.py`, ...), so loading needs `trust_remote_code=True`; review the code first. Supported:
transformers {{ transformers_range }} (the project's `make compat` checks the oldest and the newest release).

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{{ repo_id }}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)

result = model.interpret("chest_xray.png", processor, findings=["pleural effusion", "pneumothorax"])[0]
result["findings"]      # {finding: probability} for the whole image
result["regions"][0]    # {"name": "{{ first_region }}", "box": [x1, y1, x2, y2] (original pixels), "scores": {...}}
```

The same numbers through transformers pipelines (registered in `config.json`, `custom_pipelines`):

```python
from transformers import pipeline

classify = pipeline("zero-shot-image-classification", model="{{ repo_id }}", trust_remote_code=True)
classify("chest_xray.png", candidate_labels=["pleural effusion", "pneumothorax"])
# [{"score": p, "label": finding}, ...]: independent sigmoid scores, not a softmax over the labels
detect = pipeline("zero-shot-object-detection", model="{{ repo_id }}", trust_remote_code=True)
detect("chest_xray.png", candidate_labels=["pleural effusion"], threshold=0.5)
# [{"score", "label", "region", "box": {"xmin", "ymin", "xmax", "ymax"}}, ...] per (region, finding)
embed = pipeline("image-feature-extraction", model="{{ repo_id }}", trust_remote_code=True)
embed("chest_xray.png")                # image embedding [1, {{ projection_dim }}]; regions=True adds region embeddings
```

Inputs: PNG, JPEG, TIFF or DICOM paths, PIL images or arrays.

## License

{{ license_text }}

## Citation

Anatomy-VLM: A Fine-grained Vision-Language Model for Medical Interpretation. WACV 2026, arXiv:2511.08402.
This checkpoint is an independent implementation; the paper's authors released no code.
"""


def find_eval_json(model_dir) -> Path | None:
    """The evaluation JSON the card uses by default: the full evaluation, else the quickstart's eval.json."""
    run_dir = Path(model_dir).resolve().parent
    for candidate in (run_dir / "evaluation" / "imagenome-test" / "metrics.json", run_dir / "eval.json"):
        if candidate.is_file():
            return candidate
    return None


def training_config(model_dir) -> dict | None:
    """The trainer's ``train_config.yaml`` next to the model folder (`train/run.py` writes it), if any."""
    path = Path(model_dir).resolve().parent / "train_config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def is_phantom(train_cfg: dict | None, metrics: dict | None) -> bool:
    """Trained or evaluated on the phantom generator's output (its folders hold ``phantom/manifest.json``)."""
    data = (train_cfg or {}).get("data", {})
    if data.get("phantom"):
        return True
    roots = [REPO_ROOT / data["root"] if data.get("root") else None, (metrics or {}).get("data")]
    return any(root and (Path(root) / "phantom" / "manifest.json").is_file() for root in roots)


def dataset_identity(metrics: dict, phantom: bool) -> tuple[str, str]:
    """(name, type) of the evaluation data set for the model-index."""
    if metrics.get("dataset") == "iu_xray":
        return "IU-Xray (Open-i)", "iu-xray"
    if phantom:
        return "Anatomy-VLM phantom chest X-rays (procedural, Chest ImaGenome layout)", "anatomy-vlm-phantom"
    return "Chest ImaGenome (MIMIC-CXR-JPG)", "chest-imagenome"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_values(metrics: dict) -> list[tuple[str, str, str, str, float, list | None]]:
    """(section, task type, metric type, metric name, value, ci95) for every defined metric.

    Reads `train.eval.zero_shot`'s metrics.json (sections with macros and intervals) or the quickstart's eval.json
    (only the contract keys); null metrics are left out.
    """
    rows = []
    for section, task_type, keys in TASKS:
        if isinstance(metrics.get(section), dict):
            block = metrics[section]
            values = block.get("macro", block)
            for key, metric_type, metric_name in keys:
                # laterality has one interval; the other sections one per metric
                interval = block.get("ci95") if section == "laterality" else (block.get("ci95") or {}).get(key)
                if _finite(values.get(key)):
                    rows.append((section, task_type, metric_type, metric_name, float(values[key]), interval))
        else:
            for contract_key, (contract_section, key) in CONTRACT_KEYS.items():
                if contract_section == section and _finite(metrics.get(contract_key)):
                    _, metric_type, metric_name = next(k for k in keys if k[0] == key)
                    rows.append((section, task_type, metric_type, metric_name, float(metrics[contract_key]), None))
    return rows


def eval_results(metrics: dict, dataset_name: str, dataset_type: str):
    from huggingface_hub import EvalResult

    split = metrics.get("split", "test")
    return [EvalResult(task_type=task_type, task_name=TASK_NAMES[task_type], dataset_type=dataset_type,
                       dataset_name=dataset_name, dataset_split=split, metric_type=metric_type,
                       metric_name=metric_name, metric_config=section, metric_value=round(value, 4))
            for section, task_type, metric_type, metric_name, value, _ in metric_values(metrics)]


def _evaluation_text(metrics: dict | None, source: Path | None, dataset_name: str) -> str:
    if not metrics:
        return ("Not evaluated yet: `python -m train.eval.zero_shot --model <this folder> --data <root>` measures "
                "global and anatomy-wise zero-shot classification, detection and laterality.")
    lines = [f"{dataset_name}, split `{metrics.get('split', 'test')}`, {metrics.get('num_images', '?')} images "
             f"(from `{source.name if source else 'eval JSON'}`). Brackets: 95 % bootstrap intervals over images.", "",
             "| metric | value | what it measures |", "|---|---|---|"]
    for section, _, metric_type, metric_name, value, interval in metric_values(metrics):
        shown = f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
        lines.append(f"| {metric_name} | {shown} | {METRIC_MEANINGS[(section, metric_type)]} |")
    lines += _zero_shot_beside_lines(metrics)
    undefined = metrics.get("undefined_global") or []
    if undefined:
        lines += ["", f"Findings without positives in the split (undefined, left out of the macros): "
                      f"{', '.join(undefined)}."]
    lines += ["", "Zero-shot: no finding-specific head is trained for the evaluation; every score comes from the "
                  "prompts above. A class with no positives or no negatives in the split is undefined, never 0 or 1."]
    return "\n".join(lines)


def _zero_shot_beside_lines(metrics: dict) -> list[str]:
    """The numbers beside the trained prompts: held-out wording (the quickstart's `*_heldout_wording` keys or
    metrics.json's `heldout_wording` section) and findings withheld from training, each with what it means."""
    section = metrics.get("heldout_wording") if isinstance(metrics.get("heldout_wording"), dict) else {}
    reworded = {task: metrics.get(f"{task}_auc_macro_heldout_wording", section.get(f"{task}_auc_macro"))
                for task in ("global", "region")}
    lines = []
    if any(_finite(value) for value in reworded.values()):
        shown = ", ".join(f"{name} macro AUC {reworded[task]:.3f}" for task, name in
                          (("global", "global"), ("region", "anatomy-wise")) if _finite(reworded[task]))
        lines += ["", f"Held-out wording: {shown}, the same images and labels scored with prompts that no training "
                      "text contains (`HELDOUT_WORDING` of `train.eval.zero_shot`). The prompts above are training "
                      "texts, so the table partly measures a head trained on its own wording; this measures transfer "
                      "to new wording."]
    unseen = {name: value for name, value in (metrics.get("global_auc_unseen_findings") or {}).items()
              if _finite(value)}
    if unseen:
        lines += ["", "Findings withheld from training (`data.unseen_findings`: never named in a training text), "
                      "scored by name: " + ", ".join(f"{name} global AUC {value:.3f}" for name, value in unseen.items())
                  + ". This is zero-shot to a finding the model never read about."]
    return lines


def _training_text(train_cfg: dict | None, phantom: bool) -> str:
    if not train_cfg:
        return "Not recorded next to this checkpoint (no `train_config.yaml`)."
    stages = ", ".join(f"{s['name']} {s['steps']} ({' + '.join(s.get('loss_weights', {}))})"
                       for s in train_cfg.get("stages", []))
    data = train_cfg.get("data", {})
    batch = train_cfg.get("training", {}).get("batch_size", "?")
    if phantom:
        spec = data.get("phantom") or {}
        command = (f" (`python -m train.data.phantom --n {spec.get('n')} --seed {spec.get('seed', 0)} "
                   f"--size {spec.get('size', 512)}`)" if spec else f" at `{data.get('root', '?')}`")
        source = (f"the procedurally generated phantom set{command}: drawn anatomy with findings placed in known "
                  "regions, reports and Chest ImaGenome-style scene graphs; no patient data")
    else:
        source = (f"Chest ImaGenome 1.0.0 silver scene graphs (a box and finding attributes per region) over the "
                  f"frontal MIMIC-CXR-JPG 2.0.0 images they describe, in their official splits, the gold-standard "
                  f"images (`images_to_avoid.csv`) left out (`{data.get('root', '?')}`; docs/DATA.md)")
    unmentioned = "absent" if data.get("unmentioned_as_negative", True) else "unknown"
    return (f"Trained on {source}.\n\nSplit `{data.get('train_split', 'train')}`, batch size {batch}; stages "
            f"(steps, losses): {stages}. A finding the report does not mention counts as {unmentioned}.")


def _compute_text(train_cfg: dict | None, metrics: dict | None) -> str:
    parts = []
    if train_cfg:
        training = train_cfg.get("training", {})
        steps = sum(stage.get("steps", 0) for stage in train_cfg.get("stages", []))
        parts.append(f"{steps} optimiser steps of batch {training.get('batch_size', '?')} per process (gradient "
                     f"accumulation {training.get('gradient_accumulation_steps', 1)}), mixed precision "
                     f"`{training.get('mixed_precision', '?')}` (from `train_config.yaml`).")
    if metrics and _finite(metrics.get("train_seconds")):
        parts.append(f"`train_seconds` of the evaluation JSON: {metrics['train_seconds']:.0f} s from the start of the "
                     "run to the end of training (data generation included); the hardware is not recorded.")
    if not parts:
        parts.append("Not recorded with this checkpoint.")
    parts.append("For reference, `make quickstart` (the phantom configuration, 1,400 training steps in fp32) took "
                 "18 min 26 s wall on one 2-core CPU, set-up included; the host's speed varies from day to day "
                 "(the project's README, \"Results\").")
    return " ".join(parts)


def _reproduce_text(phantom: bool, source: Path | None) -> str:
    lines = ["From a clone of the project (`make setup`), each number with the command that makes it:", "", "```bash",
             "python -m train.run --config <train_config.yaml of this run>            # the weights",
             "python -m train.eval.zero_shot --model <model folder> --data <data root>   # the evaluation table",
             "python -m train.release.model_card --model <model folder>"
             + (f" --eval <{source.name}>" if source else "") + "   # this card",
             "make compat                                          # the transformers versions under How to use",
             "```"]
    if phantom:
        lines += ["", "The phantom set is generated from its `data.phantom` settings on first use; `make quickstart` "
                      "runs training and evaluation of the quickstart configuration and writes "
                      "`outputs/quickstart/eval.json`."]
    return "\n".join(lines)


def _license_text(text_encoder: str, base_models: list[str], phantom: bool, dataset_type: str) -> str:
    if text_encoder == EMBEDDED_TEXT_ENCODER:
        text_tower = f"`{EMBEDDED_TEXT_ENCODER_HUB_ID}`: Apache-2.0"
    else:
        text_tower = f"`{text_encoder}`: its own licence (see its model card)"
    lines = ["| part | licence |", "|---|---|",
             "| model code (`*_anatomy_vlm.py`) | Apache-2.0 |",
             f"| frozen text tower weights | {text_tower} |"]
    lines += [f"| vision tower initialisation `{name}` | its own licence (see its model card) |"
              for name in base_models if name != EMBEDDED_TEXT_ENCODER_HUB_ID]
    if phantom:
        lines += ["| these weights | Apache-2.0 (trained on generated phantom images only) |",
                  "| training data | made by the project's phantom generator (Apache-2.0); no patient data |"]
    else:
        lines += ["| these weights | derived from PhysioNet credentialed data: check its data use agreement before "
                  "sharing them, whatever the metadata says |",
                  "| MIMIC-CXR-JPG 2.0.0, Chest ImaGenome 1.0.0 | PhysioNet credentialed access: a credentialed "
                  "account and the signed PhysioNet credentialed data use agreement |"]
    if dataset_type == "iu-xray":
        lines.append("| IU-Xray (Open-i, U.S. National Library of Medicine), evaluation only | the distributor's "
                     "terms; copies on the Hub state CC BY-NC-ND 4.0 (not checked against Open-i's own terms) |")
    return "\n".join(lines)


def _image_processor_config(model_dir: Path) -> dict:
    """The image processor's saved settings (in processor_config.json or preprocessor_config.json), if any."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        if (model_dir / name).is_file():
            data = json.loads((model_dir / name).read_text())
            return data.get(key) or {} if key else data
    return {}


def _templates(values) -> str:
    return ", ".join(f"`{t}`" for t in values)


def build_card(model_dir, metrics: dict | None = None, source: Path | None = None, repo_id: str | None = None):
    """The `ModelCard` of a checkpoint folder (config.json read as JSON: no model code runs)."""
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    train_cfg = training_config(model_dir)
    phantom = is_phantom(train_cfg, metrics)
    dataset_name, dataset_type = dataset_identity(metrics or {}, phantom)
    repo_id = repo_id or model_dir.resolve().parent.name + "-anatomy-vlm"
    model_name = repo_id.split("/")[-1]
    vision, text_encoder = config["vision_config"], config.get("text_model_name_or_path", "?")
    base_models = []
    if text_encoder == EMBEDDED_TEXT_ENCODER:
        base_models.append(EMBEDDED_TEXT_ENCODER_HUB_ID)
    vision_init = (train_cfg or {}).get("model", {}).get("vision_init")
    if vision_init and "/" in vision_init and not Path(vision_init).exists():
        base_models.append(vision_init)  # a Hub id, not a local folder
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        license=LICENSE,
        tags=TAGS + (["phantom-data"] if phantom else []),
        datasets=[dataset_type],
        metrics=["roc_auc", "average_precision", "bmac", "f1", "mean_iou", "accuracy"],
        base_model=base_models or None,
        eval_results=eval_results(metrics, dataset_name, dataset_type) if metrics else None,
    )
    if phantom:
        data_warning = ("These weights were trained on procedurally generated phantom images: they demonstrate the "
                        "mechanics of the model and its training, and know nothing about real radiographs.")
        data_limitation = ("Phantom-trained weights have never seen a real chest X-ray; their scores on real images "
                           "are meaningless, and their metrics measure the pipeline, not medical performance.")
        data_out_of_scope = "Any use of these phantom-trained weights on real radiographs other than testing software."
    else:
        data_warning = "A research model; its outputs are not diagnoses."
        data_limitation = ("Trained on one hospital's data (MIMIC-CXR, Beth Israel Deaconess): expect shifts on other "
                           "populations, devices and acquisition protocols.")
        data_out_of_scope = "Populations, devices or protocols unlike the training data without a new evaluation."
    image_processor = _image_processor_config(model_dir)
    unmentioned = (train_cfg or {}).get("data", {}).get("unmentioned_as_negative", True)
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        repo_id=repo_id,
        data_warning=data_warning,
        data_limitation=data_limitation,
        data_out_of_scope=data_out_of_scope,
        unmentioned="absent" if unmentioned else "unknown",
        vision=(f"{VISION_NAMES.get(vision['model_type'], vision['model_type'])}, {vision['image_size']} px, "
                f"patch {vision['patch_size']}"
                f"{' (BatchNorm CNN patch embedding)' if config.get('patch_embedding') == 'conv' else ''}, "
                f"{vision['num_hidden_layers']} layers, width {vision['hidden_size']}"),
        text_encoder=text_encoder,
        text_pooling=config.get("text_pooling", "mean"),
        projection_dim=config["projection_dim"],
        num_regions=len(config["region_names"]),
        regions=", ".join(config["region_names"]),
        first_region=config["region_names"][0],
        num_findings=len(config["findings"]),
        findings=", ".join(config["findings"]),
        image_size=image_processor.get("size", vision["image_size"]),
        image_mean=image_processor.get("image_mean", 0.5),
        image_std=image_processor.get("image_std", 0.5),
        num_channels=image_processor.get("num_channels", vision.get("num_channels", 3)),
        training_text=_training_text(train_cfg, phantom),
        evaluation_text=_evaluation_text(metrics, source, dataset_name),
        compute_text=_compute_text(train_cfg, metrics),
        reproduce_text=_reproduce_text(phantom, source),
        license_text=_license_text(text_encoder, base_models, phantom, dataset_type),
        transformers_range=supported_range(),
        global_templates=_templates(config["global_prompt_templates"]),
        region_templates=_templates(config["region_prompt_templates"]),
        negated_templates=_templates(config["region_negated_prompt_templates"]),
    )


def write_card(model_dir, eval_json=None, repo_id: str | None = None, path=None) -> Path:
    """Build the card of `model_dir` and save it to `path` (default ``model_dir/README.md``); returns the path."""
    source = Path(eval_json) if eval_json else find_eval_json(model_dir)
    metrics = json.loads(source.read_text()) if source else None
    card = build_card(model_dir, metrics, source, repo_id)
    path = Path(path) if path else Path(model_dir) / CARD_NAME
    card.save(path)
    validate_card(path)
    return path


def missing_sections(markdown: str) -> list[str]:
    """The `SECTIONS` without a ``## <section>`` heading in `markdown`."""
    headings = set(re.findall(r"^##\s+(.+?)\s*$", markdown, flags=re.MULTILINE))
    return [section for section in SECTIONS if section not in headings]


def validate_card(path) -> dict:
    """Parse a card offline and check the metadata the Hub needs; returns a summary, raises `ValueError`."""
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    path = Path(path)
    metadata = metadata_load(path)
    if not metadata:
        raise ValueError(f"{path}: no YAML metadata block")
    expected = {"library_name": "transformers", "pipeline_tag": PIPELINE_TAG, "license": LICENSE}
    wrong = {k: metadata.get(k) for k, v in expected.items() if metadata.get(k) != v}
    if wrong:
        raise ValueError(f"{path}: metadata {wrong}, expected {expected}")
    card = ModelCard.load(path)  # a Path: read from disk, never the Hub
    missing = missing_sections(card.text)
    if missing:
        raise ValueError(f"{path}: sections missing: {missing}")
    results = []
    if "model-index" in metadata:
        name, results = model_index_to_eval_results(metadata["model-index"])
        if not results or any(not _finite(r.metric_value) for r in results):
            raise ValueError(f"{path}: model-index without results or with non-numeric values")
        if card.data.eval_results != results or name != card.data.model_name:
            raise ValueError(f"{path}: model-index does not round-trip through ModelCardData")
    return {"model_name": card.data.model_name, "num_results": len(results), "tags": metadata.get("tags", []),
            "datasets": metadata.get("datasets", [])}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--eval", help="evaluation JSON: metrics.json of train.eval.zero_shot or the quickstart eval.json")
    parser.add_argument("--repo-id", help="Hub repo id shown in the loading example (default: a name from the folder)")
    parser.add_argument("--out", help="where to write the card (default <model>/README.md)")
    args = parser.parse_args(argv)
    path = write_card(args.model, args.eval, args.repo_id, args.out)
    summary = validate_card(path)
    print(f"wrote {path}: model-index with {summary['num_results']} results")
    return path


if __name__ == "__main__":
    main()

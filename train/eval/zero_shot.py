"""Evaluate an Anatomy-VLM checkpoint: zero-shot global and anatomy-wise classification, detection, laterality.

    python -m train.eval.zero_shot --model outputs/quickstart/model --data data/phantom-quickstart [--split test]
    python -m train.eval.zero_shot --model M --data iu-xray --dataset iu_xray [--threshold-data data/phantom-quickstart]
        [--out DIR] [--bootstrap 200] [--findings "pleural effusion" "pneumothorax"] [--recompute-thresholds]

Tasks (PAPER.md):
* global: the image embedding ([CLS] joined with the mean patch token) against the ensembled prompts of each finding (`model.prompt_embeds`),
  one class per finding;
* anatomy-wise: each region's score for each finding (softmax over "<finding> in the <region>" / its negation);
  a class is a (region, finding) pair with at least one positive in the split (key ``"region|finding"``); the
  other pairs (most: a clavicle fracture is never in a lung zone) are not classes of that split;
* detection: the box of each region against the annotated one: IoU, AP@.5, AP@[.5:.95], acc50 (`box_iou`);
* laterality: over every (image, finding, mirrored region pair) where the finding is present in exactly one
  region of a left/right pair (left/right lung, lung zones, hila, apices, costophrenic angles, hemidiaphragms,
  clavicles), the fraction where the region score for that finding is higher on the true side than on the
  mirror; ties count as wrong. One lateral finding usually gives several such trials (lung, zone, angle).

Metrics per class and macro: AUC, AP, BMAC, F1 (`train.eval.metrics`). BMAC and F1 need decision thresholds: they
are chosen on the VALIDATION split only (balanced accuracy, `select_thresholds`) and saved with the model as
``thresholds.json`` (global per finding, region per "region|finding", null = no positives in validation, then
0.5 is used). The file records the validation split's image-id and label hashes and the weights' hash; it is
reused while they match and recomputed otherwise (or with ``--recompute-thresholds``), so the test split can
never move a threshold (`train.eval.thresholds`). Macro metrics get percentile bootstrap 95 % intervals over images (``--bootstrap N``
resamples, default 200; 0 = none). A class without positives or without negatives in the split is undefined:
null in the JSON with a warning, never 0 or 1, and left out of the macro averages.

Where the labels come from:
* Chest ImaGenome (``--dataset imagenome``; the phantom set is read the same way): the scene graph's per-region
  attributes (`train.data.imagenome`): a region label is 1 when an attribute says the finding is present there,
  0 when it says absent, -1 when not mentioned; the global label is 1 when present in any region (including the
  boxes the model does not use). Boxes are the scene graph objects' ``original_x1..y2``. Thresholds come from
  the ``validate`` split of the same root (``--threshold-data`` / ``--threshold-split`` to change it).
* IU-Xray (``--dataset iu_xray``; ``--data`` holds ``ecgen-radiology/`` and ``NLMCXR_png/``): the FINDINGS and
  IMPRESSION text of each report through the rule-based parser `train.text.parser.parse_report` (the loader
  `train.data.iu_xray` does it); global task only (no boxes; region labels would be the parser's unvalidated
  placements). Default classes: the CheXpert competition five in our label strings: atelectasis, enlarged cardiac
  silhouette (cardiomegaly), consolidation, pulmonary edema/hazy opacity (edema), pleural effusion. IU-Xray has
  no validation split: thresholds come from the model's ``thresholds.json``, or, when ``--threshold-data`` names
  a Chest ImaGenome-layout root, from its validation split (then saved to the file).
Label policy: findings the source does not mention count as absent (``--unmentioned negative``, Chest ImaGenome
practice) or are left out (``--unmentioned unknown``).

Calibration: a checkpoint with ``calibration.safetensors`` (`train.eval.calibration`) gets a ``calibration``
section: the expected calibration error of each head before and after its Platt scaling, on the validation split
it was fitted on (recorded in the file) and on the evaluated split, and how many of the evaluated images get an
out-of-distribution warning. Scores, thresholds and every other metric stay those of the raw scores (the scaling
is monotone: AUC and AP are the same).

Validation: when the thresholds are fitted, the threshold split's macro AUCs and mIoU (``validation`` in the JSON,
a line in the table; null when a saved ``thresholds.json`` is reused), so settings can be chosen there.

Held-out wording: every class is also scored with prompts worded unlike any training text (`HELDOUT_WORDING`),
from the same forward pass: ``heldout_wording`` in the JSON (macro AUC, intervals), a line in the table.

Outputs in ``--out`` (default ``<model>/../evaluation/<dataset>-<split>``): ``metrics.json``, ``roc_global.png``,
``region_auc_heatmap.png`` (regions x findings), ``boxes.png`` (predicted dashed vs true solid, 4 images;
`train.eval.plots`), with a calibration ``reliability.png`` (before / after, per head); a readable table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modeling_anatomy_vlm.calibration_anatomy_vlm import image_statistics
from train.config import DataConfig
from train.data.common import make_transform
from train.engine.hub import resolve_model_location
from train.data.registry import DATASETS as REGISTRY, load_finding_split
from train.eval.metrics import bootstrap_ci, load_metric
from train.eval.plots import plot_boxes, plot_region_heatmap, plot_reliability, plot_roc_curves
from train.eval.thresholds import FALLBACK_THRESHOLD, decision_thresholds
from train.text.vocabulary import mirror_pairs

DATASETS = tuple(name for name, entry in REGISTRY.items() if entry.findings is not None)
# CheXpert competition classes (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion) as our labels.
IU_XRAY_FINDINGS = ("atelectasis", "enlarged cardiac silhouette", "consolidation", "pulmonary edema/hazy opacity",
                    "pleural effusion")
CLASS_METRICS = ("auc", "ap", "bmac", "f1")
DETECTION_METRICS = ("miou", "map", "map_50", "acc50")
BOOTSTRAP_ALPHA = 0.05
# Prompt wordings that no training text uses (`tests/test_zero_shot_wording.py` checks them against every text the
# quickstart trains on): the `*_heldout_wording` metrics score the same images and labels with these instead of the
# config's templates, so they show what the trained-prompt numbers owe to having trained on their exact wording.
HELDOUT_WORDING = {
    "global": ("a chest radiograph showing {finding}", "radiographic evidence of {finding}"),
    "region": ("{finding} is seen at the {region}", "the {region} shows {finding}"),
    "region_negated": ("the {region} shows no sign of {finding}", "{finding} is absent at the {region}"),
}


@dataclass
class Predictions:
    """Per image of a split: model outputs and labels, in `model.config.region_names` / `findings` order."""

    image_ids: list[str]
    pred_boxes: np.ndarray  # [N, R, 4] xyxy original pixels
    true_boxes: np.ndarray  # [N, R, 4] xyxy original pixels, NaN = not annotated
    region_scores: np.ndarray  # [N, R, F]
    global_scores: np.ndarray  # [N, F]
    region_labels: np.ndarray  # [N, R, F] 1 / 0 / -1
    global_labels: np.ndarray  # [N, F] 1 / 0 / -1
    region_log_odds: np.ndarray  # [N, R, F] the logits under region_scores (what calibration scales)
    global_logits: np.ndarray  # [N, F] the logits under global_scores
    image_embeds: np.ndarray  # [N, D] what the OOD statistics compare
    image_statistics: np.ndarray  # [N, M] `calibration_anatomy_vlm.image_statistics` of the processed image
    # wording name -> (global_scores [N, F], region_scores [N, R, F]) of the same images scored with other prompts
    reworded: dict = dataclasses.field(default_factory=dict)

    def with_wording(self, name: str) -> "Predictions":
        """These predictions with the scores of the prompts worded `name` (`predict(..., wordings=...)`)."""
        global_scores, region_scores = self.reworded[name]
        return dataclasses.replace(self, global_scores=global_scores, region_scores=region_scores, reworded={})

    def of_findings(self, index) -> "Predictions":
        """These predictions restricted to the findings at `index` (the last axis of every per-finding array)."""
        index = np.asarray(index, dtype=int)
        per_finding = ("region_scores", "global_scores", "region_labels", "global_labels", "region_log_odds",
                       "global_logits")
        return dataclasses.replace(
            self, **{key: getattr(self, key)[..., index] for key in per_finding},
            reworded={name: (g[..., index], r[..., index]) for name, (g, r) in self.reworded.items()})

    def labels(self, unmentioned_as_negative: bool) -> tuple[np.ndarray, np.ndarray]:
        """(global `[N, F]`, region `[N, R, F]`) labels under the label policy: unmentioned (-1) becomes absent (0)
        under the Chest ImaGenome practice; otherwise it stays unknown."""
        if not unmentioned_as_negative:
            return self.global_labels, self.region_labels
        return np.clip(self.global_labels, 0, None), np.clip(self.region_labels, 0, None)


@torch.no_grad()
def predict(model, processor, dataset, findings=None, batch_size: int = 32, progress: bool = True,
            wordings: dict | None = None) -> Predictions:
    """Run the model over a loader data set (`train.data` schema); unreadable images are skipped with a warning.

    `wordings`: {name: templates as in `model.prompt_groups`}: each image is also scored with prompts worded that
    way (`Predictions.reworded`, `Predictions.with_wording`), from the same forward pass."""
    from tqdm import tqdm

    findings = list(model.config.findings if findings is None else findings)
    model.eval()
    prompts = model.prompt_embeds(findings, processor.tokenizer)
    other_prompts = {name: model.prompt_embeds(findings, processor.tokenizer, templates)
                     for name, templates in (wordings or {}).items()}
    reworded = {name: ([], []) for name in other_prompts}
    dataset = dataset.with_transform(make_transform(processor, on_error="skip"))
    out = {k: [] for k in ("image_ids", "pred_boxes", "true_boxes", "region_scores", "global_scores",
                           "region_labels", "global_labels", "region_log_odds", "global_logits", "image_embeds",
                           "image_statistics")}
    for start in tqdm(range(0, len(dataset), batch_size), desc="evaluate", unit="batch", disable=not progress):
        batch = dataset[start : start + batch_size]
        keep = [i for i, ok in enumerate(batch["image_ok"]) if ok]
        if not keep:
            continue
        pixel_values = processor.image_processor.normalize_pixels(torch.stack([batch["pixels"][i] for i in keep]))
        scores = model.zero_shot_scores(pixel_values, prompts)
        sizes = torch.stack([batch["original_sizes"][i] for i in keep])
        boxes = processor.post_process_boxes(scores["pred_boxes"].float().cpu(), sizes)
        out["image_ids"] += [batch["image_id"][i] for i in keep]
        out["pred_boxes"].append(boxes.numpy())
        out["true_boxes"].append(np.stack([np.asarray(batch["boxes"][i], dtype=np.float32) for i in keep]))
        out["region_scores"].append(scores["region_scores"].float().cpu().numpy())
        out["global_scores"].append(scores["global_scores"].float().cpu().numpy())
        out["region_labels"].append(np.stack([np.asarray(batch["region_labels"][i]) for i in keep]))
        out["global_labels"].append(np.stack([np.asarray(batch["global_labels"][i]) for i in keep]))
        for key in ("region_log_odds", "global_logits", "image_embeds"):
            out[key].append(scores[key].float().cpu().numpy())
        for name, other in other_prompts.items():
            other_scores = model.score_embeddings(scores["image_embeds"], scores["region_embeds"], other)
            reworded[name][0].append(other_scores["global_scores"].float().cpu().numpy())
            reworded[name][1].append(other_scores["region_scores"].float().cpu().numpy())
        out["image_statistics"].append(image_statistics(pixel_values, sizes, processor.image_processor).numpy())
    if not out["image_ids"]:
        raise ValueError("evaluate: no readable images in the split")
    return Predictions(out["image_ids"], *(np.concatenate(out[k]) for k in list(out)[1:]),
                       reworded={name: tuple(map(np.concatenate, parts)) for name, parts in reworded.items()})


# ------------------------------------------------------------------------------------------------ metrics
@functools.cache
def _metric(name: str):
    return load_metric(name, keep_in_memory=True)


def _float_or_none(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _interval(low, high) -> list | None:
    return None if not (math.isfinite(low) and math.isfinite(high)) else [float(low), float(high)]


def _warn_undefined(section: str, names: list[str], why: str) -> None:
    if names:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.warn(f"{section}: {len(names)} undefined classes ({why}), reported as null: {shown}", stacklevel=3)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, names: list[str], thresholds: np.ndarray,
                           n_bootstrap: int = 0, seed: int = 0, section: str = "classification") -> dict:
    """AUC, AP, BMAC and F1 per class and macro (over defined classes), with bootstrap intervals of the macros.

    `scores`, `labels` `[N, C]` (labels 1 / 0 / -1 = unknown); `thresholds` `[C]`, NaN = fall back to 0.5.
    """
    filled = np.where(np.isnan(thresholds), FALLBACK_THRESHOLD, thresholds)

    def compute(s, y):
        auc_ap_f1 = _metric("multilabel_auc_ap")._compute(s, y, thresholds=filled, class_names=names)
        bmac = _metric("bmac")._compute(s, y, thresholds=filled, class_names=names)
        return auc_ap_f1, bmac

    def macros(s, y):
        auc_ap_f1, bmac = compute(s, y)
        return np.array([auc_ap_f1["roc_auc"], auc_ap_f1["average_precision"], bmac["bmac"], auc_ap_f1["f1"]])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the modules warn per call; one summary warning is given below
        auc_ap_f1, bmac = compute(scores, labels)
        intervals = bootstrap_ci(macros, scores, labels, n_resamples=n_bootstrap, alpha=BOOTSTRAP_ALPHA,
                                 seed=seed) if n_bootstrap else None
    per_class = {}
    for c, name in enumerate(names):
        values = (auc_ap_f1["roc_auc_per_class"][name], auc_ap_f1["average_precision_per_class"][name],
                  bmac["bmac_per_class"][name], auc_ap_f1["f1_per_class"][name])
        per_class[name] = {key: _float_or_none(v) for key, v in zip(CLASS_METRICS, values)}
        per_class[name].update(threshold=_float_or_none(thresholds[c]), positives=int((labels[:, c] == 1).sum()),
                               negatives=int((labels[:, c] == 0).sum()))
    undefined = [name for name, values in per_class.items() if values["auc"] is None]
    _warn_undefined(section, undefined, "no positives or no negatives in the split")
    macro = (auc_ap_f1["roc_auc"], auc_ap_f1["average_precision"], bmac["bmac"], auc_ap_f1["f1"])
    return {
        "num_classes": len(names),
        "undefined": undefined,
        "macro": {key: _float_or_none(v) for key, v in zip(CLASS_METRICS, macro)},
        "ci95": {key: _interval(lo, hi) for key, lo, hi in zip(CLASS_METRICS, *intervals)} if intervals else None,
        "per_class": per_class,
    }


def detection_metrics(pred: Predictions, region_names, n_bootstrap: int = 0, seed: int = 0) -> dict | None:
    """Per-region IoU, AP@[.5:.95], AP@.5, acc50 and their macros; None when no box is annotated (IU-Xray)."""
    annotated = ~np.isnan(pred.true_boxes).any(-1)  # [N, R]
    if not annotated.any():
        return None
    names = list(region_names)

    def macros(p, t):
        result = _metric("box_iou")._compute(p, t, region_names=names)
        return np.array([result[key] for key in DETECTION_METRICS])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _metric("box_iou")._compute(pred.pred_boxes, pred.true_boxes, region_names=names)
        intervals = bootstrap_ci(macros, pred.pred_boxes, pred.true_boxes, n_resamples=n_bootstrap,
                                 alpha=BOOTSTRAP_ALPHA, seed=seed) if n_bootstrap else None
    per_region = {
        name: {**{key: _float_or_none(result[f"{key}_per_region"][name]) for key in ("iou", "ap", "ap50", "acc50")},
               "annotated": int(annotated[:, r].sum())}
        for r, name in enumerate(names)
    }
    undefined = [name for name, values in per_region.items() if values["iou"] is None]
    _warn_undefined("detection", undefined, "region annotated in no image")
    return {
        **{key: _float_or_none(result[key]) for key in DETECTION_METRICS},
        "ci95": {key: _interval(lo, hi) for key, lo, hi in zip(DETECTION_METRICS, *intervals)} if intervals else None,
        "undefined": undefined,
        "per_region": per_region,
    }


def mirrored_region_pairs(region_names) -> list[tuple[int, int]]:
    """(right region, its left mirror) index pairs among `region_names` (`train.text.vocabulary.Region.mirror`)."""
    return mirror_pairs(region_names)


def laterality_trials(region_scores: np.ndarray, region_labels: np.ndarray, region_names,
                      unmentioned_as_negative: bool = True):
    """Which (image, mirrored pair, finding) are trials `[N, P, F]`, which are correct, and the pairs.

    A trial: the finding is present (1) in one region of a left/right pair and absent in its mirror (0, or -1 under
    the unmentioned-as-negative policy). Correct: the true side's score is strictly higher than the mirror's.
    """
    pairs = mirrored_region_pairs(region_names)
    if not pairs:
        empty = np.zeros((len(region_labels), 0, region_labels.shape[-1]), dtype=bool)
        return empty, empty, pairs
    right, left = (np.array(side) for side in zip(*pairs))
    absent_floor = -1 if unmentioned_as_negative else 0
    label_r, label_l = region_labels[:, right], region_labels[:, left]  # [N, P, F]
    right_only = (label_r == 1) & (label_l <= 0) & (label_l >= absent_floor)
    left_only = (label_l == 1) & (label_r <= 0) & (label_r >= absent_floor)
    score_r, score_l = region_scores[:, right], region_scores[:, left]
    correct = (right_only & (score_r > score_l)) | (left_only & (score_l > score_r))
    return right_only | left_only, correct, pairs


def laterality_accuracy(region_scores: np.ndarray, region_labels: np.ndarray, region_names, findings,
                        unmentioned_as_negative: bool = True, n_bootstrap: int = 0, seed: int = 0) -> dict:
    """Fraction of laterality trials (see `laterality_trials`) won by the true side, per pair and per finding."""
    trials, correct, pairs = laterality_trials(region_scores, region_labels, region_names, unmentioned_as_negative)

    def fraction(won, total):
        return float(won.sum() / total.sum()) if total.sum() else None

    def accuracy(s, y):
        t, c, _ = laterality_trials(s, y, region_names, unmentioned_as_negative)
        return c.sum() / t.sum() if t.sum() else np.nan

    value = fraction(correct, trials)
    if value is None:
        warnings.warn("laterality: no finding present on exactly one side of a mirrored region pair; "
                      "accuracy undefined, reported as null", stacklevel=2)
    interval = None
    if n_bootstrap and value is not None:
        interval = _interval(*bootstrap_ci(accuracy, region_scores, region_labels, n_resamples=n_bootstrap,
                                           alpha=BOOTSTRAP_ALPHA, seed=seed))
    return {
        "accuracy": value,
        "ci95": interval,
        "num_trials": int(trials.sum()),
        "num_correct": int(correct.sum()),
        "per_pair": {f"{region_names[r]} / {region_names[l]}": {"accuracy": fraction(correct[:, p], trials[:, p]),
                                                                  "num_trials": int(trials[:, p].sum())}
                     for p, (r, l) in enumerate(pairs)},
        "per_finding": {f: {"accuracy": fraction(correct[..., j], trials[..., j]),
                            "num_trials": int(trials[..., j].sum())}
                        for j, f in enumerate(findings) if trials[..., j].any()},
    }


def region_classes(region_labels: np.ndarray, region_names, findings) -> tuple[np.ndarray, list[str]]:
    """Flat indices into `[R * F]` and "region|finding" names of the pairs with a positive label in the split."""
    flat = np.flatnonzero((region_labels == 1).any(0).reshape(-1))
    names = [f"{region_names[k // len(findings)]}|{findings[k % len(findings)]}" for k in flat]
    return flat, names


def compute_metrics(pred: Predictions, region_names, findings, thresholds: dict | None = None,
                    unmentioned_as_negative: bool = True, n_bootstrap: int = 0, seed: int = 0,
                    tasks=("global", "region", "detection", "laterality")) -> dict:
    """Every metric of `tasks` (the others are None), plus the quickstart contract keys at the top level.

    `thresholds`: ``{"global": {finding: t}, "region": {"region|finding": t}}`` as in ``thresholds.json``;
    missing or null entries fall back to 0.5 (AUC and AP do not use them).
    """
    region_names, findings = list(region_names), list(findings)
    thresholds = thresholds or {"global": {}, "region": {}}
    global_labels, region_labels = pred.labels(unmentioned_as_negative)

    def threshold_array(table: dict, names: list[str]) -> np.ndarray:
        return np.array([np.nan if table.get(name) is None else table[name] for name in names], dtype=float)

    result = {"num_images": len(pred.image_ids), "global": None, "region": None, "detection": None, "laterality": None}
    if "global" in tasks:
        result["global"] = classification_metrics(
            pred.global_scores, global_labels, findings, threshold_array(thresholds["global"], findings),
            n_bootstrap, seed, "global")
    if "region" in tasks:
        flat, names = region_classes(region_labels, region_names, findings)
        n = len(pred.image_ids)
        result["region"] = classification_metrics(
            pred.region_scores.reshape(n, -1)[:, flat], region_labels.reshape(n, -1)[:, flat], names,
            threshold_array(thresholds["region"], names), n_bootstrap, seed, "anatomy-wise")
        result["region"]["per_region"] = per_region_summary(result["region"]["per_class"], region_names)
    if "detection" in tasks:
        result["detection"] = detection_metrics(pred, region_names, n_bootstrap, seed)
    if "laterality" in tasks:
        result["laterality"] = laterality_accuracy(pred.region_scores, pred.region_labels, region_names, findings,
                                                   unmentioned_as_negative, n_bootstrap, seed)
    result.update(
        detection_miou=result["detection"]["miou"] if result["detection"] else None,
        global_auc_macro=result["global"]["macro"]["auc"] if result["global"] else None,
        region_auc_macro=result["region"]["macro"]["auc"] if result["region"] else None,
        undefined_global=result["global"]["undefined"] if result["global"] else [],
    )
    return result


def per_region_summary(per_class: dict, region_names) -> dict:
    """Per region: the mean over its defined (region, finding) classes of each metric (the paper's region-wise view)."""
    summary = {}
    for region in region_names:
        rows = [v for k, v in per_class.items() if k.split("|", 1)[0] == region and v["auc"] is not None]
        if rows:
            summary[region] = {key: float(np.mean([row[key] for row in rows])) for key in CLASS_METRICS}
            summary[region]["num_classes"] = len(rows)
    return summary


def core_metrics(pred: Predictions, region_names, findings, unmentioned_as_negative: bool = True,
                 tasks=("global", "region", "detection")) -> dict:
    """detection_miou, global_auc_macro, region_auc_macro (the quickstart contract) with their per-class values
    (None / empty for a task left out of `tasks`)."""
    full = compute_metrics(pred, region_names, findings, unmentioned_as_negative=unmentioned_as_negative, tasks=tasks)
    return {
        "num_images": full["num_images"],
        "detection_miou": full["detection_miou"],
        "global_auc_macro": full["global_auc_macro"],
        "region_auc_macro": full["region_auc_macro"],
        "per_region_iou": ({r: v["iou"] for r, v in full["detection"]["per_region"].items()}
                           if full["detection"] else {}),
        "global_auc": {f: v["auc"] for f, v in full["global"]["per_class"].items()} if full["global"] else {},
        "region_auc": {k: v["auc"] for k, v in full["region"]["per_class"].items()} if full["region"] else {},
        "undefined_global": full["undefined_global"],
    }


# ----------------------------------------------------------------------------------------------- running
def load_checkpoint(path):
    """Model + processor from a local folder, or from `hf://org/name@<commit>` (`train.engine.hub`)."""
    from transformers import AutoModel, AutoProcessor

    location, options = resolve_model_location(path)
    model = AutoModel.from_pretrained(location, **options)
    processor = AutoProcessor.from_pretrained(location, **options)
    return model.eval(), processor


def load_split(dataset: str, data, split: str, region_names, findings, max_images: int | None = None):
    """A split of a finding dataset of `train.data.registry`; `data` is its root folder (or a `DataConfig`)."""
    if not isinstance(data, DataConfig):
        data = DataConfig(dataset=dataset, root=str(data), max_images=max_images)
    return load_finding_split(data, split, region_names, findings)


def evaluate_checkpoint(model_dir, data, split: str = "test", batch_size: int = 32,
                        unmentioned_as_negative: bool = True, unseen_findings=()) -> dict:
    """The quickstart contract (`core_metrics`) of a checkpoint on a Chest ImaGenome-layout split, and the zero-shot
    figures beside it:

    * ``global_auc_macro_heldout_wording`` / ``region_auc_macro_heldout_wording``: the same classes scored with
      prompts worded unlike any training text (`HELDOUT_WORDING`);
    * ``global_auc_macro_unseen_findings`` (``global_auc_unseen_findings`` per finding): findings withheld from
      training (`data.unseen_findings`), scored by name with the config's wording; null without any.

    `data`: a `DataConfig`, or the root folder of a Chest ImaGenome-layout set."""
    model, processor = load_checkpoint(model_dir)
    region_names, trained = list(model.config.region_names), list(model.config.findings)
    unseen = [f for f in unseen_findings if f not in trained]
    dataset = load_split("imagenome", data, split, region_names, trained + unseen)
    pred = predict(model, processor, dataset, trained + unseen, batch_size=batch_size,
                   wordings={"heldout": HELDOUT_WORDING})
    seen_pred = pred.of_findings(range(len(trained)))
    metrics = core_metrics(seen_pred, region_names, trained, unmentioned_as_negative)
    heldout = core_metrics(seen_pred.with_wording("heldout"), region_names, trained, unmentioned_as_negative,
                           tasks=("global", "region"))
    metrics["global_auc_macro_heldout_wording"] = heldout["global_auc_macro"]
    metrics["region_auc_macro_heldout_wording"] = heldout["region_auc_macro"]
    metrics["heldout_wording"] = {key: list(value) for key, value in HELDOUT_WORDING.items()}
    metrics["global_auc_macro_unseen_findings"], metrics["global_auc_unseen_findings"] = None, {}
    if unseen:
        unseen_pred = pred.of_findings(range(len(trained), len(trained) + len(unseen)))
        scores = core_metrics(unseen_pred, region_names, unseen, unmentioned_as_negative, tasks=("global",))
        metrics["global_auc_macro_unseen_findings"] = scores["global_auc_macro"]
        metrics["global_auc_unseen_findings"] = scores["global_auc"]
    return metrics


def run_evaluation(model_dir, data, *, dataset: str = "imagenome", split: str | None = None, out_dir=None,
                   findings=None, n_bootstrap: int = 200, seed: int = 0, threshold_data=None,
                   threshold_split: str = "validate", recompute_thresholds: bool = False,
                   unmentioned_as_negative: bool = True, batch_size: int = 32, max_images: int | None = None,
                   plots: bool = True, progress: bool = True) -> dict:
    """Everything the CLI does; returns the dict written to ``out_dir/metrics.json``."""
    start = time.perf_counter()
    model_dir = Path(model_dir)
    split = split or ("test" if dataset == "imagenome" else "all")
    model, processor = load_checkpoint(model_dir)
    region_names = list(model.config.region_names)
    findings = list(findings or (IU_XRAY_FINDINGS if dataset == "iu_xray" else model.config.findings))
    test_set = load_split(dataset, data, split, region_names, findings, max_images)

    if threshold_data is None and dataset == "imagenome":
        threshold_data = data
    validation = None
    if threshold_data is not None:
        same_root = Path(threshold_data).resolve() == Path(data).resolve()
        if dataset == "imagenome" and split == threshold_split and same_root:
            warnings.warn(f"evaluating on the threshold split {split!r}: BMAC and F1 are optimistic", stacklevel=2)
        validation = (load_split("imagenome", threshold_data, threshold_split, region_names, findings),
                      {"dataset": "imagenome", "data": str(Path(threshold_data).resolve()), "split": threshold_split})
    validation_pred = []  # filled when the thresholds are fitted (not when a saved file is reused)

    def predict_validation(dataset):
        validation_pred.append(predict(model, processor, dataset, findings, batch_size, progress))
        return validation_pred[-1]

    thresholds, threshold_info = decision_thresholds(model_dir, region_names, findings, validation, predict_validation,
                                                     unmentioned_as_negative, recompute_thresholds)

    pred = predict(model, processor, test_set, findings, batch_size, progress, wordings={"heldout": HELDOUT_WORDING})
    tasks = ("global",) if dataset == "iu_xray" else ("global", "region", "detection", "laterality")
    metrics = {
        "model": str(model_dir.resolve()), "dataset": dataset, "data": str(Path(data).resolve()), "split": split,
        "findings": findings, "unmentioned_as_negative": unmentioned_as_negative, "thresholds": threshold_info,
        "bootstrap": {"n_resamples": n_bootstrap, "alpha": BOOTSTRAP_ALPHA, "seed": seed},
        **compute_metrics(pred, region_names, findings, thresholds, unmentioned_as_negative, n_bootstrap, seed, tasks),
    }
    # Where choices are made: the threshold split's contract metrics, from the pass that fitted the thresholds.
    metrics["validation"] = (core_metrics(validation_pred[-1], region_names, findings, unmentioned_as_negative,
                                          tuple(t for t in tasks if t in ("global", "region", "detection")))
                             if validation_pred else None)
    reworded = compute_metrics(pred.with_wording("heldout"), region_names, findings, thresholds,
                               unmentioned_as_negative, n_bootstrap, seed, tuple(t for t in tasks if t in ("global", "region")))
    metrics["heldout_wording"] = {
        "templates": {key: list(value) for key, value in HELDOUT_WORDING.items()},
        **{f"{task}_auc_macro": (reworded[task] or {}).get("macro", {}).get("auc") for task in ("global", "region")},
        **{f"{task}_auc_ci95": ((reworded[task] or {}).get("ci95") or {}).get("auc") for task in ("global", "region")},
    }
    metrics["calibration"], calibration_effect = None, None
    if model.calibration is not None:
        from train.eval.calibration import evaluate_calibration  # (it imports this module)

        heads = tuple(task for task in ("global", "region") if task in tasks)
        section, calibration_effect = evaluate_calibration(model.calibration, pred, unmentioned_as_negative, heads)
        info = model.calibration.info
        metrics["calibration"] = {"fitted_on": info.get("validation"), "validation_ece": info.get("validation_ece"),
                                  **section}
    out_dir = Path(out_dir) if out_dir else model_dir.parent / "evaluation" / f"{dataset}-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["plots"] = []
    if plots:
        plot_roc_curves(pred.global_scores, pred.labels(unmentioned_as_negative)[0], findings,
                        {f: v["auc"] for f, v in metrics["global"]["per_class"].items()}, out_dir / "roc_global.png")
        metrics["plots"].append("roc_global.png")
        if metrics["region"] is not None:
            plot_region_heatmap(metrics["region"]["per_class"], region_names, findings,
                                out_dir / "region_auc_heatmap.png")
            metrics["plots"].append("region_auc_heatmap.png")
        plot_boxes(test_set, pred, region_names, out_dir / "boxes.png")
        metrics["plots"].append("boxes.png")
        if calibration_effect is not None:
            plot_reliability(calibration_effect, out_dir / "reliability.png", f"{dataset} {split} split")
            metrics["plots"].append("reliability.png")
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    metrics["out_dir"] = str(out_dir)
    return metrics


# ------------------------------------------------------------------------------------------------- table
def format_number(value, digits: int = 3) -> str:
    """A value of the tables: `digits` decimals, "n/a" for None (undefined)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(value, interval) -> str:
    return format_number(value) + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def format_table(metrics: dict) -> str:
    """The readable summary the CLI prints."""
    lines = [f"Anatomy-VLM evaluation: {metrics['dataset']} {metrics['split']} ({metrics['num_images']} images); "
             f"thresholds {'reused from' if metrics['thresholds']['reused'] else 'fitted and saved to'} "
             f"{metrics['thresholds']['file']}"]
    validation = metrics["thresholds"].get("validation")
    if validation:
        lines.append(f"  (validation: {validation['dataset']} {validation['split']}, "
                     f"{validation['num_images']} images)")
    section = metrics["global"]
    lines += ["", f"global zero-shot ({section['num_classes']} classes, {len(section['undefined'])} undefined)",
              f"{'finding':<38} {'pos':>5} {'AUC':>6} {'AP':>6} {'BMAC':>6} {'F1':>6} {'thr':>6}"]
    for name, v in section["per_class"].items():
        lines.append(f"{name[:38]:<38} {v['positives']:>5} "
                     + " ".join(f"{format_number(v[k]):>6}" for k in CLASS_METRICS)
                     + f" {format_number(v['threshold']):>6}")
    ci = section["ci95"] or {}
    lines.append("macro (95% CI):  " + "  ".join(f"{k.upper()} {_with_ci(section['macro'][k], ci.get(k))}"
                                                 for k in CLASS_METRICS))
    if metrics["region"] is not None:
        section = metrics["region"]
        ci = section["ci95"] or {}
        lines += ["", f"anatomy-wise (region x finding, {section['num_classes']} classes, "
                      f"{len(section['undefined'])} undefined)",
                  "macro (95% CI):  " + "  ".join(f"{k.upper()} {_with_ci(section['macro'][k], ci.get(k))}"
                                                  for k in CLASS_METRICS)]
        by_auc = sorted(section["per_region"].items(), key=lambda item: item[1]["auc"])
        if by_auc:
            lines.append("weakest regions (AUC): " + ", ".join(f"{r} {v['auc']:.3f}" for r, v in by_auc[:3]))
    if metrics["detection"] is not None:
        section = metrics["detection"]
        ci = section["ci95"] or {}
        lines += ["", "detection:  " + "  ".join(f"{k} {_with_ci(section[k], ci.get(k))}" for k in DETECTION_METRICS)]
    if metrics["laterality"] is not None:
        section = metrics["laterality"]
        lines.append(f"laterality accuracy: {_with_ci(section['accuracy'], section['ci95'])} "
                     f"({section['num_trials']} trials)")
    validation = metrics.get("validation")
    if validation:
        lines.append(f"threshold split ({validation['num_images']} images, where settings are chosen): global AUC "
                     f"{format_number(validation['global_auc_macro'])}, anatomy-wise AUC "
                     f"{format_number(validation['region_auc_macro'])}, mIoU {format_number(validation['detection_miou'])}")
    reworded = metrics.get("heldout_wording")
    if reworded:
        lines.append(f"prompts worded unlike any training text (HELDOUT_WORDING): global AUC "
                     f"{_with_ci(reworded['global_auc_macro'], reworded['global_auc_ci95'])}"
                     + ("" if metrics["region"] is None else
                        f", anatomy-wise AUC {_with_ci(reworded['region_auc_macro'], reworded['region_auc_ci95'])}"))
    if metrics["calibration"] is not None:
        section = metrics["calibration"]
        fitted_on = section["fitted_on"] or {}
        lines += ["", f"calibration (Platt scaling per head, fitted on the {fitted_on.get('split', '?')} split, "
                      f"{fitted_on.get('num_images', '?')} images): expected calibration error before -> after"]
        for head, ece in section["ece"].items():
            validation = (section["validation_ece"] or {}).get(head)
            shown = "n/a" if validation is None else (f"{format_number(validation['ece_before'], 4)} -> "
                                                      f"{format_number(validation['ece_after'], 4)}")
            lines.append(f"  {head:<7} {fitted_on.get('split', 'validation')}: {shown}   {metrics['split']}: "
                         f"{format_number(ece['ece_before'], 4)} -> {format_number(ece['ece_after'], 4)}")
        ood = section["ood"]
        lines.append(f"out-of-distribution warnings: {ood['warnings']} of {ood['images']} images "
                     f"(threshold {ood['threshold']:.3f}, highest score {ood['max_score']:.3f})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:4]))
    parser.add_argument("--model", required=True, help="checkpoint folder (model + processor)")
    parser.add_argument("--data", required=True, help="Chest ImaGenome-layout root (chest-imagenome/, mimic-cxr-jpg/) "
                                                      "or, for iu_xray, the folder of ecgen-radiology/ and NLMCXR_png/")
    parser.add_argument("--dataset", choices=DATASETS, default="imagenome")
    parser.add_argument("--split", help="default: test (imagenome), all (iu_xray)")
    parser.add_argument("--out", help="output folder (default <model>/../evaluation/<dataset>-<split>)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 95%% CIs (0 = none)")
    parser.add_argument("--findings", nargs="+", help="finding label strings (default: the model's; iu_xray: the "
                                                      "CheXpert five)")
    parser.add_argument("--threshold-data", help="Chest ImaGenome-layout root whose validation split fits the "
                                                 "thresholds (default: --data for imagenome; none for iu_xray)")
    parser.add_argument("--threshold-split", default="validate")
    parser.add_argument("--recompute-thresholds", action="store_true")
    parser.add_argument("--unmentioned", choices=("negative", "unknown"), default="negative")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-images", type=int, help="evaluate the first N images of the split only")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    metrics = run_evaluation(
        args.model, args.data, dataset=args.dataset, split=args.split, out_dir=args.out, findings=args.findings,
        n_bootstrap=args.bootstrap, seed=args.seed, threshold_data=args.threshold_data,
        threshold_split=args.threshold_split, recompute_thresholds=args.recompute_thresholds,
        unmentioned_as_negative=args.unmentioned == "negative", batch_size=args.batch_size,
        max_images=args.max_images, plots=not args.no_plots)
    print(format_table(metrics))
    print(f"\nmetrics and plots: {metrics['out_dir']}  ({metrics['seconds']:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()

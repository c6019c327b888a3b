"""Decision thresholds for BMAC and F1: fitted on the VALIDATION split only, saved with the model, reused while valid.

``thresholds.json`` next to the weights holds a threshold per finding (``global``) and per "region|finding"
(``region``), chosen for maximum balanced accuracy (`train.eval.metrics.select_thresholds`); null = no positives
or no negatives in validation, then `FALLBACK_THRESHOLD` is used. The file records the validation split's image-id
and label hashes, the weights' hash and the label policy; it is reused while they match and refitted otherwise,
so the test split can never move a threshold.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from train.eval.metrics import select_thresholds

if TYPE_CHECKING:
    from train.eval.zero_shot import Predictions

THRESHOLDS_FILE = "thresholds.json"
FALLBACK_THRESHOLD = 0.5  # for classes without positives or negatives in the validation split


def _sha256(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def split_fingerprint(dataset) -> dict:
    """Image count and hashes of the sorted image ids and of the labels: what "the validation data" means."""
    ids = dataset["image_id"]
    order = np.argsort(ids, kind="stable")
    labels = dataset.select_columns(["region_labels", "global_labels"]).with_format("numpy")
    region, global_ = labels["region_labels"], labels["global_labels"]
    return {
        "num_images": len(ids),
        "image_ids_sha256": _sha256(sorted(ids)),
        "labels_sha256": _sha256([np.asarray(region, dtype=np.int8)[order].tobytes(),
                                  np.asarray(global_, dtype=np.int8)[order].tobytes()]),
    }


def weights_fingerprint(model_dir) -> str:
    """sha256 over the checkpoint's weight files: thresholds of other weights must not be reused. Other
    safetensors files next to them (``calibration.safetensors``) are not weights."""
    files = sorted(Path(model_dir).glob("model*.safetensors")) or sorted(Path(model_dir).glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model weights (model*.safetensors / pytorch_model*.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def fit_thresholds(pred: Predictions, region_names, findings, unmentioned_as_negative: bool = True) -> dict:
    """Balanced-accuracy thresholds of every finding and every (region, finding) pair; None where undefined."""
    n = len(pred.image_ids)
    global_labels, region_labels = pred.labels(unmentioned_as_negative)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # most region pairs have no positives; counted in the file (nulls)
        global_t = select_thresholds(pred.global_scores, global_labels)
        region_t = select_thresholds(pred.region_scores.reshape(n, -1), region_labels.reshape(n, -1))
    names = [f"{r}|{f}" for r in region_names for f in findings]
    return {"global": dict(zip(findings, _nulls(global_t))), "region": dict(zip(names, _nulls(region_t)))}


def _nulls(thresholds: np.ndarray) -> list[float | None]:
    """`select_thresholds`' NaN (undefined) as None, JSON's null."""
    return [float(t) if np.isfinite(t) else None for t in thresholds]


def same_validation(saved: dict | None, current: dict) -> bool:
    """Same data set, split and hashes (the folder may have moved: its path is recorded, not compared)."""
    keys = ("dataset", "split", "num_images", "image_ids_sha256", "labels_sha256")
    return saved is not None and all(saved.get(k) == current[k] for k in keys)


def thresholds_cover(saved: dict, region_names, findings) -> bool:
    return all(f in saved["global"] for f in findings) and all(
        f"{r}|{f}" in saved["region"] for r in region_names for f in findings)


def decision_thresholds(model_dir, region_names, findings, validation, predict: Callable[..., Predictions],
                        unmentioned_as_negative: bool = True, recompute: bool = False) -> tuple[dict, dict]:
    """The thresholds for `findings` and where they came from: ``thresholds.json`` or a fresh validation fit.

    `validation`: None, or ``(dataset, {"dataset", "data", "split"})`` of the validation split (loaded with these
    `findings`); `predict(dataset)` runs the model over it when a fit is needed. The saved file is reused when it
    covers `findings` and its weights hash, label policy and (given `validation`) validation hashes match;
    otherwise the thresholds are fitted on `validation` and saved, merged with the saved ones when those came from
    the same validation data and weights.
    """
    path = Path(model_dir) / THRESHOLDS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else None
    weights = weights_fingerprint(model_dir)
    region_names = list(region_names)
    source = None
    if validation is not None:
        dataset, description = validation
        source = {**description, **split_fingerprint(dataset)}
    same_origin = (saved is not None and saved.get("weights_sha256") == weights
                   and saved.get("unmentioned_as_negative") == unmentioned_as_negative
                   and (source is None or same_validation(saved.get("validation"), source)))
    if same_origin and not recompute and thresholds_cover(saved, region_names, findings):
        return saved, {"file": str(path), "reused": True, "validation": saved["validation"]}
    if validation is None:
        if saved is None:
            problem = "does not exist"
        elif not same_origin:
            problem = "was fitted for other weights or another label policy"
        else:
            problem = "lacks some of the requested findings"
        raise ValueError(f"decision thresholds: {path} {problem}, and no validation data was given to fit them "
                         "(IU-Xray: pass --threshold-data with a Chest ImaGenome-layout root)")
    if recompute or not same_origin:
        saved = None
    fitted = fit_thresholds(predict(validation[0]), region_names, findings, unmentioned_as_negative)
    thresholds = {
        "criterion": "maximum balanced accuracy (Youden's J) on the validation split; positive when score >= "
                     f"threshold; null = no positives or negatives there, {FALLBACK_THRESHOLD} is used",
        "unmentioned_as_negative": unmentioned_as_negative,
        "weights_sha256": weights,
        "validation": source,
        "global": {**(saved or {}).get("global", {}), **fitted["global"]},
        "region": {**(saved or {}).get("region", {}), **fitted["region"]},
    }
    path.write_text(json.dumps(thresholds, indent=1) + "\n")
    return thresholds, {"file": str(path), "reused": False, "validation": source}

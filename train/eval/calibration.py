"""Fit a checkpoint's calibration: Platt-scaled probabilities and the out-of-distribution (OOD) statistics.

    python -m train.eval.calibration --model outputs/quickstart/model --data data/phantom-quickstart
        [--train-split train] [--val-split validate] [--max-train-images 2000] [--out DIR] [--refit]

Writes ``calibration.safetensors`` next to the model's ``config.json`` (read by the shipped
`calibration_anatomy_vlm`, which documents the file; `interpret` applies it), prints the validation split's
expected calibration error (ECE) before and after, and writes ``calibration.json`` (this report) and
``reliability_validation.png`` to ``--out`` (default ``<model>/../evaluation/calibration``).

* Probabilities: one Platt scaling (scale, bias) per head, global (image-vs-finding logits) and region (prompt-pair
  log-odds), fitted on the VALIDATION split by log-loss over every (image[, region], finding) with a known label,
  with Platt's smoothed targets ((P + 1) / (P + 2) and 1 / (N + 2)) so a head whose validation labels are all
  one class or perfectly separated still gets finite parameters. The scale is kept positive: the scaling is
  monotone, never reverses a ranking, and AUC and AP do not change.
* OOD: the mean, standard deviation and Ledoit-Wolf-shrunk covariance of the image embeddings and of the image
  statistics (`calibration_anatomy_vlm.image_statistics`) come from the TRAINING split (up to
  ``--max-train-images`` evenly spaced images); each distance's typical value (median) and the threshold come from
  the VALIDATION split, so they measure images the statistics never saw. Threshold: the 99th percentile of the
  validation scores, the larger of the empirical one and that of a log-normal fit to them. With fewer than 100
  validation images the empirical 99th percentile is nearly the maximum, which a held-out in-distribution image
  exceeds with probability about 1 / (n + 1); the fit extrapolates the tail instead. Out-of-distribution images
  (photographs, noise, inverted films) score far above either.

The file records the weights' hash, the label policy and the validation and training images' hashes; it is reused
while they match (``--refit`` refits), as ``thresholds.json`` is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeling_anatomy_vlm.calibration_anatomy_vlm import (
    CALIBRATION_FILE,
    STD_FLOOR,
    Calibration,
    GaussianDistance,
    OODStatistics,
    PlattScaling,
)
from train.config import DataConfig
from train.eval.plots import plot_reliability
from train.eval.thresholds import same_validation, split_fingerprint, weights_fingerprint
from train.eval.zero_shot import (
    DATASETS, Predictions, core_metrics, format_number, load_checkpoint, load_split, predict,
)

ECE_BINS = 15
OOD_QUANTILE = 0.99
HEADS = ("global", "region")


# ------------------------------------------------------------------------------------------------ measures
def reliability_curve(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per equal-width probability bin: mean predicted probability, observed frequency of positives and count,
    over the entries with a known label (1 / 0; -1 = unknown is left out). Empty bins are NaN with count 0."""
    known = labels >= 0
    probs, labels = probs[known].astype(np.float64), labels[known].astype(np.float64)
    bins = np.clip((probs * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(bins, weights=probs, minlength=n_bins) / count
        frequency = np.bincount(bins, weights=labels, minlength=n_bins) / count
    return {"confidence": confidence, "frequency": frequency, "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean over equal-width bins of |mean probability - frequency of positives|, over
    the entries with a known label; NaN when none is known."""
    curve = reliability_curve(probs, labels, n_bins)
    filled = curve["count"] > 0
    if not filled.any():
        return float("nan")
    gaps = np.abs(curve["confidence"][filled] - curve["frequency"][filled])
    return float((gaps * curve["count"][filled]).sum() / curve["count"].sum())


# ------------------------------------------------------------------------------------------------ fitting
def fit_platt(logits: np.ndarray, labels: np.ndarray) -> PlattScaling:
    """Platt scaling of `logits` against `labels` (1 / 0; -1 = unknown, left out), by log-loss with Platt's
    smoothed targets. The scale is kept positive (fitted as its logarithm), so calibration never reverses the
    ranking: logits that predict nothing on validation get a scale near 0 (the base rate), not a negative one.
    The logits are standardised for the optimiser and the parameters mapped back."""
    known = labels >= 0
    z = torch.as_tensor(logits[known], dtype=torch.float64)
    y = torch.as_tensor(labels[known], dtype=torch.float64)
    if not len(z):
        raise ValueError("fit_platt: no known labels")
    positives, negatives = float(y.sum()), float(len(y) - y.sum())
    targets = torch.where(y > 0, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    spread = float(z.std()) if len(z) > 1 and float(z.std()) > 0 else 1.0
    z = z / spread
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale, bias], lr=1.0, max_iter=500, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(log_scale.exp() * z + bias, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return PlattScaling(scale=log_scale.detach().exp().item() / spread, bias=bias.detach().item())


def fit_gaussian(features: np.ndarray) -> GaussianDistance:
    """The distance from `[N, D]` training features: standardised (standard deviation floored at `STD_FLOOR`),
    with a Ledoit-Wolf-shrunk covariance, which stays invertible and well conditioned when N is not much larger
    than D."""
    from sklearn.covariance import LedoitWolf

    features = features.astype(np.float64)
    center, scale = features.mean(0), np.maximum(features.std(0), STD_FLOOR)
    precision = LedoitWolf(assume_centered=True).fit((features - center) / scale).precision_
    return GaussianDistance(*(torch.tensor(value, dtype=torch.float32) for value in (center, scale, precision)))


def ood_threshold(scores: np.ndarray, quantile: float = OOD_QUANTILE) -> float:
    """The `quantile` of validation OOD scores: the larger of the empirical one and a log-normal fit's."""
    empirical = float(np.quantile(scores, quantile))
    logs = np.log(np.clip(scores, 1e-12, None))
    if len(logs) < 2:
        return empirical
    fitted = float(np.exp(logs.mean() + statistics.NormalDist().inv_cdf(quantile) * logs.std(ddof=1)))
    return max(empirical, fitted)


def fit_ood(train: Predictions, validation: Predictions) -> OODStatistics:
    """Distances fitted on `train`; their typical values and the threshold on `validation`."""
    ood = OODStatistics(fit_gaussian(train.image_embeds), fit_gaussian(train.image_statistics), torch.ones(2),
                        float("inf"))
    features = torch.as_tensor(validation.image_embeds), torch.as_tensor(validation.image_statistics)
    ood.typical_distances = ood.distances(*features).median(0).values.clamp(min=1e-6)
    ood.threshold = ood_threshold(ood.scores(*features).numpy())
    return ood


def head_arrays(pred: Predictions, unmentioned_as_negative: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per head, (logits, labels) of a split under the label policy."""
    global_labels, region_labels = pred.labels(unmentioned_as_negative)
    return {"global": (pred.global_logits, global_labels), "region": (pred.region_log_odds, region_labels)}


def calibration_effect(calibration: Calibration, pred: Predictions, unmentioned_as_negative: bool,
                       heads=HEADS) -> dict:
    """Per head of `heads`: ECE before (raw probabilities) and after calibration, the known labels counted, and
    both reliability curves (for `plot_reliability`)."""
    effect = {}
    arrays = head_arrays(pred, unmentioned_as_negative)
    for head in heads:
        logits, labels = arrays[head]
        platt = calibration.global_platt if head == "global" else calibration.region_platt
        raw = torch.sigmoid(torch.as_tensor(logits, dtype=torch.float64)).numpy()
        calibrated = platt(torch.as_tensor(logits)).double().numpy()
        effect[head] = {
            "ece_before": expected_calibration_error(raw, labels),
            "ece_after": expected_calibration_error(calibrated, labels),
            "labels": int((labels >= 0).sum()), "positives": int((labels == 1).sum()),
            "curve_before": reliability_curve(raw, labels), "curve_after": reliability_curve(calibrated, labels),
        }
    return effect


def ece_summary(effect: dict) -> dict:
    """`calibration_effect` without the curves (what JSON files keep); an undefined ECE (no known label) is None."""
    return {head: {key: None if isinstance(value, float) and np.isnan(value) else value
                   for key, value in values.items() if not key.startswith("curve")}
            for head, values in effect.items()}


def evaluate_calibration(calibration: Calibration, pred: Predictions, unmentioned_as_negative: bool = True,
                         heads=HEADS) -> tuple[dict, dict]:
    """How `calibration` does on a split: ECE before and after (`ece`) for each head of `heads` (those the split
    has labels for) and the OOD warnings among its images (`ood`); and the `calibration_effect`, curves included,
    for `plot_reliability`."""
    effect = calibration_effect(calibration, pred, unmentioned_as_negative, heads)
    scores = calibration.ood.scores(torch.as_tensor(pred.image_embeds), torch.as_tensor(pred.image_statistics))
    threshold = calibration.ood.threshold
    section = {"ece": ece_summary(effect),
               "ood": {"threshold": threshold, "images": len(scores), "warnings": int((scores > threshold).sum()),
                       "max_score": float(scores.max())}}
    return section, effect


def fit_calibration(train: Predictions, validation: Predictions, unmentioned_as_negative: bool = True) -> Calibration:
    """Platt scaling per head fitted on `validation`; OOD statistics from `train`, thresholded on `validation`."""
    platt = {}
    for head, (logits, labels) in head_arrays(validation, unmentioned_as_negative).items():
        if not ((labels == 1).any() and (labels == 0).any()):
            missing = "no positives" if not (labels == 1).any() else "no negatives"
            warnings.warn(f"calibration: the {head} head has {missing} in the validation split; its calibrated "
                          "probabilities are nearly constant", stacklevel=2)
        platt[head] = fit_platt(logits, labels)
    return Calibration(platt["global"], platt["region"], fit_ood(train, validation))


# ----------------------------------------------------------------------------------------------- running
def evenly_spaced(dataset, limit: int | None):
    """At most `limit` rows of `dataset`, evenly spaced (all of them when `limit` is None or larger)."""
    if limit is None or len(dataset) <= limit:
        return dataset
    return dataset.select(np.unique(np.linspace(0, len(dataset) - 1, limit).astype(int)).tolist())


def _split_source(dataset, data, name: str, split: str) -> dict:
    """What the images of a fit were: recorded in the file, compared by hashes (the folder may move)."""
    if isinstance(data, DataConfig):
        name, data = data.dataset, data.root
    return {"dataset": name, "data": str(data), "split": split, **split_fingerprint(dataset)}


def calibrate_checkpoint(model_dir, data, *, dataset: str = "imagenome", train_split: str = "train",
                         val_split: str = "validate", max_train_images: int | None = 2000, out_dir=None,
                         refit: bool = False, unmentioned_as_negative: bool = True, batch_size: int = 32,
                         plots: bool = True, progress: bool = True) -> dict:
    """Fit (or reuse) `model_dir`'s ``calibration.safetensors`` on `data`; returns the report also written to
    ``out_dir/calibration.json``. `data`: a root folder or a `DataConfig`."""
    model_dir = Path(model_dir)
    model, processor = load_checkpoint(model_dir)
    region_names, findings = list(model.config.region_names), list(model.config.findings)
    validation_set = load_split(dataset, data, val_split, region_names, findings)
    train_set = evenly_spaced(load_split(dataset, data, train_split, region_names, findings), max_train_images)
    provenance = {
        "weights_sha256": weights_fingerprint(model_dir), "unmentioned_as_negative": unmentioned_as_negative,
        "train": _split_source(train_set, data, dataset, train_split),
        "validation": _split_source(validation_set, data, dataset, val_split),
    }
    saved = model.calibration.info if model.calibration is not None else None
    reused = (not refit and saved is not None
              and all(saved.get(key) == provenance[key] for key in ("weights_sha256", "unmentioned_as_negative"))
              and same_validation(saved.get("train"), provenance["train"])
              and same_validation(saved.get("validation"), provenance["validation"]))

    def run(split):
        return predict(model, processor, split, findings, batch_size, progress)

    validation = run(validation_set)
    if reused:
        calibration = model.calibration
    else:
        calibration = fit_calibration(run(train_set), validation, unmentioned_as_negative)
    section, effect = evaluate_calibration(calibration, validation, unmentioned_as_negative)
    report = {
        **provenance,
        # The metrics settings are chosen by (the test split is for the end): same predictions, no extra pass.
        "validation_metrics": core_metrics(validation, region_names, findings, unmentioned_as_negative),
        "platt": {"global": vars(calibration.global_platt), "region": vars(calibration.region_platt)},
        "validation_ece": section["ece"],
        "ood": {"quantile": OOD_QUANTILE,
                "typical_distances": dict(zip(("embedding", "image"), calibration.ood.typical_distances.tolist())),
                **section["ood"]},
    }
    if not reused:
        calibration.info = report
        calibration.save(model_dir)
    out_dir = Path(out_dir) if out_dir else model_dir.parent / "evaluation" / "calibration"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"model": str(model_dir.resolve()), "file": str(model_dir / CALIBRATION_FILE), "reused": reused,
              **report, "plots": []}
    if plots:
        plot_reliability(effect, out_dir / "reliability_validation.png", f"{val_split} split (fitted here)")
        report["plots"].append("reliability_validation.png")
    (out_dir / "calibration.json").write_text(json.dumps(report, indent=1) + "\n")
    report["out_dir"] = str(out_dir)
    return report


def format_report(report: dict) -> str:
    """The summary the CLI prints: ECE on the validation split before and after, and the OOD threshold."""
    validation = report["validation"]
    lines = [f"calibration {'reused from' if report['reused'] else 'fitted and saved to'} {report['file']}",
             f"Platt scaling per head on the {validation['split']} split ({validation['num_images']} images); "
             f"expected calibration error ({ECE_BINS} bins) on that split:",
             f"{'head':<8} {'scale':>8} {'bias':>8} {'labels':>8} {'ECE before':>11} {'ECE after':>10}"]
    for head in HEADS:
        platt, ece = report["platt"][head], report["validation_ece"][head]
        lines.append(f"{head:<8} {platt['scale']:>8.4f} {platt['bias']:>8.3f} {ece['labels']:>8} "
                     f"{format_number(ece['ece_before'], 4):>11} {format_number(ece['ece_after'], 4):>10}")
    ood = report["ood"]
    lines.append(f"OOD: statistics of {report['train']['num_images']} {report['train']['split']} images; threshold "
                 f"{ood['threshold']:.3f} (the {ood['quantile']:.0%} quantile of the {validation['split']} scores); "
                 f"{ood['warnings']} of {ood['images']} {validation['split']} images above it")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:4]))
    parser.add_argument("--model", required=True, help="checkpoint folder (model + processor)")
    parser.add_argument("--data", required=True, help="Chest ImaGenome-layout root (the phantom set is one)")
    parser.add_argument("--dataset", choices=DATASETS, default="imagenome")
    parser.add_argument("--train-split", default="train", help="split of the OOD statistics")
    parser.add_argument("--val-split", default="validate", help="split of the Platt scaling and the OOD threshold")
    parser.add_argument("--max-train-images", type=int, default=2000)
    parser.add_argument("--out", help="report folder (default <model>/../evaluation/calibration)")
    parser.add_argument("--refit", action="store_true", help="refit even when the saved calibration still matches")
    parser.add_argument("--unmentioned", choices=("negative", "unknown"), default="negative")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    report = calibrate_checkpoint(
        args.model, args.data, dataset=args.dataset, train_split=args.train_split, val_split=args.val_split,
        max_train_images=args.max_train_images, out_dir=args.out, refit=args.refit,
        unmentioned_as_negative=args.unmentioned == "negative", batch_size=args.batch_size, plots=not args.no_plots)
    print(format_report(report))
    print(f"\nreport and plots: {report['out_dir']}")
    return report


if __name__ == "__main__":
    main()

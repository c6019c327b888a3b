"""Evaluation metrics: three local `evaluate` modules, threshold selection and bootstrap confidence intervals.

Modules (one folder each next to this file, loaded with `load_metric(name)`):
    bmac               balanced multi-label accuracy, per class and macro
    multilabel_auc_ap  per-class ROC AUC, average precision and F1, unknown labels (-1) masked
    box_iou            per-region IoU, AP@.5 and AP@[.5:.95] for one predicted box per region

Undefined values: a class without positive or without negative labels (a region without annotations) is
NaN with a warning naming it, never 0 or 1; macro averages skip NaN classes and are NaN if all are.

`evaluate` copies each module script into its modules cache (HF_MODULES_CACHE) before importing it, so
the scripts import only installed libraries, one import per line (evaluate parses them with a regex).
"""

import warnings
from pathlib import Path

import evaluate
import numpy as np

METRIC_NAMES = ("bmac", "multilabel_auc_ap", "box_iou")


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load one of this package's metrics by absolute path; `kwargs` go to `evaluate.load`.

    An absolute directory path is loaded from disk without any Hub request (a bare name like "bmac"
    would be looked up on the Hub), so no offline flag is needed.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")
    return evaluate.load(str(Path(__file__).resolve().parent / name), **kwargs)


def select_thresholds(scores: np.ndarray, labels: np.ndarray, criterion: str = "bmac") -> np.ndarray:
    """Per-class thresholds [C] that maximise balanced accuracy (equivalently Youden's J) on the data given.

    Pass the validation split only: thresholds tuned on the test split would inflate its scores.
    `scores` [N, C]; `labels` [N, C] with 1 / 0 / -1 = unknown (masked). A score is positive when
    score >= threshold; the candidates are the observed scores, and of equally good ones the highest wins.
    A class without positive or without negative labels gets NaN and a warning; callers then use 0.5,
    e.g. `np.where(np.isnan(t), 0.5, t)`.
    """
    if criterion != "bmac":
        raise ValueError(f"unknown criterion {criterion!r}; only 'bmac' is implemented")
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    thresholds = np.full(scores.shape[1], np.nan)
    undefined = []
    for c in range(scores.shape[1]):
        known = labels[:, c] >= 0
        s, y = scores[known, c], labels[known, c] == 1
        if y.all() or not y.any():
            undefined.append(c)
            continue
        order = np.argsort(-s, kind="stable")
        s, y = s[order], y[order]
        last_of_tie = np.r_[s[1:] != s[:-1], True]  # cutting after a run of equal scores keeps ties together
        tpr = np.cumsum(y)[last_of_tie] / y.sum()
        tnr = 1 - np.cumsum(~y)[last_of_tie] / (~y).sum()
        thresholds[c] = s[last_of_tie][np.argmax(tpr + tnr)]
    if undefined:
        warnings.warn(f"select_thresholds: classes {undefined} lack positive or negative labels; threshold NaN")
    return thresholds


def bootstrap_ci(metric_fn, *arrays, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0):
    """Percentile bootstrap (1 - alpha) interval of `metric_fn(*arrays)`, resampling rows (images).

    `metric_fn` returns a float or an array (e.g. per-class values, for all of which one loop gives
    intervals); it returns NaN where a resample leaves the metric undefined (e.g. no positives), and such
    resamples are skipped per entry, with a warning saying how many. Returns (low, high) shaped like the
    metric; NaN where every resample was undefined. Deterministic for a given seed. Example, with the
    module's `_compute` (arrays in, dict out), which skips `compute`'s Arrow round trip (10x faster):

        auc = load_metric("multilabel_auc_ap")
        low, high = bootstrap_ci(lambda s, y: auc._compute(s, y)["roc_auc"], scores, labels)
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci: all arrays need the same number of rows")
    rng = np.random.default_rng(seed)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined resamples are expected; they are counted below instead
        for _ in range(n_resamples):
            rows = rng.integers(0, n, size=n)  # one resample at a time: all at once would be n_resamples x n
            values.append(np.asarray(metric_fn(*(a[rows] for a in arrays)), dtype=float))
        values = np.stack(values)  # [n_resamples, *metric shape]
        low, high = np.nanquantile(values, [alpha / 2, 1 - alpha / 2], axis=0)
    skipped = np.isnan(values).sum(0).max()
    if skipped:
        warnings.warn(f"bootstrap_ci: up to {skipped} of {n_resamples} resamples undefined and skipped")
    return (float(low), float(high)) if low.ndim == 0 else (low, high)

"""Per-class ROC AUC, average precision and F1 for multi-label score matrices, with unknown labels masked.

AUC and AP follow scikit-learn's definitions (tied scores form one operating point; AP is the step-wise
sum of precision times recall increments, not interpolated); F1 is taken at the given thresholds.
"""

import warnings

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: [N, C] scores (any monotone scale; F1 thresholds must be on the same scale).
    references: [N, C] labels, 1 = positive, 0 = negative, -1 = unknown (left out of that class).
    thresholds: float or [C] floats for F1, positive when score >= threshold (default 0.5). Must not be NaN
        (fill the NaN thresholds of `train.eval.metrics.select_thresholds` with 0.5 first).
    class_names: optional list of C names that key the per-class results (default 0 .. C-1).
Returns:
    roc_auc, average_precision, f1: macro means over defined classes; NaN if no class is defined.
    roc_auc_per_class, average_precision_per_class, f1_per_class: {name: value}; NaN (with a warning) for
        a class without positive or without negative labels, for all three metrics alike.
"""


def _roc_auc_and_ap(scores, labels):
    """ROC AUC and AP of one class; `labels` are 0/1 with both values present."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold sits after each run of equal scores
    tp = np.cumsum(labels)[last_of_tie]
    fp = np.cumsum(1 - labels)[last_of_tie]
    tpr, fpr = tp / tp[-1], fp / fp[-1]
    roc_auc = np.trapezoid(np.r_[0, tpr], np.r_[0, fpr])
    average_precision = np.sum(np.diff(np.r_[0, tpr]) * tp / (tp + fp))
    return roc_auc, average_precision


class MultilabelAucAp(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int8")),
                }
            ),
        )

    def _compute(self, predictions, references, thresholds=0.5, class_names=None):
        scores, labels = np.asarray(predictions, dtype=float), np.asarray(references)
        thresholds = np.broadcast_to(np.asarray(thresholds, dtype=float), scores.shape[1:])
        if np.isnan(thresholds).any():
            raise ValueError("multilabel_auc_ap: NaN threshold; fill undefined thresholds with 0.5 first")
        names = list(range(labels.shape[1])) if class_names is None else list(class_names)
        if scores.shape != labels.shape or len(names) != labels.shape[1]:
            raise ValueError(f"multilabel_auc_ap: shapes {scores.shape}, {labels.shape}, {len(names)} names")

        values = np.full((3, len(names)), np.nan)  # rows: roc_auc, average_precision, f1
        undefined = []
        for c, name in enumerate(names):
            known = labels[:, c] >= 0
            s, y = scores[known, c], labels[known, c]
            if y.all() or not y.any():
                undefined.append(name)
                continue
            predicted, positive = s >= thresholds[c], y == 1
            tp, fp, fn = np.sum(predicted & positive), np.sum(predicted & ~positive), np.sum(~predicted & positive)
            values[:, c] = (*_roc_auc_and_ap(s, y), 2 * tp / (2 * tp + fp + fn))
        if undefined:
            warnings.warn(f"multilabel_auc_ap: classes {undefined} lack positive or negative labels; NaN")

        defined = ~np.isnan(values[0])
        macro = values[:, defined].mean(1) if defined.any() else np.full(3, np.nan)
        results = {}
        for key, row, mean in zip(("roc_auc", "average_precision", "f1"), values, macro):
            results[key] = float(mean)
            results[f"{key}_per_class"] = dict(zip(names, row.tolist()))
        return results

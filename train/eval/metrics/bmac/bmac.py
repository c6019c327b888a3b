"""Balanced multi-label accuracy (BMAC): the mean over classes of (TPR + TNR) / 2.

Why BMAC: findings are rare (a 5 % class predicted all-negative has 95 % accuracy but BMAC 0.5), so each
class is scored by the mean of its sensitivity and specificity, and classes are averaged with equal weight.
"""

import warnings

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: [N, C] 0/1 decisions, or scores when `thresholds` is given.
    references: [N, C] labels, 1 = positive, 0 = negative, -1 = unknown (left out of that class).
    thresholds: optional float or [C] floats; a score is positive when score >= threshold. Must not be NaN
        (fill the NaN thresholds of `train.eval.metrics.select_thresholds` with 0.5 first).
    class_names: optional list of C names that key the per-class results (default 0 .. C-1).
Returns:
    bmac: macro mean over defined classes; NaN if no class is defined.
    bmac_per_class: {name: BMAC}; NaN (with a warning) for a class without positive or without negative labels.
Example:
    >>> load_metric("bmac").compute(predictions=[[1, 0], [0, 0]], references=[[1, 0], [0, 1]])
    {'bmac': 0.75, 'bmac_per_class': {0: 1.0, 1: 0.5}}
"""


class BMAC(evaluate.Metric):
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

    def _compute(self, predictions, references, thresholds=None, class_names=None):
        scores, labels = np.asarray(predictions, dtype=float), np.asarray(references)
        if thresholds is None:
            if not np.isin(scores, (0, 1)).all():
                raise ValueError("bmac: predictions must be 0/1 unless `thresholds` is given")
            thresholds = 0.5
        thresholds = np.broadcast_to(np.asarray(thresholds, dtype=float), scores.shape[1:])
        if np.isnan(thresholds).any():
            raise ValueError("bmac: NaN threshold; fill undefined thresholds with 0.5 first")
        names = list(range(labels.shape[1])) if class_names is None else list(class_names)
        if scores.shape != labels.shape or len(names) != labels.shape[1]:
            raise ValueError(f"bmac: shapes {scores.shape}, {labels.shape}, {len(names)} names")

        predicted = scores >= thresholds
        positive, negative = labels == 1, labels == 0  # -1 (unknown) is neither
        n_pos, n_neg = positive.sum(0), negative.sum(0)
        defined = (n_pos > 0) & (n_neg > 0)
        if not defined.all():
            undefined = [names[c] for c in np.flatnonzero(~defined)]
            warnings.warn(f"bmac: classes {undefined} lack positive or negative labels; reported as NaN")

        with np.errstate(invalid="ignore", divide="ignore"):
            tpr = (predicted & positive).sum(0) / n_pos
            tnr = (~predicted & negative).sum(0) / n_neg
        per_class = np.where(defined, (tpr + tnr) / 2, np.nan)
        macro = per_class[defined].mean() if defined.any() else np.nan
        return {"bmac": float(macro), "bmac_per_class": dict(zip(names, per_class.tolist()))}

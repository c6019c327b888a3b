"""IoU and COCO-style AP for a detector that predicts exactly one box per anatomical region per image.

Prediction r of an image is compared only with ground-truth box r of that image (no matching step).
Per region, AP@t is COCO's 101-point interpolated AP over the images where the region is annotated:
detections are ranked by score, a detection is a true positive when its IoU >= t, and each miss is both a
false positive and a missed box. Tied scores form one operating point, so the result does not depend
on the order of the images.

Without scores (all confidences equal) there is a single operating point whose precision and recall
both equal p, the fraction of annotated boxes with IoU >= t, and AP@t = p * (floor(100 p) + 1) / 101,
roughly p squared: AP then measures little beyond p, which is reported directly as `acc50`.
"""

import warnings

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: [N, R, 4] predicted boxes (x1, y1, x2, y2), finite wherever the region is annotated.
    references: [N, R, 4] ground-truth boxes in the same frame; a NaN row = region not annotated (ignored).
    scores: optional [N, R] confidences, passed to `compute` (not `add_batch`); default all equal.
    region_names: optional list of R names that key the per-region results (default 0 .. R-1).
Returns:
    miou, map, map_50, acc50: means over defined regions of the per-region values below; NaN if none.
    iou_per_region: mean IoU over the images where the region is annotated.
    ap_per_region: AP@[.5:.95], the mean of AP@t over t = .50, .55, ..., .95.
    ap50_per_region: AP@.5.
    acc50_per_region: fraction of annotated boxes with IoU >= .5.
    A region annotated in no image is NaN in all of them (with a warning).
"""

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0, 1, 101)


def box_iou(boxes1, boxes2):
    """IoU of corresponding (x1, y1, x2, y2) boxes, [..., 4] x [..., 4] -> [...]; 0 when both are empty."""
    top_left = np.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = np.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area1 = np.prod(boxes1[..., 2:] - boxes1[..., :2], axis=-1)
    area2 = np.prod(boxes2[..., 2:] - boxes2[..., :2], axis=-1)
    union = area1 + area2 - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def coco_average_precision(scores, hits):
    """101-point interpolated AP of one detection per ground-truth box; `hits` marks the true positives."""
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], hits[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(hits)[last_of_tie]
    recall = tp / len(hits)
    precision = tp / (np.flatnonzero(last_of_tie) + 1)
    # Interpolated precision at recall r: the best precision at any recall >= r (0 beyond the last).
    best_after = np.maximum.accumulate(precision[::-1])[::-1]
    first_reaching = np.searchsorted(recall, RECALL_POINTS, side="left")
    return np.r_[best_after, 0.0][first_reaching].mean()


class BoxIoU(evaluate.Metric):
    def _info(self):
        box = datasets.Sequence(datasets.Value("float64"), length=4)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(box), "references": datasets.Sequence(box)}
            ),
        )

    def _compute(self, predictions, references, scores=None, region_names=None):
        pred, gt = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
        scores = np.ones(pred.shape[:2]) if scores is None else np.asarray(scores, dtype=float)
        names = list(range(gt.shape[1])) if region_names is None else list(region_names)
        if pred.shape != gt.shape or scores.shape != gt.shape[:2] or len(names) != gt.shape[1]:
            raise ValueError(f"box_iou: shapes {pred.shape}, {gt.shape}, scores {scores.shape}, {len(names)} names")
        annotated = ~np.isnan(gt).any(-1)  # [N, R]
        defined = annotated.any(0)  # [R]
        if not np.isfinite(pred[annotated]).all():
            raise ValueError("box_iou: predictions must be finite wherever the region is annotated")
        if not defined.all():
            undefined = [names[r] for r in np.flatnonzero(~defined)]
            warnings.warn(f"box_iou: regions {undefined} are annotated in no image; reported as NaN")

        iou = box_iou(pred, gt)  # [N, R]
        values = np.full((4, len(names)), np.nan)  # rows: iou, ap, ap50, acc50
        for r in np.flatnonzero(defined):
            region_iou, region_scores = iou[annotated[:, r], r], scores[annotated[:, r], r]
            ap = [coco_average_precision(region_scores, region_iou >= t) for t in IOU_THRESHOLDS]
            values[:, r] = region_iou.mean(), np.mean(ap), ap[0], np.mean(region_iou >= 0.5)

        macro = values[:, defined].mean(1) if defined.any() else np.full(4, np.nan)
        results = {}
        for key, per_region_key, row, mean in zip(
            ("miou", "map", "map_50", "acc50"),
            ("iou_per_region", "ap_per_region", "ap50_per_region", "acc50_per_region"),
            values,
            macro,
        ):
            results[key] = float(mean)
            results[per_region_key] = dict(zip(names, row.tolist()))
        return results

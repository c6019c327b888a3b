"""The evaluation's figures: ROC curves per finding, the region x finding AUC heat map, predicted vs true boxes,
reliability diagrams."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from train.eval.zero_shot import Predictions


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc_curves(scores: np.ndarray, labels: np.ndarray, names: list[str], aucs: dict, path) -> None:
    """One small ROC panel per class (known labels only); undefined classes get an empty, labelled panel."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax, (c, name) in zip(axes.flat, enumerate(names)):
        known = labels[:, c] >= 0
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        if aucs.get(name) is None:
            ax.text(0.5, 0.5, "undefined", ha="center", va="center", color="0.4")
        else:
            fpr, tpr, _ = roc_curve(labels[known, c], scores[known, c])
            ax.plot(fpr, tpr, lw=1.5)
        title = name if len(name) <= 28 else name[:26] + "..."
        ax.set_title(f"{title}\nAUC {aucs[name]:.3f}" if aucs.get(name) is not None else title, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.supxlabel("false positive rate", fontsize=8)
    fig.supylabel("true positive rate", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_region_heatmap(per_class: dict, region_names, findings, path) -> None:
    """Regions x findings heat map of anatomy-wise AUC; grey = not a class of this split or undefined."""
    plt = _pyplot()
    matrix = np.full((len(region_names), len(findings)), np.nan)
    for i, region in enumerate(region_names):
        for j, finding in enumerate(findings):
            value = per_class.get(f"{region}|{finding}", {}).get("auc")
            matrix[i, j] = np.nan if value is None else value
    fig, ax = plt.subplots(figsize=(2.5 + 0.32 * len(findings), 1.5 + 0.26 * len(region_names)))
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("0.9")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, j in zip(*np.nonzero(np.isfinite(matrix))):
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=4.5)
    ax.set_xticks(range(len(findings)), [f if len(f) <= 24 else f[:22] + "..." for f in findings], rotation=60,
                  ha="right", fontsize=6)
    ax.set_yticks(range(len(region_names)), region_names, fontsize=6)
    ax.set_title("anatomy-wise AUC (region x finding)", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02).ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_boxes(dataset, pred: Predictions, region_names, path, num_images: int = 4) -> None:
    """Predicted (dashed) and true (solid) region boxes on evenly spaced images of the split."""
    from modeling_anatomy_vlm.image_processing_anatomy_vlm import load_grayscale

    plt = _pyplot()
    paths = dict(zip(dataset["image_id"], (image["path"] for image in dataset["image"])))
    picks = np.unique(np.linspace(0, len(pred.image_ids) - 1, min(num_images, len(pred.image_ids))).astype(int))
    colours = plt.get_cmap("hsv")(np.linspace(0, 1, len(region_names), endpoint=False))
    fig, axes = plt.subplots(1, len(picks), figsize=(3.6 * len(picks), 4.0), squeeze=False)
    for ax, n in zip(axes[0], picks):
        ax.imshow(load_grayscale(paths[pred.image_ids[n]]), cmap="gray", vmin=0, vmax=1)
        for r in range(len(region_names)):
            for box, style in ((pred.true_boxes[n, r], "-"), (pred.pred_boxes[n, r], "--")):
                if np.isfinite(box).all():
                    ax.add_patch(plt.Rectangle(tuple(box[:2]), box[2] - box[0], box[3] - box[1], fill=False, lw=0.7,
                                               ls=style, edgecolor=colours[r]))
        ax.set_title(str(pred.image_ids[n])[:24], fontsize=7)
        ax.axis("off")
    fig.suptitle("region boxes: true solid, predicted dashed (colour = region)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(effect: dict, path, split: str) -> None:
    """Reliability diagram per head (`train.eval.calibration.calibration_effect`): observed frequency of positives
    against mean predicted probability per bin, before and after calibration, with each bin's share of labels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(effect), figsize=(4.2 * len(effect), 4.2), squeeze=False)
    for ax, (head, values) in zip(axes[0], effect.items()):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        for when, colour in (("before", "tab:red"), ("after", "tab:blue")):
            curve = values[f"curve_{when}"]
            filled = curve["count"] > 0
            ax.plot(curve["confidence"][filled], curve["frequency"][filled], "o-", ms=3, lw=1.2, color=colour,
                    label=f"{when}: ECE {values[f'ece_{when}']:.3f}")
            edges = np.linspace(0, 1, len(curve["count"]) + 1)
            share = curve["count"] / max(curve["count"].sum(), 1)
            ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", alpha=0.15, color=colour)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("frequency of positives (bars: share of labels)", fontsize=8)
        ax.set_title(f"{head} head ({values['labels']} labels, {values['positives']} positive)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"reliability before / after Platt scaling: {split}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

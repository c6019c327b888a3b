"""Evaluate a segmentation checkpoint: Dice and IoU per class on a split, and masks drawn over sample images.

    python -m train.eval.segmentation --model outputs/segmentation-frozen/model --data data/phantom-quickstart \
        [--split test] [--out DIR]
    python -m train.eval.segmentation --model M --dataset chexmask --csv MIMIC-CXR-JPG.csv.gz --images mimic-cxr-jpg

Scores are per image (sigmoid > 0.5, the processor's padding excluded), averaged over images; an image whose
class is empty in both prediction and truth scores 1 for it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from train.config import DataConfig
from train.data.registry import DATASETS, load_mask_split
from train.engine.hub import resolve_model_location

logger = logging.getLogger("anatomy_vlm.eval")


def inside(masks: torch.Tensor, valid_mask: torch.Tensor | None) -> torch.Tensor:
    """`[B, C, H, W]` bool masks cut to `valid_mask` (`[B, H, W]` for every class, or `[B, C, H, W]`)."""
    if valid_mask is None:
        return masks
    return masks & (valid_mask[:, None] if valid_mask.dim() == 3 else valid_mask)


def truth(labels: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The true masks (`labels > 0.5`) inside `valid_mask`: what every score here compares against."""
    return inside(labels > 0.5, valid_mask)


def mask_scores(logits: torch.Tensor, labels: torch.Tensor, valid_mask: torch.Tensor | None = None):
    """Per-image, per-class Dice and IoU (`[B, C]` each) of `logits > 0` against `labels`, inside `valid_mask`.
    A pair empty in both prediction and truth scores 1 (nothing to find, nothing found)."""
    pred, true = inside(logits > 0, valid_mask), truth(labels, valid_mask)
    inter = (pred & true).flatten(2).sum(-1).double()
    p, t = pred.flatten(2).sum(-1).double(), true.flatten(2).sum(-1).double()
    union = p + t - inter
    empty = (p + t) == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / (p + t).clamp(min=1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp(min=1))
    return dice, iou


def summarise_mask_scores(dice: torch.Tensor, iou: torch.Tensor, has_truth: torch.Tensor, names) -> dict:
    """Per-class means of `[N, C]` Dice and IoU two ways, each named: over the images whose truth has the class
    (``*_nonempty_truth``, None for a class no image has: the paper's figure on mostly empty sets such as SIIM
    pneumothorax) and over all images (``*_all_images``, where an image empty in truth and prediction scores 1 and
    a mostly empty set scores high for predicting nothing)."""
    def means(scores: torch.Tensor, rows: torch.Tensor) -> list:
        counts = rows.sum(0)
        total = (scores.double() * rows).sum(0)
        return [float(t / n) if n else None for t, n in zip(total.tolist(), counts.tolist())]

    every = torch.ones_like(has_truth)
    result = {"images_with_truth": dict(zip(names, has_truth.sum(0).tolist()))}
    for label, rows in (("nonempty_truth", has_truth), ("all_images", every)):
        dice_means, iou_means = means(dice, rows), means(iou, rows)
        result[f"dice_{label}"] = dict(zip(names, dice_means))
        result[f"iou_{label}"] = dict(zip(names, iou_means))
        defined = [(d, i) for d, i in zip(dice_means, iou_means) if d is not None]
        result[f"mean_dice_{label}"] = float(np.mean([d for d, _ in defined])) if defined else None
        result[f"miou_{label}"] = float(np.mean([i for _, i in defined])) if defined else None
    return result


def imagenome_overlap(image_ids, splits_dir) -> dict:
    """How many of `image_ids` (MIMIC dicom ids) Chest ImaGenome's train and valid split tables list; logs a warning
    when any. Its splits differ from MIMIC-CXR's official ones, so a CheXmask "test" image may be an ImaGenome
    training image."""
    from train.data.tables import read_rows

    ids, counts = set(image_ids), {}
    for name in ("train", "valid"):
        table = Path(splits_dir) / f"{name}.csv"
        if not table.is_file():
            raise FileNotFoundError(f"{table}: Chest ImaGenome split table not found (give its splits/ folder)")
        counts[name] = len(ids & {row["dicom_id"] for row in read_rows(table)})
    if any(counts.values()):
        logger.warning("%d of the %d evaluated images are in Chest ImaGenome's train split and %d in its valid split: "
                       "an encoder pre-trained on Chest ImaGenome has seen them", counts["train"], len(ids),
                       counts["valid"])
    return {"images": len(ids), **counts}


def format_score(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def draw_overlays(images: list[np.ndarray], preds: list[np.ndarray], trues: list[np.ndarray], names, path) -> None:
    """Predicted (filled) and true (contour) masks over up to 4 images, saved as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.4), squeeze=False)
    for ax, image, pred, true in zip(axes[0], images, preds, trues):
        ax.imshow(image, cmap="gray")
        for c, name in enumerate(names):
            colour = colours(c)
            ax.imshow(np.ma.masked_where(~pred[c], pred[c]), cmap=matplotlib.colors.ListedColormap([colour]),
                      alpha=0.35, interpolation="nearest")
            ax.contour(true[c], levels=[0.5], colors=[colour], linewidths=1)
        ax.axis("off")
    handles = [matplotlib.patches.Patch(color=colours(c), label=n) for c, n in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), frameon=False)
    fig.suptitle("predicted (filled) vs true (outline)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def evaluate_segmentation(model_dir, data, split: str = "test", out_dir=None, batch_size: int = 16,
                          imagenome_splits=None) -> dict:
    """`data`: a `DataConfig` naming a dataset with masks, or the root folder of a phantom set. `imagenome_splits`:
    Chest ImaGenome's ``silver_dataset/splits`` folder, to count (and warn about) evaluated images that its
    train / valid splits hold: an encoder pre-trained there has seen them (its splits are not MIMIC-CXR's)."""
    from transformers import AutoModelForSemanticSegmentation, AutoProcessor

    from train.data.segmentation import make_segmentation_transform

    if not isinstance(data, DataConfig):
        data = DataConfig(dataset="phantom", root=str(data))

    location, options = resolve_model_location(model_dir)
    model = AutoModelForSemanticSegmentation.from_pretrained(location, **options).eval()
    processor = AutoProcessor.from_pretrained(location, **options)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    dataset = load_mask_split(data, split, names)
    overlap = imagenome_overlap(dataset["image_id"], imagenome_splits) if imagenome_splits else None
    dataset.set_transform(make_segmentation_transform(processor, names))
    dice, iou, has_truth, samples = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        pixels = torch.stack(batch["pixel_values"])
        labels, valid = torch.stack(batch["labels"]), torch.stack(batch["valid_mask"])
        logits = model(pixel_values=pixels).logits
        d, i = mask_scores(logits, labels, valid)
        dice.append(d)
        iou.append(i)
        has_truth.append(truth(labels, valid).flatten(2).any(-1))
        for k in range(min(len(pixels), 4 - len(samples))):
            samples.append((pixels[k, 0].numpy(), (logits[k] > 0).numpy(), (labels[k] > 0.5).numpy()))
    metrics = {"split": split, "num_images": len(dataset),
               **summarise_mask_scores(torch.cat(dice), torch.cat(iou), torch.cat(has_truth), names)}
    if overlap is not None:
        metrics["imagenome_overlap"] = overlap
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "segmentation_metrics.json").write_text(json.dumps(metrics, indent=2))
        draw_overlays(*zip(*samples), names, out_dir / "segmentation_samples.png")
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="phantom", choices=[n for n, e in DATASETS.items() if e.masks])
    parser.add_argument("--data", help="phantom: the set's root")
    parser.add_argument("--csv", help="chexmask / siim: the mask table")
    parser.add_argument("--images", help="chexmask: the MIMIC-CXR-JPG folder; siim: the DICOM folder")
    parser.add_argument("--split", help="default: test, or validate for a dataset without a test split (siim)")
    parser.add_argument("--out", help="folder for segmentation_metrics.json and segmentation_samples.png")
    parser.add_argument("--imagenome-splits", help="Chest ImaGenome's silver_dataset/splits folder: count and warn "
                        "about evaluated images in its train / valid splits (seen by an ImaGenome-pretrained encoder)")
    args = parser.parse_args(argv)
    data = DataConfig(dataset=args.dataset, root=args.data, csv=args.csv,
                      mimic_cxr_jpg_dir=args.images if args.dataset == "chexmask" else None,
                      images_dir=args.images if args.dataset == "siim" else None)
    split = args.split or ("test" if "test" in DATASETS[args.dataset].splits else "validate")
    metrics = evaluate_segmentation(args.model, data, split, args.out, imagenome_splits=args.imagenome_splits)
    print(f"{metrics['num_images']} {split} images. Dice and IoU over the images whose truth has the class (an "
          "image empty in truth and prediction is left out) and over all images (where it scores 1)")
    print(f"{'class':<14} {'with truth':>10} {'Dice':>7} {'IoU':>7} {'Dice all':>9} {'IoU all':>8}")
    rows = [(name, metrics["images_with_truth"][name], metrics["dice_nonempty_truth"][name],
             metrics["iou_nonempty_truth"][name], metrics["dice_all_images"][name], metrics["iou_all_images"][name])
            for name in metrics["dice_all_images"]]
    rows.append(("mean", "", metrics["mean_dice_nonempty_truth"], metrics["miou_nonempty_truth"],
                 metrics["mean_dice_all_images"], metrics["miou_all_images"]))
    for name, count, *values in rows:
        print(f"{name:<14} {count!s:>10} " + " ".join(f"{format_score(v):>{w}}" for v, w in zip(values, (7, 7, 9, 8))))


if __name__ == "__main__":
    main()

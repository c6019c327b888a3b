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
from pathlib import Path

import numpy as np
import torch

from train.config import DataConfig
from train.data.registry import DATASETS, load_mask_split
from train.engine.hub import resolve_model_location


def mask_scores(logits: torch.Tensor, labels: torch.Tensor, valid_mask: torch.Tensor | None = None):
    """Per-image, per-class Dice and IoU (`[B, C]` each) of `logits > 0` against `labels`, inside `valid_mask`."""
    pred, true = logits > 0, labels > 0.5
    if valid_mask is not None:
        valid = valid_mask[:, None] if valid_mask.dim() == 3 else valid_mask
        pred, true = pred & valid, true & valid
    inter = (pred & true).flatten(2).sum(-1).double()
    p, t = pred.flatten(2).sum(-1).double(), true.flatten(2).sum(-1).double()
    union = p + t - inter
    empty = (p + t) == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / (p + t).clamp(min=1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp(min=1))
    return dice, iou


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
def evaluate_segmentation(model_dir, data, split: str = "test", out_dir=None, batch_size: int = 16) -> dict:
    """`data`: a `DataConfig` naming a dataset with masks, or the root folder of a phantom set."""
    from transformers import AutoModelForSemanticSegmentation, AutoProcessor

    from train.data.segmentation import make_segmentation_transform

    if not isinstance(data, DataConfig):
        data = DataConfig(dataset="phantom", root=str(data))

    location, options = resolve_model_location(model_dir)
    model = AutoModelForSemanticSegmentation.from_pretrained(location, **options).eval()
    processor = AutoProcessor.from_pretrained(location, **options)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    dataset = load_mask_split(data, split, names)
    dataset.set_transform(make_segmentation_transform(processor, names))
    dice, iou, samples = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        pixels = torch.stack(batch["pixel_values"])
        labels, valid = torch.stack(batch["labels"]), torch.stack(batch["valid_mask"])
        logits = model(pixel_values=pixels).logits
        d, i = mask_scores(logits, labels, valid)
        dice.append(d)
        iou.append(i)
        for k in range(min(len(pixels), 4 - len(samples))):
            samples.append((pixels[k, 0].numpy(), (logits[k] > 0).numpy(), (labels[k] > 0.5).numpy()))
    dice, iou = torch.cat(dice).mean(0).tolist(), torch.cat(iou).mean(0).tolist()
    metrics = {"split": split, "num_images": len(dataset), "dice": dict(zip(names, dice)), "iou": dict(zip(names, iou)),
               "mean_dice": float(np.mean(dice)), "miou": float(np.mean(iou))}
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
    args = parser.parse_args(argv)
    data = DataConfig(dataset=args.dataset, root=args.data, csv=args.csv,
                      mimic_cxr_jpg_dir=args.images if args.dataset == "chexmask" else None,
                      images_dir=args.images if args.dataset == "siim" else None)
    split = args.split or ("test" if "test" in DATASETS[args.dataset].splits else "validate")
    metrics = evaluate_segmentation(args.model, data, split, args.out)
    print(f"{'class':<14} {'Dice':>7} {'IoU':>7}   ({metrics['num_images']} {split} images)")
    for name in metrics["dice"]:
        print(f"{name:<14} {metrics['dice'][name]:>7.3f} {metrics['iou'][name]:>7.3f}")
    print(f"{'mean':<14} {metrics['mean_dice']:>7.3f} {metrics['miou']:>7.3f}")


if __name__ == "__main__":
    main()

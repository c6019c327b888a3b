"""Segmentation transfer: an Anatomy-VLM encoder + U-Net decoder, Dice + BCE (`configuration/train/segmentation_*`).

`model.init_from`: an Anatomy-VLM checkpoint; `model.labels`: mask classes; `model.mode`: `frozen` (decoder only),
`full` or `lora`; `model.encoder_lr_scale`: the encoder's share of the learning rate. `data.dataset` names a
dataset with masks in `train.data.registry` (phantom, chexmask, siim).
"""

from __future__ import annotations

import torch

from train.config import REPO_ROOT, RunConfig
from train.data.registry import ensure_phantom, load_mask_split
from train.engine.hub import resolve_model_location


class SegmentationTask:
    def __init__(self, config: RunConfig, accelerator, output_dir):
        from transformers import AutoProcessor

        from modeling_anatomy_vlm.modeling_anatomy_vlm_segmentation import AnatomyVLMForSemanticSegmentation
        from train.data.segmentation import make_segmentation_transform

        settings = config.segmentation_model()
        labels = list(settings.labels)
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                ensure_phantom(config.data)
            self.train_set = load_mask_split(config.data, config.data.train_split, labels)
            self.val_set = load_mask_split(config.data, config.data.val_split, labels)
        location, options = resolve_model_location(settings.init_from, base=REPO_ROOT)
        self.model = AnatomyVLMForSemanticSegmentation.from_anatomy_vlm(location, labels=labels, **options)
        self.mode, self.encoder_lr_scale = settings.mode, settings.encoder_lr_scale
        if self.mode == "frozen":
            self.model.freeze_encoder()
        self.processor = AutoProcessor.from_pretrained(location, **options)
        for dataset in (self.train_set, self.val_set):
            dataset.set_transform(make_segmentation_transform(self.processor, labels))
        self.train_collator = self.val_collator = SegmentationCollator()

    def lora_config(self, lora):
        return self.model.encoder_lora_config(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout)

    def after_prepare(self, accelerator) -> None:
        """Nothing to move: every part of the segmentation model runs in a step."""

    def start_stage(self, stage) -> dict:
        return {}

    def inputs(self, batch: dict, weights: dict) -> dict:
        return {"pixel_values": batch["pixel_values"], "labels": batch["labels"], "valid_mask": batch["valid_mask"]}

    def loss(self, output, weights: dict) -> tuple[torch.Tensor, dict]:
        return output.loss, {"dice": output.loss_dice, "bce": output.loss_bce}

    @torch.no_grad()
    def validate(self, model, loader, accelerator, max_batches: int | None = None) -> dict:
        """Mean per-image Dice and IoU per class on the validation split (sigmoid > 0.5, padding excluded)."""
        from train.eval.segmentation import mask_scores

        names = list(self.model.config.id2label.values())
        sums = torch.zeros(1 + 2 * len(names), dtype=torch.float64, device=accelerator.device)
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(pixel_values=batch["pixel_values"]).logits
            dice, iou = mask_scores(logits, batch["labels"], batch["valid_mask"])  # [B, C] each
            sums += torch.cat([torch.tensor([float(len(dice))], device=sums.device, dtype=torch.float64),
                               dice.double().sum(0), iou.double().sum(0)])
        count, *values = accelerator.reduce(sums, reduction="sum").tolist()
        dice, iou = values[: len(names)], values[len(names):]
        result = {f"val/dice_{n}": d / max(count, 1) for n, d in zip(names, dice)}
        result.update({f"val/iou_{n}": v / max(count, 1) for n, v in zip(names, iou)})
        return result


class SegmentationCollator:
    def __call__(self, examples: list[dict]) -> dict:
        batch = {k: torch.stack([e[k] for e in examples]) for k in ("pixel_values", "labels", "valid_mask")}
        batch["skipped_images"] = 0
        return batch

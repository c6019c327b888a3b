"""The paper's pre-training: boxes, global findings and region-phrase alignment, weighted per stage.

Texts are embedded once into a cache (`train.text.cache`), so the frozen text tower never runs in a training step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from train.config import LOSSES, RunConfig, resolve_path
from train.data.common import make_transform, region_phrases_of
from train.data.registry import ensure_phantom, load_finding_split
from train.text.cache import TextEmbeddingCache
from train.text.vocabulary import check_regions
from train.text.region_texts import (
    RegionPrompts, possible_region_texts, region_text_masks, region_text_supervision, region_texts_for_image,
)


class Collator:
    """Stacks transformed examples, drops unreadable images, and builds the region texts of the batch.

    What it returns is what crosses to the device each step, so it is kept small: pixels as `[B, 1, S, S]` uint8
    (normalised on the device), text embeddings in the cache's dtype, and the phrase supervision as the compact
    `RegionTextSupervision` arrays (the `[B, R, T]` masks are built on the device; `AnatomyVLMTask.inputs`).
    Region texts are sampled with a generator seeded by (seed, epoch, image id), so a batch is the same whether
    training ran straight through or resumed from a checkpoint.
    """

    def __init__(self, config, cache: TextEmbeddingCache | None, seed: int, perturb_prob: float,
                 unmentioned_as_negative: bool, on_error: str, unseen_findings=()):
        self.config, self.cache, self.seed = config, cache, seed
        self.unseen_findings = frozenset(unseen_findings)
        self.perturb_prob, self.unmentioned_as_negative, self.on_error = perturb_prob, unmentioned_as_negative, on_error
        self.prompts = RegionPrompts.from_config(config)
        self.epoch = 0
        self.with_texts = True

    def __call__(self, examples: list[dict]) -> dict:
        kept = [e for e in examples if e["image_ok"]]
        skipped = len(examples) - len(kept)
        if skipped and self.on_error == "raise":
            raise ValueError(f"{skipped} unreadable images in a batch")
        batch = {"skipped_images": skipped}  # a plain int: reading it back must not sync with the GPU
        if not kept:
            return batch
        batch["image_ids"] = [e["image_id"] for e in kept]  # named in the error if the batch's loss is not finite
        batch["pixels"] = torch.stack([e["pixels"] for e in kept])
        batch["boxes"] = torch.stack([e["target_boxes"] for e in kept])
        batch["box_mask"] = torch.stack([e["box_mask"] for e in kept])
        labels = torch.tensor(np.array([e["global_labels"] for e in kept]), dtype=torch.int8)  # 1 / 0 / -1 unknown
        region_labels = torch.tensor(np.array([e["region_labels"] for e in kept]), dtype=torch.int8)
        if self.unmentioned_as_negative:
            labels, region_labels = labels.clamp(min=0), region_labels.clamp(min=0)
        batch["finding_labels"], batch["region_labels"] = labels, region_labels
        if self.with_texts and self.cache is not None:
            supervision = region_text_supervision(self.region_texts(kept))
            batch["phrase_text_embeds"] = self.cache.lookup(supervision.texts, as_stored=True)
            batch["phrase_supervision"] = supervision.tensors()
        return batch

    def region_texts(self, examples: list[dict]) -> list:
        """Each example's sampled region texts (`region_texts_for_image`), drawn by (seed, epoch, image id)."""
        items = []
        for e in examples:
            key = int.from_bytes(e["image_id"].encode()[:16].ljust(16, b"\0"), "little") % (2**63)
            rng = np.random.default_rng([self.seed, self.epoch, key])
            items.append(region_texts_for_image(
                region_phrases_of(e["region_phrases"]), rng, perturb_prob=self.perturb_prob,
                findings=self.config.findings, region_names=self.config.region_names, prompts=self.prompts,
                unseen_findings=self.unseen_findings))
        return items


def checkpoint_normalisation(vision_init) -> tuple[list[float], list[float]] | None:
    """The (image_mean, image_std) of a vision checkpoint's ``preprocessor_config.json`` (local folder or Hub
    cache), or None without a checkpoint or that file: pixels must be normalised as in the tower's pre-training."""
    if not vision_init:
        return None
    from transformers.utils import cached_file

    path = cached_file(str(vision_init), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    import json

    settings = json.loads(Path(path).read_text())
    if "image_mean" not in settings or "image_std" not in settings:
        return None
    return list(np.atleast_1d(settings["image_mean"]).tolist()), list(np.atleast_1d(settings["image_std"]).tolist())


def training_texts(dataset, config, unseen_findings=()) -> set[str]:
    """Every text a training step can ask the cache for: region texts of each image + every wording of the global
    and region prompts."""
    prompts = RegionPrompts.from_config(config)
    texts = {t.format(finding=f) for t in config.global_prompt_templates for f in config.findings}
    texts |= {t.format(finding=f, region=r) for t in (*config.region_prompt_templates,
                                                      *config.region_negated_prompt_templates)
              for r in config.region_names for f in config.findings}
    phrases: dict[str, list] = {}
    for value in dataset.select_columns(["region_phrases"])["region_phrases"]:
        for region, entries in region_phrases_of(value).items():
            phrases.setdefault(region, []).extend(entries)
    texts |= possible_region_texts(phrases, config.findings, config.region_names, prompts, frozenset(unseen_findings))
    return texts


class AnatomyVLMTask:
    def __init__(self, config: RunConfig, accelerator, output_dir):
        data = config.data
        model_config = config.model_config()
        names, findings = model_config.region_names, model_config.findings
        check_regions(names)
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                ensure_phantom(data)
            self.train_set = load_finding_split(data, data.train_split, names, findings)
            self.val_set = load_finding_split(data, data.val_split, names, findings)
        from modeling_anatomy_vlm import AnatomyVLMModel, AnatomyVLMProcessor

        self.model = AnatomyVLMModel.from_encoders(model_config, config.model_setting("vision_init"))
        # A pretrained tower learned its features on inputs normalised its own way.
        statistics = checkpoint_normalisation(config.model_setting("vision_init"))
        normalisation = {} if statistics is None else {"image_mean": statistics[0], "image_std": statistics[1]}
        self.processor = AnatomyVLMProcessor.from_model_config(model_config, **normalisation)
        self.encoder_lr_scale = float(config.model_setting("encoder_lr_scale"))
        self.shuffle_images = False
        with accelerator.main_process_first():
            texts = set().union(*(training_texts(split, model_config, data.unseen_findings)
                                  for split in (self.train_set, self.val_set)))
            cache = TextEmbeddingCache.load_or_build(output_dir / "text_cache", self.model, self.processor.tokenizer,
                                                     texts, dtype=data.text_cache_dtype)
        # Every template wording of every prompt, ensembled inside the model as `prompt_embeds` does at evaluation:
        # [F, K, text_hidden] and [2, Q, F, K, text_hidden] (positive, negated pair of every region and finding).
        groups = self.model.prompt_groups(findings)
        self.finding_embeds = torch.stack([cache.lookup(group) for group in groups[:len(findings)]])
        self.region_prompt_embeds = torch.stack([cache.lookup(group) for group in groups[len(findings):]]).reshape(
            2, len(names), len(findings), len(groups[-1]), -1)
        for dataset in (self.train_set, self.val_set):
            dataset.set_transform(make_transform(self.processor, data.on_error,
                                                 data.prepared_dir and resolve_path(data.prepared_dir)))
        args = (model_config, cache, config.training.seed, data.perturb_prob, data.unmentioned_as_negative,
                data.on_error, data.unseen_findings)
        self.train_collator, self.val_collator = Collator(*args), Collator(*args)

    def lora_config(self, lora):
        from peft import LoraConfig

        trained_fully = ["anatomy_queries", "box_head", "visual_projection", "region_projection", "text_projection"]
        if self.model.config.patch_embedding == "conv":  # no checkpoint holds a conv stem: it must learn from scratch
            trained_fully.append("patch_embed")
        return LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=r".*vision_model\.blocks\.\d+\.(attn\.qkv|attn\.proj|fc1|fc2)", modules_to_save=trained_fully,
        )

    def after_prepare(self, accelerator) -> None:
        """The frozen text tower never runs in a step (texts come from the cache): on a GPU it moves back to host
        memory, out of the way of activations. Under DeepSpeed or FSDP the engine owns where parameters live."""
        from accelerate.utils import DistributedType

        if accelerator.device.type != "cpu" and accelerator.distributed_type in (DistributedType.NO,
                                                                                 DistributedType.MULTI_GPU):
            self.model.text_model.to("cpu")

    def start_stage(self, stage) -> dict:
        weights = stage.weights()
        self.train_collator.with_texts = weights["fine"] > 0
        self.shuffle_images = stage.shuffle_images
        return weights

    def inputs(self, batch: dict, weights: dict) -> dict:
        """The model inputs a stage needs (texts only when their loss has weight), finished on the batch's device:
        pixels normalised and repeated to the tower's channels, phrase masks built from their compact form."""
        pixel_values = self.processor.image_processor.normalize_pixels(batch["pixels"])
        if self.shuffle_images:  # batches come in random order: each image gets an unrelated one's pixels
            pixel_values = pixel_values.roll(1, dims=0)
        inputs = {"pixel_values": pixel_values, "boxes": batch["boxes"], "box_mask": batch["box_mask"]}
        device = pixel_values.device
        if self.finding_embeds.device != device:  # the cached prompt embeddings move once, not every step
            self.finding_embeds, self.region_prompt_embeds = self.finding_embeds.to(device), self.region_prompt_embeds.to(device)
        if weights.get("global", 0) > 0:
            inputs.update(finding_text_embeds=self.finding_embeds, finding_labels=batch["finding_labels"].float())
        if weights.get("region", 0) > 0:
            inputs.update(region_prompt_text_embeds=self.region_prompt_embeds, region_labels=batch["region_labels"].float())
        if weights.get("fine", 0) > 0:
            positive, negative = region_text_masks(**batch["phrase_supervision"])
            inputs.update(phrase_text_embeds=batch["phrase_text_embeds"].float(),
                          phrase_positive_mask=positive, phrase_negative_mask=negative)
        return inputs

    def loss(self, output, weights: dict) -> tuple[torch.Tensor, dict]:
        parts = {name: getattr(output, f"loss_{name}") for name in LOSSES
                 if weights.get(name, 0) > 0 and getattr(output, f"loss_{name}") is not None}
        return sum(weights[name] * value for name, value in parts.items()), parts

    @torch.no_grad()
    def validate(self, model, loader, accelerator, max_batches: int | None = None) -> dict:
        """Validation losses (all terms) and mean box IoU over annotated regions."""
        from torchvision.ops import box_convert, box_iou

        sums = torch.zeros(3 + len(LOSSES), dtype=torch.float64, device=accelerator.device)  # n, iou, n_iou, losses
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if "pixels" not in batch:
                continue
            output = model(**self.inputs(batch, {"global": 1, "fine": 1, "region": 1}))
            n = len(batch["pixels"])
            pred = box_convert(output.pred_boxes.float(), "cxcywh", "xyxy").reshape(-1, 4)
            true = box_convert(batch["boxes"].float(), "cxcywh", "xyxy").reshape(-1, 4)
            mask = batch["box_mask"].reshape(-1)
            ious = torch.diagonal(box_iou(pred, true))[mask]
            losses = [getattr(output, f"loss_{name}").double() * n for name in LOSSES]
            sums += torch.stack([torch.tensor(float(n), device=sums.device), ious.sum().double(),
                                 mask.sum().double(), *losses])
        count, iou_sum, iou_count, *loss_sums = accelerator.reduce(sums, reduction="sum").tolist()
        result = {f"val/loss_{name}": value / max(count, 1) for name, value in zip(LOSSES, loss_sums)}
        result["val/box_miou"] = iou_sum / max(iou_count, 1)
        return result

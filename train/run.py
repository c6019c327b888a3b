"""Staged Anatomy-VLM training on Accelerate: one CPU, one GPU, many GPUs, DeepSpeed.

    accelerate launch train/run.py --config configuration/train/quickstart.yaml [--set training.batch_size=16]
    accelerate launch train/run.py --config ... --resume latest        # or a checkpoint folder

Stages (PAPER.md): 1 detection only, 2 detection + global, 3 detection + global + fine-grained region-phrase
alignment. Each stage has its own length, learning rate and loss weights (YAML under configuration/train/) and
its own warmup + cosine schedule; the weights carry over from one stage to the next. Texts are embedded once
into a cache (`train/text_cache.py`), so the frozen text tower never runs in a training step.

Outputs in `training.output_dir`: `checkpoints/step_N/` (Accelerate state + trainer_state.json), TensorBoard
logs in `logs/`, the text cache, and at the end `model/` (model + processor, loadable with
`AutoModel.from_pretrained(..., trust_remote_code=True)`), `adapter/` with LoRA, and `eval.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Run as `python train/<script>.py`, Python puts train/ first on sys.path, where our evaluate.py would shadow
# the `evaluate` library: import from the repo root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "train"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_anatomy_vlm import AnatomyVLMConfig, AnatomyVLMModel, AnatomyVLMProcessor  # noqa: E402
from train.data.common import make_transform, region_phrases_of  # noqa: E402
from train.labels import RegionPrompts, collate_region_texts, possible_region_texts, region_texts_for_image  # noqa: E402
from train.text_cache import TextEmbeddingCache  # noqa: E402

logger = logging.getLogger("anatomy_vlm.train")
LOSSES = ("anatomy", "global", "fine", "region")


# ------------------------------------------------------------------------------------------------- config
def load_config(path, overrides=()) -> dict:
    """YAML config with `--set a.b=value` overrides (values parsed as YAML: numbers, lists, null...)."""
    config = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if isinstance(node, list):
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        if isinstance(node, list):
            node[int(leaf)] = yaml.safe_load(value)
        else:
            node[leaf] = yaml.safe_load(value)
    for stage in config["stages"]:
        unknown = set(stage.get("loss_weights", {})) - set(LOSSES)
        if unknown:
            raise ValueError(f"stage {stage.get('name')!r}: unknown loss weights {sorted(unknown)}; use {LOSSES}")
        if int(stage["steps"]) <= 0:
            raise ValueError(f"stage {stage.get('name')!r}: steps must be positive")
    return config


def resolve(path) -> Path:
    """Config paths are relative to the repository root."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def model_config(cfg: dict) -> AnatomyVLMConfig:
    kwargs = dict(cfg["model"])
    kwargs.pop("vision_init", None)
    return AnatomyVLMConfig(**kwargs)


# --------------------------------------------------------------------------------------------------- data
def load_split(cfg: dict, split: str):
    from train.data.imagenome import load_imagenome

    data = cfg["data"]
    return load_imagenome(
        resolve(data["root"]), split, region_names=cfg["_region_names"], findings=cfg["_findings"],
        on_error=data.get("on_error", "skip"), max_images=data.get("max_images"), num_proc=data.get("index_workers", 1),
    )


def ensure_phantom(cfg: dict) -> None:
    """Generate the phantom set named in `data.phantom` (cached: an identical complete set is kept)."""
    spec = cfg["data"].get("phantom")
    if not spec:
        return
    from train.data.phantom import generate_dataset

    generate_dataset(resolve(cfg["data"]["root"]), n=spec["n"], seed=spec.get("seed", 0),
                     size=spec.get("size", 512), workers=spec.get("workers", 1))


class Collator:
    """Stacks transformed examples, drops unreadable images, and builds the region texts of the batch.

    Region texts are sampled with a generator seeded by (seed, epoch, image id), so a batch is the same whether
    training ran straight through or resumed from a checkpoint.
    """

    def __init__(self, config: AnatomyVLMConfig, cache: TextEmbeddingCache | None, seed: int, perturb_prob: float,
                 unmentioned_as_negative: bool, on_error: str):
        self.config, self.cache, self.seed = config, cache, seed
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
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in kept])
        batch["boxes"] = torch.stack([e["target_boxes"] for e in kept])
        batch["box_mask"] = torch.stack([e["box_mask"] for e in kept])
        labels = torch.tensor(np.array([e["global_labels"] for e in kept]), dtype=torch.float32)
        if self.unmentioned_as_negative:
            labels = labels.clamp(min=0)
        batch["finding_labels"] = labels
        region_labels = torch.tensor(np.array([e["region_labels"] for e in kept]), dtype=torch.float32)
        batch["region_labels"] = region_labels.clamp(min=0) if self.unmentioned_as_negative else region_labels
        if self.with_texts and self.cache is not None:
            items = []
            for e in kept:
                key = int.from_bytes(e["image_id"].encode()[:16].ljust(16, b"\0"), "little") % (2**63)
                rng = np.random.default_rng([self.seed, self.epoch, key])
                items.append(region_texts_for_image(
                    region_phrases_of(e["region_phrases"]), rng, perturb_prob=self.perturb_prob,
                    findings=self.config.findings, region_names=self.config.region_names, prompts=self.prompts))
            texts, positive, negative = collate_region_texts(items)
            batch["phrase_text_embeds"] = self.cache.lookup(texts)
            batch["phrase_positive_mask"] = torch.from_numpy(positive)
            batch["phrase_negative_mask"] = torch.from_numpy(negative)
        return batch


def training_texts(dataset, config: AnatomyVLMConfig) -> set[str]:
    """Every text a training step can ask the cache for: region texts of each image + global prompts."""
    prompts = RegionPrompts.from_config(config)
    texts = {t.format(finding=f) for t in config.global_prompt_templates for f in config.findings}
    phrases: dict[str, list] = {}
    for value in dataset.select_columns(["region_phrases"])["region_phrases"]:
        for region, entries in region_phrases_of(value).items():
            phrases.setdefault(region, []).extend(entries)
    texts |= possible_region_texts(phrases, config.findings, config.region_names, prompts)
    return texts


class EpochOrder(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch): the data order is a pure function of the epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self):
        return self.n


# ---------------------------------------------------------------------------------------------- optimiser
NO_DECAY_KEYWORDS = ("norm", "bias", "anatomy_queries", "position_embeddings", "cls_token", "logit_", "lambda1")


def param_groups(model, weight_decay: float, encoder_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, anatomy queries, position embeddings, temperatures.

    With `encoder_lr_scale` != 1, the vision tower's parameters get their own groups whose learning rate is that
    fraction of the schedule's (the optimizer runs at lr 1.0 and the schedule's factor is the learning rate).
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay = param.ndim < 2 or any(k in name for k in NO_DECAY_KEYWORDS)
            encoder = encoder_lr_scale != 1.0 and "vision_model." in name
            groups.setdefault((no_decay, encoder), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
         **({"lr": encoder_lr_scale} if encoder else {})}
        for (no_decay, encoder), params in sorted(groups.items())
    ]


def staged_schedule(optimizer, stages: list[dict], min_ratio: float):
    """One LambdaLR over all stages: per stage a linear warmup to its `lr`, then cosine down to `min_ratio * lr`.

    The optimizer is created with lr 1.0, so the factor is the learning rate itself. One optimizer and one
    schedule for the whole run keep `accelerator.prepare` (and DeepSpeed's engine) to a single call.
    """
    bounds = np.cumsum([0] + [int(stage["steps"]) for stage in stages])

    def lr_at(step: int) -> float:
        index = min(int(np.searchsorted(bounds, step, side="right")) - 1, len(stages) - 1)
        # Python numbers, not NumPy scalars: the scheduler's state (last lr) is saved in checkpoints, and
        # torch.load(weights_only=True) refuses NumPy scalars when resuming.
        stage, local, total = stages[index], int(step - bounds[index]), int(bounds[index + 1] - bounds[index])
        peak, warmup = float(stage["lr"]), int(stage.get("warmup_steps", 0))
        if local < warmup:
            return peak * (local + 1) / warmup
        progress = min(1.0, (local - warmup) / max(1, total - warmup))
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


# ------------------------------------------------------------------------------------------------- state
def frozen_parameters(named_parameters: dict, stage: dict) -> list:
    """The parameters a stage keeps fixed: those whose names start with one of its `frozen` prefixes.

    Their gradients are dropped after each backward pass rather than switching `requires_grad`, so a model
    wrapped for data parallelism keeps the same set of gradients in every stage. A prefix that names no
    parameter is a config error.
    """
    frozen = []
    for prefix in stage.get("frozen", []):
        matched = [parameter for name, parameter in named_parameters.items() if name.startswith(prefix)]
        if not matched:
            raise ValueError(f"stage {stage.get('name')!r}: frozen prefix {prefix!r} names no model parameter")
        frozen += matched
    return frozen


def latest_checkpoint(output_dir: Path) -> Path | None:
    folders = [p for p in (output_dir / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return max(folders, key=lambda p: int(p.name.split("_")[1])) if folders else None


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> None:
    folder = output_dir / "checkpoints" / f"step_{state['global_step']}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))  # written last: marks it complete
        done = sorted((p for p in (output_dir / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()),
                      key=lambda p: int(p.name.split("_")[1]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# -------------------------------------------------------------------------------------------------- tasks
class AnatomyVLMTask:
    """The paper's pre-training: boxes, global findings and region-phrase alignment, weighted per stage."""

    def __init__(self, cfg: dict, accelerator, output_dir: Path):
        data_cfg = cfg["data"]
        config = model_config(cfg)
        cfg["_region_names"], cfg["_findings"] = config.region_names, config.findings
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                ensure_phantom(cfg)
            self.train_set = load_split(cfg, data_cfg.get("train_split", "train"))
            self.val_set = load_split(cfg, data_cfg.get("val_split", "validate"))
        self.model = AnatomyVLMModel.from_encoders(config, cfg["model"].get("vision_init"))
        self.processor = AnatomyVLMProcessor.from_model_config(config)
        with accelerator.main_process_first():
            texts = training_texts(self.train_set, config) | training_texts(self.val_set, config)
            cache = TextEmbeddingCache.load_or_build(output_dir / "text_cache.safetensors", self.model,
                                                     self.processor.tokenizer, texts)
        self.finding_embeds = torch.stack([
            cache.lookup([t.format(finding=f) for t in config.global_prompt_templates]).mean(0) for f in config.findings])
        # [2, Q, F, text_hidden]: the zero-shot prompt pair of every (region, finding), first template of each.
        self.region_prompt_embeds = torch.stack([
            cache.lookup([templates[0].format(finding=f, region=r) for r in config.region_names for f in config.findings])
            .reshape(len(config.region_names), len(config.findings), -1)
            for templates in (config.region_prompt_templates, config.region_negated_prompt_templates)])
        on_error = data_cfg.get("on_error", "skip")
        for dataset in (self.train_set, self.val_set):
            dataset.set_transform(make_transform(self.processor, on_error))
        seed = int(cfg["training"].get("seed", 0))
        args = (config, cache, seed, data_cfg.get("perturb_prob", 0.2), data_cfg.get("unmentioned_as_negative", True),
                on_error)
        self.train_collator, self.val_collator = Collator(*args), Collator(*args)

    def lora_config(self, lora: dict):
        from peft import LoraConfig

        trained_fully = ["anatomy_queries", "box_head", "visual_projection", "region_projection", "text_projection"]
        if self.model.config.patch_embedding == "conv":  # no checkpoint holds a conv stem: it must learn from scratch
            trained_fully.append("patch_embed")
        return LoraConfig(
            r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.0),
            target_modules=r".*vision_model\.blocks\.\d+\.(attn\.qkv|attn\.proj|fc1|fc2)", modules_to_save=trained_fully,
        )

    def start_stage(self, stage: dict) -> dict:
        weights = {name: float(stage.get("loss_weights", {}).get(name, 0.0)) for name in LOSSES}
        self.train_collator.with_texts = weights["fine"] > 0
        return weights

    def inputs(self, batch: dict, weights: dict) -> dict:
        """The model inputs a stage needs: texts are passed only when their loss has weight."""
        inputs = {"pixel_values": batch["pixel_values"], "boxes": batch["boxes"], "box_mask": batch["box_mask"]}
        device = batch["pixel_values"].device
        if self.finding_embeds.device != device:  # the cached prompt embeddings move once, not every step
            self.finding_embeds, self.region_prompt_embeds = self.finding_embeds.to(device), self.region_prompt_embeds.to(device)
        if weights.get("global", 0) > 0:
            inputs.update(finding_text_embeds=self.finding_embeds,
                          finding_labels=batch["finding_labels"])
        if weights.get("region", 0) > 0:
            inputs.update(region_prompt_text_embeds=self.region_prompt_embeds, region_labels=batch["region_labels"])
        if weights.get("fine", 0) > 0:
            inputs.update(phrase_text_embeds=batch["phrase_text_embeds"],
                          phrase_positive_mask=batch["phrase_positive_mask"],
                          phrase_negative_mask=batch["phrase_negative_mask"])
        return inputs

    def loss(self, output, weights: dict) -> tuple[torch.Tensor, dict]:
        parts = {name: getattr(output, f"loss_{name}") for name in LOSSES
                 if weights.get(name, 0) > 0 and getattr(output, f"loss_{name}") is not None}
        return sum(weights[name] * value for name, value in parts.items()), parts

    @torch.no_grad()
    def validate(self, model, loader, accelerator, max_batches: int | None = None) -> dict:
        """Validation losses (all three terms) and mean box IoU over annotated regions."""
        from torchvision.ops import box_convert, box_iou

        sums = torch.zeros(3 + len(LOSSES), dtype=torch.float64, device=accelerator.device)  # n, iou, n_iou, losses
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if "pixel_values" not in batch:
                continue
            output = model(**self.inputs(batch, {"global": 1, "fine": 1, "region": 1}))
            n = len(batch["pixel_values"])
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


class SegmentationTask:
    """Segmentation transfer (issue: segmentation): an Anatomy-VLM encoder + U-Net decoder, Dice + BCE.

    `model.init_from`: an Anatomy-VLM checkpoint; `model.labels`: mask classes; `model.mode`: `frozen` (decoder
    only), `full` or `lora`; `model.encoder_lr_scale`: the encoder's share of the learning rate. `data.dataset`: `phantom` (`data.root`), `chexmask` (`data.csv`,
    `data.mimic_cxr_jpg_dir`) or `siim` (`data.csv`, `data.images_dir`; no official split: `data.val_fraction`).
    """

    def __init__(self, cfg: dict, accelerator, output_dir: Path):
        from modeling_anatomy_vlm.modeling_anatomy_vlm_segmentation import AnatomyVLMForSemanticSegmentation
        from train.data.segmentation import make_segmentation_transform

        model_cfg, data_cfg = cfg["model"], cfg["data"]
        labels = list(model_cfg["labels"])
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                ensure_phantom(cfg)
            self.train_set, self.val_set = segmentation_splits(data_cfg, labels)
        init_from = resolve(model_cfg["init_from"])
        self.model = AnatomyVLMForSemanticSegmentation.from_anatomy_vlm(str(init_from), labels=labels)
        self.mode = model_cfg.get("mode", "full")
        if self.mode not in ("frozen", "full", "lora"):
            raise ValueError(f"model.mode must be frozen, full or lora, got {self.mode!r}")
        if self.mode == "frozen":
            self.model.freeze_encoder()
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(init_from), trust_remote_code=True)
        for dataset in (self.train_set, self.val_set):
            dataset.set_transform(make_segmentation_transform(self.processor, labels))
        self.train_collator = self.val_collator = SegmentationCollator()

    def lora_config(self, lora: dict):
        return self.model.encoder_lora_config(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32),
                                              lora_dropout=lora.get("dropout", 0.0))

    def start_stage(self, stage: dict) -> dict:
        return {}

    def inputs(self, batch: dict, weights: dict) -> dict:
        return {"pixel_values": batch["pixel_values"], "labels": batch["labels"], "valid_mask": batch["valid_mask"]}

    def loss(self, output, weights: dict) -> tuple[torch.Tensor, dict]:
        return output.loss, {"dice": output.loss_dice, "bce": output.loss_bce}

    @torch.no_grad()
    def validate(self, model, loader, accelerator, max_batches: int | None = None) -> dict:
        """Mean per-image Dice and IoU per class on the validation split (sigmoid > 0.5, padding excluded)."""
        from train.evaluate_segmentation import mask_scores

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


def segmentation_splits(data_cfg: dict, labels: list[str]):
    from train.data import segmentation as seg

    kind = data_cfg.get("dataset", "phantom")
    on_error = data_cfg.get("on_error", "skip")
    if kind == "phantom":
        root = resolve(data_cfg["root"])
        return (seg.load_phantom_segmentation(root, data_cfg.get("train_split", "train"), labels, on_error=on_error),
                seg.load_phantom_segmentation(root, data_cfg.get("val_split", "validate"), labels, on_error=on_error))
    if kind == "chexmask":
        args = (resolve(data_cfg["csv"]), resolve(data_cfg["mimic_cxr_jpg_dir"]))
        return (seg.load_chexmask(*args, split=data_cfg.get("train_split", "train"), on_error=on_error),
                seg.load_chexmask(*args, split=data_cfg.get("val_split", "validate"), on_error=on_error))
    if kind == "siim":
        table = seg.load_siim_acr(resolve(data_cfg["csv"]), resolve(data_cfg["images_dir"]), on_error=on_error)
        parts = table.train_test_split(test_size=data_cfg.get("val_fraction", 0.1), seed=0)
        return parts["train"], parts["test"]
    raise ValueError(f"data.dataset must be phantom, chexmask or siim, got {kind!r}")


TASKS = {"anatomy_vlm": AnatomyVLMTask, "segmentation": SegmentationTask}


def resolve_mixed_precision(setting: str, on_cpu: bool) -> str:
    """`training.mixed_precision` for Accelerate. "auto" is bf16 autocast where the hardware computes bf16 natively (a
    GPU that supports it; a CPU with AVX512-BF16 or AMX), else "no" (fp32): emulated bf16 would be slower than
    fp32. Any other value is passed on as it is."""
    if setting != "auto":
        return setting
    if not on_cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native else "no"


def train(cfg: dict, resume: str | None = None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm import tqdm

    run, data_cfg = cfg["training"], cfg["data"]
    output_dir = resolve(run["output_dir"])
    on_cpu = bool(run.get("cpu")) or not torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=run.get("gradient_accumulation_steps", 1),
        mixed_precision=resolve_mixed_precision(run.get("mixed_precision", "auto"), on_cpu),
        log_with=run.get("log_with", "tensorboard") or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # Stage 1 leaves the text projection and temperatures unused: DDP must not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # Without a GPU, processes launched by torchrun (`accelerate launch --multi_gpu`) join a gloo CPU group.
        cpu=on_cpu,
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    seed = int(run.get("seed", 0))
    set_seed(seed)

    task_name = cfg.get("task", "anatomy_vlm")
    if task_name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task_name!r}")
    task = TASKS[task_name](cfg, accelerator, output_dir)
    model, processor = task.model, task.processor
    if run.get("gradient_checkpointing"):
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    lora = run.get("lora") or {}
    if lora.get("enabled"):
        from peft import get_peft_model

        model = get_peft_model(model, task.lora_config(lora))
        for name, param in model.named_parameters():
            if "logit_" in name:  # temperatures and bias are bare parameters, not modules PEFT could save
                param.requires_grad_(True)

    train_set, val_set, collator = task.train_set, task.val_set, task.train_collator
    sampler = EpochOrder(len(train_set), seed)
    batch_size = int(run["batch_size"])
    workers = int(data_cfg.get("num_workers", 0))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                                               num_workers=workers, collate_fn=collator)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=workers,
                                             collate_fn=task.val_collator)
    stages = cfg["stages"]
    groups = param_groups(model, run.get("weight_decay", 0.05), float(cfg["model"].get("encoder_lr_scale", 1.0)))
    optimizer = torch.optim.AdamW(groups, lr=1.0,
                                  betas=tuple(run.get("betas", (0.9, 0.999))), fused=torch.cuda.is_available() or None)
    scheduler = staged_schedule(optimizer, stages, run.get("min_lr_ratio", 0.05))
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)

    steps_per_epoch = len(train_loader) // accelerator.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {batch_size} per process")
    state = {"stage": 0, "step_in_stage": 0, "global_step": 0, "skipped_images": 0}
    if resume:
        resume_dir = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
        if resume_dir is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {output_dir / 'checkpoints'}")
        if not (resume_dir / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume {resume_dir}: not a complete checkpoint (no trainer_state.json)")
        accelerator.load_state(str(resume_dir))
        state = json.loads((resume_dir / "trainer_state.json").read_text())
        logger.info("resumed from %s (stage %d, step %d)", resume_dir, state["stage"] + 1, state["step_in_stage"])

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        public = {k: v for k, v in cfg.items() if not k.startswith("_")}
        (output_dir / "train_config.yaml").write_text(yaml.safe_dump(public, sort_keys=False))
    if accelerator.log_with:
        flat = {f"{stage['name']}/{k}": v for stage in stages for k, v in stage.items()
                if k != "name" and isinstance(v, (int, float, str))}
        accelerator.init_trackers("anatomy_vlm", config={**flat, "batch_size": batch_size, "seed": seed})

    log_every, eval_every = int(run.get("log_every", 10)), int(run.get("eval_every", 0))
    ckpt_every, keep = int(run.get("checkpoint_every", 0)), int(run.get("keep_checkpoints", 2))
    max_grad_norm, stop_after = run.get("max_grad_norm", 1.0), run.get("stop_after_steps")
    images_per_step = batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps

    # Every stage's `frozen` list is checked here, so a typo in a late stage fails before any training.
    named_parameters = dict(accelerator.unwrap_model(model).named_parameters())
    frozen_by_stage = [frozen_parameters(named_parameters, stage) for stage in stages]
    for stage, frozen in zip(stages, frozen_by_stage):
        if frozen and accelerator.state.deepspeed_plugin is not None:  # its engine keeps gradients out of reach
            raise ValueError(f"stage {stage['name']!r}: `frozen` is not supported under DeepSpeed; "
                             "drop it from the stage or launch without DeepSpeed")
    for stage_index in range(state["stage"], len(stages)):
        stage, frozen = stages[stage_index], frozen_by_stage[stage_index]
        weights = task.start_stage(stage)
        total = int(stage["steps"])
        step = state["step_in_stage"] if stage_index == state["stage"] else 0
        bar = tqdm(total=total, initial=step, desc=f"stage {stage_index + 1} {stage['name']}", unit="step",
                   disable=not accelerator.is_main_process, dynamic_ncols=True)
        model.train()
        tic, tic_step, running = time.perf_counter(), step, None
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            sampler.epoch = collator.epoch = stage_index * 100_000 + epoch  # collators sample texts per epoch
            batches = train_loader
            if skip:  # resuming inside an epoch: the same order, minus the batches already trained on
                batches = accelerator.skip_first_batches(train_loader, skip * accelerator.gradient_accumulation_steps)
            for batch in batches:
                state["skipped_images"] += batch["skipped_images"]
                if "pixel_values" not in batch:  # every image of this batch was unreadable (and skipped)
                    continue
                with accelerator.accumulate(model):
                    output = model(**task.inputs(batch, weights))
                    loss, parts = task.loss(output, weights)
                    # One scalar read per step (a host-device sync on a GPU): a NaN or inf must stop the run
                    # before its gradients reach the weights, with the batch that produced it named.
                    if not torch.isfinite(loss.detach()).item():
                        raise FloatingPointError(
                            f"stage {stage_index + 1} ({stage['name']}), step {step + 1}: loss is {loss.item()} "
                            f"({', '.join(f'{k} {v.item():.4g}' for k, v in parts.items())}); "
                            f"batch images: {batch.get('image_ids', 'not recorded')}")
                    accelerator.backward(loss)
                    for parameter in frozen:  # no gradient: AdamW neither steps nor decays them this stage
                        parameter.grad = None
                    if accelerator.sync_gradients and max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                state.update(stage=stage_index, step_in_stage=step, global_step=state["global_step"] + 1)
                detached = {name: value.detach() for name, value in parts.items()}
                running = detached if running is None else {k: running[k] + v for k, v in detached.items()}
                bar.update(1)
                if step % log_every == 0 or step == total:  # with the finite-loss check, the loop's only syncs
                    n = step - tic_step
                    speed = n * images_per_step / (time.perf_counter() - tic)
                    logs = {f"train/loss_{k}": float(v) / n for k, v in running.items()}
                    logs.update({"train/lr": scheduler.get_last_lr()[0], "train/images_per_s": speed})
                    bar.set_postfix({k[len("train/loss_"):]: f"{v:.3f}" for k, v in logs.items()
                                     if k.startswith("train/loss")} | {"img/s": f"{speed:.1f}"})
                    accelerator.log(logs, step=state["global_step"])
                    tic, tic_step, running = time.perf_counter(), step, None
                if eval_every and (step % eval_every == 0 or step == total):
                    model.eval()
                    metrics = task.validate(model, val_loader, accelerator, run.get("eval_batches"))
                    model.train()
                    accelerator.log(metrics, step=state["global_step"])
                    if accelerator.is_main_process:
                        bar.write(f"stage {stage_index + 1} step {step}: " +
                                  ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items()))
                if ckpt_every and step % ckpt_every == 0:
                    save_checkpoint(accelerator, output_dir, state, keep)
                if stop_after and state["global_step"] >= stop_after:
                    bar.close()
                    save_checkpoint(accelerator, output_dir, state, keep)
                    logger.info("stopped after %d steps (training.stop_after_steps)", state["global_step"])
                    accelerator.end_training()
                    return output_dir
                if step >= total:
                    break
        bar.close()
        state.update(stage=stage_index + 1, step_in_stage=0)

    if state["skipped_images"]:
        logger.warning("skipped %d unreadable images during training (data.on_error=skip)", state["skipped_images"])
    check_replicas(accelerator, model, output_dir)
    save_final(accelerator, model, processor, output_dir, bool(lora.get("enabled")))
    accelerator.end_training()
    return output_dir


def check_replicas(accelerator, model, output_dir: Path) -> None:
    """Data-parallel replicas must end with identical weights: compare per-process checksums, fail loudly if not.

    Writes `replica_checksums.json` (one float64 checksum per process). Skipped under DeepSpeed ZeRO-3, where
    each process holds only a shard.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        return
    with torch.no_grad():
        checksum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for index, param in enumerate(p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad):
            checksum += (param.double().flatten() * (index + 1)).sum()  # position-weighted: swaps are caught too
    sums = accelerator.gather(checksum[None]).tolist()
    if accelerator.is_main_process:
        (output_dir / "replica_checksums.json").write_text(json.dumps(sums))
    if max(sums) - min(sums) > 1e-9 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"data-parallel replicas diverged: parameter checksums {sums}")


def save_final(accelerator, model, processor, output_dir: Path, lora: bool) -> None:
    """`model/`: a plain checkpoint (LoRA merged in); `adapter/`: the LoRA adapters on their own."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process must call it
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    if lora:
        model.save_pretrained(str(output_dir / "adapter"))
        model = copy.deepcopy(model).merge_and_unload()
        state_dict = None
    model.save_pretrained(str(output_dir / "model"), state_dict=state_dict)
    processor.save_pretrained(str(output_dir / "model"))
    logger.info("saved model + processor to %s", output_dir / "model")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configuration" / "train" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.batch_size=16 --set stages.2.steps=100")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (output_dir/checkpoints/step_N)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    train(cfg, args.resume)


if __name__ == "__main__":
    main()

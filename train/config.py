"""The training config: typed sections with every default in one place, read from YAML plus `--set` overrides.

    config = load_config("configuration/train/quickstart.yaml", ["training.batch_size=16", "stages.2.steps=100"])
    config.training.batch_size            # 16

A key that does not exist anywhere (a typo in the YAML or in `--set`) is an error naming the closest valid key,
so a misspelled setting never silently falls back to its default. `model:` holds `AnatomyVLMConfig` arguments
(checked against its signature) for the pre-training task, and the encoder + decoder settings for segmentation.
Relative paths inside a config are relative to the repository root, wherever the command is started; the config
file itself is looked for where the command is started, then in the repository.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modeling_anatomy_vlm.modeling_anatomy_vlm import LOSS_TERMS as LOSSES  # the stage YAML weights these

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configuration" / "train" / "quickstart.yaml"
TASK_NAMES = ("anatomy_vlm", "segmentation")
PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")  # training.mixed_precision; fp32 is "no" (no mixed precision)


class ConfigError(ValueError):
    """A config value or key that is wrong; the message names the key (e.g. `training.batch_size`)."""


def resolve_path(path) -> Path:
    """A config path: absolute as given, else relative to the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class PhantomSpec:
    """Generate the phantom set at `data.root` before training (kept when an identical complete set exists)."""

    n: int
    seed: int = 0
    size: int = 512
    workers: int = 1


@dataclass
class DataConfig:
    dataset: str = "imagenome"           # a name in train.data.registry (imagenome, phantom, chexmask, siim)
    root: str | None = None              # imagenome / phantom: the MIMIC-CXR-JPG + Chest ImaGenome root
    phantom: PhantomSpec | None = None   # generate a phantom set into `root` first
    train_split: str = "train"
    val_split: str = "validate"
    max_images: int | None = None        # per split, for smoke runs
    num_workers: int = 0                 # DataLoader worker processes
    index_workers: int = 1               # processes that index scene graphs into Arrow
    on_error: str = "skip"               # skip (count + log) or raise on unreadable images and bad index rows
    perturb_prob: float = 0.2            # label generation rule 2: a positive phrase becomes a hard negative
    unmentioned_as_negative: bool = True  # a finding the report never mentions counts as absent
    text_cache_dtype: str = "float32"    # float16 halves the text cache on disk (MIMIC: millions of phrases)
    prepared_dir: str | None = None      # image shards of `python -m train.data.prepare`; images it lacks are decoded
    csv: str | None = None               # chexmask / siim: the mask table
    mimic_cxr_jpg_dir: str | None = None  # chexmask: where the MIMIC-CXR-JPG images are
    chexmask_min_quality: float | None = 0.7  # chexmask: Dice RCA (Mean) >= this, as its authors advise; null: all
    images_dir: str | None = None        # siim: the DICOM folder
    val_fraction: float = 0.1            # siim has no official split: this share of images validates
    # Findings withheld from training to measure zero-shot transfer to a new finding: not among the model's findings,
    # and every report phrase naming them (or a synonym) is left out of the training texts; their labels still
    # count (a region with one is not "normal"). Evaluation scores them by name (`global_auc_macro_unseen_findings`).
    unseen_findings: list[str] = field(default_factory=list)


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/run"
    batch_size: int = 32                 # per process
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"        # auto (bf16 where the hardware has it natively) | no (fp32) | bf16 | fp16
    cpu: bool = False                    # force the CPU even where a GPU is present
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    min_lr_ratio: float = 0.05           # cosine floor as a fraction of each stage's lr
    seed: int = 0
    log_with: str | None = "tensorboard"
    log_every: int = 10
    eval_every: int = 0                  # 0: no validation during training
    eval_batches: int | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    stop_after_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    gradient_checkpointing: bool = False
    compile: bool = False                # torch.compile the forward + loss of a step (dynamic shapes: texts vary)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class StageConfig:
    name: str
    steps: int
    lr: float
    warmup_steps: int = 0
    loss_weights: dict[str, float] = field(default_factory=dict)  # of LOSSES; a missing term has weight 0
    frozen: list[str] = field(default_factory=list)               # parameter-name prefixes kept fixed this stage
    # Each image swapped for another of its batch (boxes, labels and texts stay): the losses see pixels unrelated to
    # their targets. The ablation's image-blind floor: what the objectives reach from text and priors alone.
    shuffle_images: bool = False

    def weights(self) -> dict[str, float]:
        return {name: float(self.loss_weights.get(name, 0.0)) for name in LOSSES}


@dataclass
class SegmentationModelConfig:
    init_from: str                       # an Anatomy-VLM checkpoint folder
    labels: list[str]                    # mask classes
    mode: str = "frozen"                 # frozen (decoder only) | full | lora (training.lora)
    encoder_lr_scale: float = 1.0        # full / lora: the encoder's share of each stage's lr


@dataclass
class RunConfig:
    task: str = "anatomy_vlm"
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    stages: list[StageConfig] = field(default_factory=list)

    # ------------------------------------------------------------------ the model section, per task
    # Training-side keys of `model:` for the pre-training task; everything else is an AnatomyVLMConfig argument.
    MODEL_TRAINING_KEYS = {"vision_init": None, "encoder_lr_scale": 1.0}

    def model_config(self):
        """The `AnatomyVLMConfig` this run trains (pre-training task)."""
        from modeling_anatomy_vlm import AnatomyVLMConfig

        kwargs = {k: v for k, v in self.model.items() if k not in self.MODEL_TRAINING_KEYS}
        if self.data.unseen_findings:
            findings = kwargs.get("findings") or AnatomyVLMConfig().findings
            kwargs["findings"] = [f for f in findings if f not in set(self.data.unseen_findings)]
        return AnatomyVLMConfig(**kwargs)

    def model_setting(self, key: str):
        return self.model.get(key, self.MODEL_TRAINING_KEYS[key])

    def segmentation_model(self) -> SegmentationModelConfig:
        return _build(SegmentationModelConfig, self.model, "model")

    def to_dict(self) -> dict:
        """Plain YAML/JSON types only (tuples as lists): what `train_config.yaml` holds."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> None:
        if self.task not in TASK_NAMES:
            raise ConfigError(f"task: must be one of {TASK_NAMES}, got {self.task!r}")
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        for index, stage in enumerate(self.stages):
            where = f"stages.{index} ({stage.name!r})"
            unknown = set(stage.loss_weights) - set(LOSSES)
            if unknown:
                name = sorted(unknown)[0]
                raise ConfigError(f"{where}.loss_weights.{name}: unknown loss{_did_you_mean(name, LOSSES)}; "
                                  f"the losses are {', '.join(LOSSES)}")
            if stage.steps <= 0:
                raise ConfigError(f"{where}.steps: must be positive, got {stage.steps}")
            if stage.shuffle_images and self.task != "anatomy_vlm":
                raise ConfigError(f"{where}.shuffle_images: only the anatomy_vlm task has it")
            if stage.warmup_steps < 0 or stage.lr <= 0:
                raise ConfigError(f"{where}: lr must be positive and warmup_steps >= 0")
        if self.training.batch_size <= 0 or self.training.gradient_accumulation_steps <= 0:
            raise ConfigError("training.batch_size and training.gradient_accumulation_steps: must be positive")
        if self.training.mixed_precision not in PRECISIONS:
            raise ConfigError(f"training.mixed_precision: must be one of {', '.join(PRECISIONS)}, got "
                              f"{self.training.mixed_precision!r}")
        if self.task == "segmentation" and self.data.prepared_dir is not None:
            raise ConfigError("data.prepared_dir: the segmentation task reads the image files (its masks are drawn at "
                              "the original size); leave it out")
        if self.data.on_error not in ("skip", "raise"):
            raise ConfigError(f"data.on_error: must be skip or raise, got {self.data.on_error!r}")
        if self.data.text_cache_dtype not in ("float32", "float16"):
            raise ConfigError(f"data.text_cache_dtype: must be float32 or float16, got {self.data.text_cache_dtype!r}")
        if len(set(self.data.unseen_findings)) != len(self.data.unseen_findings) or not all(
                isinstance(f, str) and f.strip() for f in self.data.unseen_findings):
            raise ConfigError(f"data.unseen_findings: must be distinct, non-empty finding names, got "
                              f"{self.data.unseen_findings!r}")
        if not 0.0 <= self.data.perturb_prob <= 1.0:
            raise ConfigError(f"data.perturb_prob: must be in [0, 1], got {self.data.perturb_prob}")
        if self.task == "anatomy_vlm":
            from modeling_anatomy_vlm import AnatomyVLMConfig

            valid = set(inspect.signature(AnatomyVLMConfig.__init__).parameters) - {"self", "kwargs"}
            valid |= set(self.MODEL_TRAINING_KEYS)
            for key in self.model:
                if key not in valid:
                    raise ConfigError(f"model.{key}: unknown key{_did_you_mean(key, valid, 'model.')}")
        else:
            seg = self.segmentation_model()
            if seg.mode not in ("frozen", "full", "lora"):
                raise ConfigError(f"model.mode: must be frozen, full or lora, got {seg.mode!r}")


# -------------------------------------------------------------------------------------------------- reading
def _did_you_mean(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _convert(tp, value, where: str):
    """`value` as type `tp` (a dataclass, list, dict, tuple, Optional, or a scalar), or a ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: (v if args[1] is Any else _convert(args[1], v, f"{where}.{k}")) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value) if not isinstance(value, bool) else _fail(where, "a number", value)
        except (TypeError, ValueError):
            _fail(where, "a number", value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        hint = " (YAML reads a bare no / yes / off / on as a boolean: quote it)" if isinstance(value, bool) else ""
        raise ConfigError(f"{where}: expected a string, got {value!r}{hint}")
    return value


def _fail(where: str, expected: str, value):
    raise ConfigError(f"{where}: expected {expected}, got {value!r}")


def _build(cls, raw: dict, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"{path}: unknown key{_did_you_mean(key, fields, f'{where}.' if where else '')}")
        kwargs[key] = _convert(hints[key], value, path)
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where + '.' if where else ''}{missing[0]}: required")
    return cls(**kwargs)


def from_dict(raw: dict) -> RunConfig:
    """A validated `RunConfig` from a plain dict (the YAML's structure)."""
    if isinstance(raw, RunConfig):
        raw.validate()
        return raw
    config = _build(RunConfig, raw, "")
    config.validate()
    return config


def apply_overrides(raw: dict, overrides) -> dict:
    """`--set a.b=value` (value parsed as YAML: numbers, lists, null...); list items by index (`stages.2.steps`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node, parts = raw, key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} has {len(node)} items, no {part!r}")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is not a section")
            if last:
                node[part] = yaml.safe_load(value)
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
    return raw


def load_config(path=DEFAULT_CONFIG, overrides=()) -> RunConfig:
    """Read a YAML training config, apply `--set` overrides, check every key and value."""
    given = Path(path).expanduser()
    path = given if given.is_file() or given.is_absolute() else REPO_ROOT / given  # as typed, else in the repo
    if not path.is_file():
        raise ConfigError(f"config file not found: {given} (looked in {Path.cwd()} and {REPO_ROOT})")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return from_dict(apply_overrides(raw, overrides))

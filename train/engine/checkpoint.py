"""Training checkpoints (resume) and the final model folder.

A checkpoint is written whole or not at all: Accelerate writes every file into `checkpoints/step_N.partial/`,
`trainer_state.json` goes in last, the files are flushed to disk, and only then is the folder renamed to `step_N`.
A run killed at any point leaves complete `step_N` folders and perhaps an unfinished `.partial` one, which the next
save removes. A `step_N` whose `trainer_state.json` does not parse (damaged after the fact) is incomplete: `--resume
latest` warns and takes the newest complete one before it.

Frozen parameters (`requires_grad=False`: the text tower, a LoRA base, a frozen segmentation encoder) never change
during training, so checkpoints leave them out and a resumed run keeps the ones its freshly built model has. A
fingerprint of them in `frozen_weights.json` makes resuming with other frozen weights (another text encoder) an
error instead of a silently different model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

logger = logging.getLogger("anatomy_vlm.train")
STATE_FILE = "trainer_state.json"  # written last: a checkpoint whose state parses is complete
FROZEN_FILE = "frozen_weights.json"
PARTIAL = ".partial"  # suffix of a folder still being written
REPLACED = ".replaced"  # suffix of a checkpoint being replaced by a newer write of the same step
STEP_FOLDER = re.compile(r"step_(\d+)")
STATE_KEYS = ("stage", "step_in_stage", "global_step")


class IncompleteCheckpoint(FileNotFoundError):
    """A checkpoint folder without a readable `trainer_state.json`."""


def read_state(folder: Path) -> dict:
    """The trainer state of a checkpoint; `IncompleteCheckpoint` naming the folder and the problem otherwise."""
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{folder}: not a complete checkpoint (no {STATE_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IncompleteCheckpoint(f"{folder}: not a complete checkpoint ({STATE_FILE} unreadable: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(key), int) for key in STATE_KEYS):
        raise IncompleteCheckpoint(f"{folder}: not a complete checkpoint ({STATE_FILE} lacks {', '.join(STATE_KEYS)})")
    return state


def _step_folders(output_dir: Path) -> list[Path]:
    """`output_dir/checkpoints/step_N` folders, oldest first (`.partial` and `.replaced` ones left out)."""
    folders = [p for p in (Path(output_dir) / "checkpoints").glob("step_*") if STEP_FOLDER.fullmatch(p.name)]
    return sorted(folders, key=lambda p: int(STEP_FOLDER.fullmatch(p.name)[1]))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first."""
    complete = []
    for folder in _step_folders(output_dir):
        try:
            read_state(folder)
        except IncompleteCheckpoint:
            continue
        complete.append(folder)
    return complete


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; each newer incomplete one is skipped with a warning."""
    for folder in reversed(_step_folders(output_dir)):
        try:
            read_state(folder)
            return folder
        except IncompleteCheckpoint as err:
            logger.warning("skipping %s", err)
    return None


def trained_with(output_dir: Path, cfg: dict) -> bool:
    """Whether the run in `output_dir` was started with the config `cfg` (its dict form): the loop saves it as
    `train_config.yaml`, and outputs of another config must not be reused or resumed."""
    saved = Path(output_dir) / "train_config.yaml"
    return saved.is_file() and yaml.safe_load(saved.read_text()) == cfg


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so a rename after it never publishes unwritten data."""
    for parent, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(parent) / name)
        _fsync(Path(parent))


def _publish(partial: Path, folder: Path) -> None:
    """Rename a fully written `partial` folder to `folder`. An existing `folder` (the same step written again after
    resuming from an earlier checkpoint) is moved aside first and removed after; a kill between the two renames
    loses this step only, as `.replaced` and `.partial` folders that the next save removes."""
    _fsync_tree(partial)
    replaced = folder.with_name(folder.name + REPLACED)
    if folder.exists():
        folder.rename(replaced)
    partial.rename(folder)
    _fsync(folder.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> None:
    """Write `checkpoints/step_{global_step}` atomically (every process must call it); keep the newest `keep`."""
    checkpoints = Path(output_dir) / "checkpoints"
    folder = checkpoints / f"step_{state['global_step']}"
    partial = folder.with_name(folder.name + PARTIAL)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing this step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
        _publish(partial, folder)
        stale = [p for p in checkpoints.iterdir() if p.name.endswith((PARTIAL, REPLACED))]
        for old in stale + (complete_checkpoints(output_dir)[:-keep] if keep > 0 else []):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, output_dir: Path, resume: str) -> tuple[Path, dict]:
    """Restore `resume` ("latest" or a checkpoint folder) into the accelerator; returns the folder and trainer state."""
    if resume == "latest":
        folder = latest_checkpoint(output_dir)
        if folder is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {Path(output_dir) / 'checkpoints'}")
    else:
        folder = Path(resume)
    state = read_state(folder)
    accelerator.load_state(str(folder))
    return folder, state


def _frozen(module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _fingerprint(tensors: dict[str, torch.Tensor]) -> dict:
    """Count and SHA-256 of names, dtypes, shapes and bytes: equal exactly when the tensors are."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"parameters": len(tensors), "sha256": digest.hexdigest()}


def leave_frozen_weights_out(accelerator, model) -> None:
    """Make `accelerator.save_state` / `load_state` skip `model`'s frozen parameters (see the module docstring).

    Call once, after `accelerator.prepare`, with the prepared model. Under DeepSpeed and FSDP the engine writes the
    model itself, whole: checkpoints there keep the frozen weights, as before.
    """
    from accelerate.utils import SAFE_MODEL_NAME, DistributedType
    from safetensors.torch import load_file

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        logger.info("%s writes the whole model into checkpoints, frozen weights included",
                    accelerator.distributed_type.value)
        return
    target = accelerator.unwrap_model(model)
    frozen_names = set(_frozen(target))  # without a wrapper's prefix (DDP's `module.`)
    record = _fingerprint(_frozen(target))

    def find(models) -> int | None:  # Accelerate keeps the model wrapped (DDP on GPUs) or not (on CPUs)
        return next((i for i, candidate in enumerate(models) if accelerator.unwrap_model(candidate) is target), None)

    def save_hook(models, weights, output_dir):
        index = find(models)
        if index is None:
            return
        if set(_frozen(target)) != frozen_names:
            raise RuntimeError("the set of frozen parameters changed since training started; a checkpoint would "
                               "lose the weights of those unfrozen")
        left_out = _frozen(models[index])
        weights[index] = {name: value for name, value in weights[index].items() if name not in left_out}
        if accelerator.is_main_process:
            (Path(output_dir) / FROZEN_FILE).write_text(json.dumps(record))

    def load_hook(models, input_dir):
        index = find(models)
        record_path = Path(input_dir) / FROZEN_FILE
        if index is None or not record_path.is_file():  # a checkpoint holding every weight: Accelerate loads it
            return
        if len(models) > 1:  # Accelerate numbers the weight files of the models it still loads by list position
            raise NotImplementedError("frozen weights are left out of checkpoints for one prepared model only")
        saved, current = json.loads(record_path.read_text()), _fingerprint(_frozen(target))
        if saved != current:
            raise ValueError(
                f"{input_dir}: this checkpoint was trained with other frozen weights ({saved['parameters']} "
                f"parameters, fingerprint {saved['sha256'][:12]}) than the model has now ({current['parameters']}, "
                f"{current['sha256'][:12]}): resume with the config (text encoder, vision_init, LoRA) it was "
                "trained with")
        weights_file = Path(input_dir) / f"{SAFE_MODEL_NAME}.safetensors"  # the name of the first (only) model's
        missing, unexpected = models[index].load_state_dict(load_file(str(weights_file)), strict=False)
        left_out = set(_frozen(models[index]))
        if unexpected or set(missing) != left_out:
            raise ValueError(f"{weights_file}: does not match the model: missing "
                             f"{sorted(set(missing) - left_out)[:5]}, unexpected {unexpected[:5]}")
        models.pop(index)  # loaded here: Accelerate goes on with the optimizer, schedule and RNG states

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


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
        (Path(output_dir) / "replica_checksums.json").write_text(json.dumps(sums))
    if max(sums) - min(sums) > 1e-9 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"data-parallel replicas diverged: parameter checksums {sums}")


def save_final(accelerator, model, processor, output_dir: Path, lora: bool) -> None:
    """`model/`: a plain checkpoint (LoRA merged in) with its default findings' prompt embeddings precomputed
    (`prompt_embeds.safetensors`, so its first `interpret` runs no text tower); `adapter/`: the LoRA adapters on their own.

    Each folder is written under a `.partial` name and renamed when complete, so a `model/` is never half written.
    """
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process must call it
    if not accelerator.is_main_process:
        return
    output_dir = Path(output_dir)
    model = accelerator.unwrap_model(model)
    if lora:
        _save_folder(output_dir / "adapter", model.save_pretrained)
        model = copy.deepcopy(model).merge_and_unload()
        state_dict = None

    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin
    sharded = accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)

    def save_model(folder: str) -> None:
        model.save_pretrained(folder, state_dict=state_dict)
        processor.save_pretrained(folder)
        if not hasattr(model, "save_prompt_embeds"):  # a model without zero-shot prompts (segmentation)
            return
        if sharded:  # this process holds a shard of the text tower only
            logger.info("prompt embeddings not precomputed under sharded training: the first interpret embeds them")
            return
        model.save_prompt_embeds(folder, processor, _text_cache_outputs(output_dir / "text_cache", model))

    _save_folder(output_dir / "model", save_model)
    logger.info("saved model + processor to %s", output_dir / "model")


def _text_cache_outputs(path: Path, model) -> dict[str, torch.Tensor]:
    """The run's text-cache vectors of `model`'s default prompts, so writing `prompt_embeds.safetensors` runs no text
    tower; none when the cache is float16 (the file holds exact float32 outputs) or was made by another encoder.
    `path` is where `AnatomyVLMTask` keeps the cache."""
    from train.text.cache import TextEmbeddingCache, encoder_fingerprint
    from train.text.region_texts import normalize_text

    try:
        cache = TextEmbeddingCache.open(path)
    except FileNotFoundError:
        return {}
    if cache.dtype != "float32" or cache.fingerprint != encoder_fingerprint(model):
        return {}
    prompts = dict.fromkeys(text for group in model.prompt_groups(model.config.findings) for text in group)
    texts = [text for text in prompts if normalize_text(text) == text and text in cache]  # the cache's own keys
    return dict(zip(texts, cache.lookup(texts))) if texts else {}


def _save_folder(folder: Path, write) -> None:
    partial = folder.with_name(folder.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    write(str(partial))
    _publish(partial, folder)

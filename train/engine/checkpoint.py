"""Training checkpoints (resume) and the final model folder."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch

logger = logging.getLogger("anatomy_vlm.train")
STATE_FILE = "trainer_state.json"  # written last: its presence marks a checkpoint complete


def _step_of(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first."""
    folders = [p for p in (Path(output_dir) / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(folders, key=_step_of)


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> None:
    folder = Path(output_dir) / "checkpoints" / f"step_{state['global_step']}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, output_dir: Path, resume: str) -> tuple[Path, dict]:
    """Restore `resume` ("latest" or a checkpoint folder) into the accelerator; returns the folder and trainer state."""
    folder = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if folder is None:
        raise FileNotFoundError(f"--resume latest: no complete checkpoint under {Path(output_dir) / 'checkpoints'}")
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {folder}: not a complete checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(folder))
    return folder, json.loads((folder / STATE_FILE).read_text())


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
    """`model/`: a plain checkpoint (LoRA merged in); `adapter/`: the LoRA adapters on their own."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process must call it
    if not accelerator.is_main_process:
        return
    output_dir = Path(output_dir)
    model = accelerator.unwrap_model(model)
    if lora:
        model.save_pretrained(str(output_dir / "adapter"))
        model = copy.deepcopy(model).merge_and_unload()
        state_dict = None
    model.save_pretrained(str(output_dir / "model"), state_dict=state_dict)
    processor.save_pretrained(str(output_dir / "model"))
    logger.info("saved model + processor to %s", output_dir / "model")

"""The staged training loop on Accelerate: one CPU, one GPU, many GPUs, DeepSpeed.

Stages (PAPER.md): each stage has its own length, learning rate, loss weights and frozen parameters, and its own
warmup + cosine schedule; the weights carry over from one stage to the next. What is trained and on which data
is the task's business (`train.tasks`); this loop owns the optimiser, precision, checkpoints and logging.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from train.config import RunConfig, from_dict, resolve_path
from train.engine.checkpoint import (
    check_replicas, leave_frozen_weights_out, load_checkpoint, save_checkpoint, save_final,
)
from train.engine.optim import frozen_parameters, param_groups, staged_schedule
from train.engine.precision import resolve_mixed_precision

logger = logging.getLogger("anatomy_vlm.train")


class EpochOrder(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch): the data order is a pure function of the epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self):
        return self.n


def stage_step(model, task, weights: dict, compile: bool = False):
    """`batch -> (loss, parts)`: a stage's forward and weighted loss; with `compile`, through `torch.compile`
    (dynamic shapes: the number of texts changes from batch to batch)."""
    def forward_loss(batch):
        output = model(**task.inputs(batch, weights))
        return task.loss(output, weights)

    return torch.compile(forward_loss, dynamic=True) if compile else forward_loss


def train(config: RunConfig | dict, resume: str | None = None) -> Path:
    """Train every stage of `config` (a `RunConfig`, or its dict form); returns the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm import tqdm

    from train.tasks import make_task

    config = from_dict(config)
    run = config.training
    output_dir = resolve_path(run.output_dir)
    on_cpu = run.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(run.mixed_precision, on_cpu),
        log_with=run.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # Stage 1 leaves the text projection and temperatures unused: DDP must not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # Without a GPU, processes launched by torchrun (`accelerate launch --multi_gpu`) join a gloo CPU group.
        cpu=on_cpu,
        # Batches come from pinned memory (below): their copies to the GPU need not block the host.
        dataloader_config=DataLoaderConfiguration(non_blocking=not on_cpu),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_seed(run.seed)

    task = make_task(config, accelerator, output_dir)
    model, processor = task.model, task.processor
    if run.gradient_checkpointing:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if run.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, task.lora_config(run.lora))
        for name, param in model.named_parameters():
            if "logit_" in name:  # temperatures and bias are bare parameters, not modules PEFT could save
                param.requires_grad_(True)

    train_set, val_set, collator = task.train_set, task.val_set, task.train_collator
    sampler = EpochOrder(len(train_set), run.seed)
    loading = dict(batch_size=run.batch_size, num_workers=config.data.num_workers, pin_memory=not on_cpu)
    train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, drop_last=True, collate_fn=collator,
                                               **loading)
    val_loader = torch.utils.data.DataLoader(val_set, collate_fn=task.val_collator, **loading)
    stages = config.stages
    groups = param_groups(model, run.weight_decay, task.encoder_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=1.0, betas=run.betas, fused=torch.cuda.is_available() or None)
    scheduler = staged_schedule(optimizer, stages, run.min_lr_ratio)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)
    task.after_prepare(accelerator)

    steps_per_epoch = len(train_loader) // accelerator.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {run.batch_size} per process")
    state = {"stage": 0, "step_in_stage": 0, "global_step": 0, "skipped_images": 0}
    leave_frozen_weights_out(accelerator, model)
    if resume:
        resume_dir, state = load_checkpoint(accelerator, output_dir, resume)
        logger.info("resumed from %s (stage %d, step %d)", resume_dir, state["stage"] + 1, state["step_in_stage"])

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if accelerator.log_with:
        flat = {f"{stage.name}/{k}": v for stage in stages for k, v in vars(stage).items()
                if k != "name" and isinstance(v, (int, float, str))}
        accelerator.init_trackers("anatomy_vlm", config={**flat, "batch_size": run.batch_size, "seed": run.seed})

    images_per_step = run.batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps
    # Every stage's `frozen` list is checked here, so a typo in a late stage fails before any training.
    named_parameters = dict(accelerator.unwrap_model(model).named_parameters())
    frozen_by_stage = [frozen_parameters(named_parameters, stage) for stage in stages]
    for stage, frozen in zip(stages, frozen_by_stage):
        if frozen and accelerator.state.deepspeed_plugin is not None:  # its engine keeps gradients out of reach
            raise ValueError(f"stage {stage.name!r}: `frozen` is not supported under DeepSpeed; "
                             "drop it from the stage or launch without DeepSpeed")
    for stage_index in range(state["stage"], len(stages)):
        stage, frozen = stages[stage_index], frozen_by_stage[stage_index]
        weights = task.start_stage(stage)
        forward_loss = stage_step(model, task, weights, run.compile)
        step = state["step_in_stage"] if stage_index == state["stage"] else 0
        bar = tqdm(total=stage.steps, initial=step, desc=f"stage {stage_index + 1} {stage.name}", unit="step",
                   disable=not accelerator.is_main_process, dynamic_ncols=True)
        model.train()
        tic, tic_step, running = time.perf_counter(), step, None
        while step < stage.steps:
            epoch, skip = divmod(step, steps_per_epoch)
            sampler.epoch = collator.epoch = stage_index * 100_000 + epoch  # collators sample texts per epoch
            batches = train_loader
            if skip:  # resuming inside an epoch: the same order, minus the batches already trained on
                batches = accelerator.skip_first_batches(train_loader, skip * accelerator.gradient_accumulation_steps)
            for batch in batches:
                state["skipped_images"] += batch["skipped_images"]
                if set(batch) == {"skipped_images"}:  # every image of this batch was unreadable (and skipped)
                    continue
                with accelerator.accumulate(model):
                    loss, parts = forward_loss(batch)
                    # One scalar read per step (a host-device sync on a GPU): a NaN or inf must stop the run
                    # before its gradients reach the weights, with the batch that produced it named.
                    if not torch.isfinite(loss.detach()).item():
                        raise FloatingPointError(
                            f"stage {stage_index + 1} ({stage.name}), step {step + 1}: loss is {loss.item()} "
                            f"({', '.join(f'{k} {v.item():.4g}' for k, v in parts.items())}); "
                            f"batch images: {batch.get('image_ids', 'not recorded')}")
                    accelerator.backward(loss)
                    for parameter in frozen:  # no gradient: AdamW neither steps nor decays them this stage
                        parameter.grad = None
                    if accelerator.sync_gradients and run.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
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
                if step % run.log_every == 0 or step == stage.steps:  # with the finite-loss check, the only syncs
                    n = step - tic_step
                    speed = n * images_per_step / (time.perf_counter() - tic)
                    logs = {f"train/loss_{k}": float(v) / n for k, v in running.items()}
                    logs.update({"train/lr": scheduler.get_last_lr()[0], "train/images_per_s": speed})
                    bar.set_postfix({k[len("train/loss_"):]: f"{v:.3f}" for k, v in logs.items()
                                     if k.startswith("train/loss")} | {"img/s": f"{speed:.1f}"})
                    accelerator.log(logs, step=state["global_step"])
                    tic, tic_step, running = time.perf_counter(), step, None
                if run.eval_every and (step % run.eval_every == 0 or step == stage.steps):
                    model.eval()
                    metrics = task.validate(model, val_loader, accelerator, run.eval_batches)
                    model.train()
                    accelerator.log(metrics, step=state["global_step"])
                    if accelerator.is_main_process:
                        bar.write(f"stage {stage_index + 1} step {step}: " +
                                  ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items()))
                if run.checkpoint_every and step % run.checkpoint_every == 0:
                    save_checkpoint(accelerator, output_dir, state, run.keep_checkpoints)
                if run.stop_after_steps and state["global_step"] >= run.stop_after_steps:
                    bar.close()
                    save_checkpoint(accelerator, output_dir, state, run.keep_checkpoints)
                    logger.info("stopped after %d steps (training.stop_after_steps)", state["global_step"])
                    accelerator.end_training()
                    return output_dir
                if step >= stage.steps:
                    break
        bar.close()
        state.update(stage=stage_index + 1, step_in_stage=0)

    if state["skipped_images"]:
        logger.warning("skipped %d unreadable images during training (data.on_error=skip)", state["skipped_images"])
    check_replicas(accelerator, model, output_dir)
    save_final(accelerator, model, processor, output_dir, run.lora.enabled)
    accelerator.end_training()
    return output_dir

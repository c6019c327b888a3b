"""AdamW parameter groups and the staged learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import torch

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


def staged_schedule(optimizer, stages, min_ratio: float):
    """One LambdaLR over all stages: per stage a linear warmup to its `lr`, then cosine down to `min_ratio * lr`.

    The optimizer is created with lr 1.0, so the factor is the learning rate itself. One optimizer and one
    schedule for the whole run keep `accelerator.prepare` (and DeepSpeed's engine) to a single call.
    `stages`: `StageConfig`s (or dicts with steps, lr, warmup_steps).
    """
    stages = [s if isinstance(s, dict) else {"steps": s.steps, "lr": s.lr, "warmup_steps": s.warmup_steps}
              for s in stages]
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


def frozen_parameters(named_parameters: dict, stage) -> list:
    """The parameters a stage keeps fixed: those whose names start with one of its `frozen` prefixes.

    Their gradients are dropped after each backward pass rather than switching `requires_grad`, so a model
    wrapped for data parallelism keeps the same set of gradients in every stage. A prefix that names no
    parameter is a config error.
    """
    frozen = []
    for prefix in stage.frozen:
        matched = [parameter for name, parameter in named_parameters.items() if name.startswith(prefix)]
        if not matched:
            raise ValueError(f"stage {stage.name!r}: frozen prefix {prefix!r} names no model parameter")
        frozen += matched
    return frozen

"""The training engine: loop, optimiser and schedule, checkpoints, precision."""

from train.engine.loop import train

__all__ = ["train"]

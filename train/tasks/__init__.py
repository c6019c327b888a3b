"""What is trained: each task builds its model, data and collators and defines its inputs, loss and validation.

A task is constructed as `Task(config, accelerator, output_dir)` and offers `model`, `processor`, `train_set`,
`val_set`, `train_collator`, `val_collator`, `encoder_lr_scale`, `lora_config(lora)`, `start_stage(stage)` (its
loss weights), `inputs(batch, weights)`, `loss(output, weights)` and `validate(model, loader, accelerator, n)`.
"""

from __future__ import annotations


def make_task(config, accelerator, output_dir):
    if config.task == "segmentation":
        from train.tasks.segmentation import SegmentationTask

        return SegmentationTask(config, accelerator, output_dir)
    from train.tasks.anatomy_vlm import AnatomyVLMTask

    return AnatomyVLMTask(config, accelerator, output_dir)

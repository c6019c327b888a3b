"""What a training batch costs before it reaches the device: collate time and host-to-device bytes, lean vs dense.

    python -m train.bench.collate                      # batch 256 at 224 px, the quickstart's phantom data
    python -m train.bench.collate --batch-size 64 --repeats 3 --text-cache-dtype float16

Builds the pre-training task of `--config` (phantom data generated if missing; the text cache in `--output-dir`,
kept for later runs) at `--image-size`, transforms `--batch-size` training images once, then times the collator
on them (median of `--repeats`) in two layouts:
  lean   what the trainer ships: pixels `[B, 1, S, S]` uint8, text embeddings in the cache's dtype, the phrase
         supervision as `RegionTextSupervision` arrays; `region_text_masks` builds the `[B, R, T]` masks on the device
         (timed separately, here on the CPU);
  dense  the layout before the lean step: pixels `[B, 3, S, S]` float32 normalised in the workers, float32 text
         embeddings, the positive and negative masks as dense `[B, R, T]` bools built in the workers.
Bytes are every tensor of the collated batch (what `accelerator.prepare`'s loader copies to the device each step).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from train.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from train.text.region_texts import collate_region_texts, region_text_masks


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a (nested) batch."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def dense_collate(collator, examples: list[dict]) -> dict:
    """The batch as the trainer built it before the lean step (see the module docstring) from examples whose
    ``pixel_values`` the workers normalised, as they did then."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
             "boxes": torch.stack([e["target_boxes"] for e in examples]),
             "box_mask": torch.stack([e["box_mask"] for e in examples]),
             "finding_labels": torch.tensor(np.array([e["global_labels"] for e in examples]), dtype=torch.float32),
             "region_labels": torch.tensor(np.array([e["region_labels"] for e in examples]), dtype=torch.float32)}
    texts, positive, negative = collate_region_texts(collator.region_texts(examples))
    batch["phrase_text_embeds"] = collator.cache.lookup(texts)
    batch["phrase_positive_mask"] = torch.from_numpy(positive)
    batch["phrase_negative_mask"] = torch.from_numpy(negative)
    return batch


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-cache-dtype", default="float16", choices=("float16", "float32"),
                        help="the lean batch ships embeddings in this dtype (float16: the MIMIC-scale setting)")
    parser.add_argument("--output-dir", default=str(REPO_ROOT / ".cache" / "bench_collate"))
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a data-loader worker's share of the machine

    from accelerate import Accelerator

    from train.tasks import make_task

    config = load_config(args.config, [f"model.vision_config.image_size={args.image_size}",
                                       f"data.text_cache_dtype={args.text_cache_dtype}"])
    task = make_task(config, Accelerator(cpu=True), Path(args.output_dir) / args.text_cache_dtype)
    collator, image_processor = task.train_collator, task.processor.image_processor
    if len(task.train_set) < args.batch_size:
        raise SystemExit(f"the training split has {len(task.train_set)} images, fewer than --batch-size")
    examples = [task.train_set[i] for i in range(args.batch_size)]
    dense_examples = [{**e, "pixel_values": image_processor.normalize_pixels(e["pixels"][None])[0]} for e in examples]

    lean = collator(examples)
    dense = dense_collate(collator, dense_examples)
    lean_s = median_seconds(lambda: collator(examples), args.repeats)
    dense_s = median_seconds(lambda: dense_collate(collator, dense_examples), args.repeats)
    masks_s = median_seconds(lambda: region_text_masks(**lean["phrase_supervision"]), args.repeats)
    positive, negative = region_text_masks(**lean["phrase_supervision"])
    if not (torch.equal(positive, dense["phrase_positive_mask"]) and torch.equal(negative, dense["phrase_negative_mask"])):
        raise AssertionError("the masks built from the lean batch differ from the dense ones")
    result = {
        "batch_size": args.batch_size, "image_size": args.image_size, "texts": int(dense["phrase_text_embeds"].shape[0]),
        "text_dim": int(dense["phrase_text_embeds"].shape[1]), "text_cache_dtype": args.text_cache_dtype,
        "dense_bytes": tensor_bytes(dense), "lean_bytes": tensor_bytes(lean),
        "dense_collate_ms": 1000 * dense_s, "lean_collate_ms": 1000 * lean_s, "masks_on_device_ms": 1000 * masks_s,
        "cpu": platform.processor() or platform.machine(),
    }
    print(f"{'layout':<6} {'MB/batch':>9} {'collate ms':>11}   parts (MB)")
    for name, batch, seconds in (("dense", dense, dense_s), ("lean", lean, lean_s)):
        parts = ", ".join(f"{k} {tensor_bytes(v) / 1e6:.2f}" for k, v in batch.items() if tensor_bytes(v))
        print(f"{name:<6} {tensor_bytes(batch) / 1e6:>9.1f} {1000 * seconds:>11.0f}   {parts}")
    print(f"collate: batch {args.batch_size} at {args.image_size} px, {result['texts']} texts: host-to-device "
          f"{result['dense_bytes'] / 1e6:.1f} MB -> {result['lean_bytes'] / 1e6:.1f} MB "
          f"({result['dense_bytes'] / result['lean_bytes']:.1f}x smaller, target >= 10x); collate "
          f"{result['dense_collate_ms']:.0f} -> {result['lean_collate_ms']:.0f} ms per batch on one thread; "
          f"masks built from the lean form in {result['masks_on_device_ms']:.1f} ms (here on the CPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

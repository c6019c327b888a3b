"""Training-step throughput: the full Anatomy-VLM stage-3 step against the bare ViT it is built on.

    python -m train.bench.step                                    # GPU: ViT-S/16 + ViT-B/16 at 224 + 448 px, batch 256
    python -m train.bench.step --configs vit-b16-224 --sync-debug --json bench.json
    python -m train.bench.step --device cpu --configs tiny:64:16:64:2:4 --no-compile

For each vision configuration, in one process, on one device and with one batch size, this times
  bare  `AnatomyVisionTransformer` ([CLS] + patches + 29 anatomy queries, the same blocks) with a linear
        classifier on [CLS] and cross-entropy: the cost of the ViT itself;
  full  the stage-3 step of `train/run.py`: `AnatomyVLMModel` with all three losses (detection, global,
        region-phrase InfoNCE against `--texts-per-image` x batch cached text-tower embeddings), with the
        inputs, stage-weighted loss sum and AdamW parameter groups of the trainer;
each eager and under `torch.compile` (the loss function is compiled; backward, gradient clipping and the
AdamW step run as in the trainer). Both use AdamW (fused on CUDA), gradient clipping at 1.0 and the precision
the trainer's `mixed_precision: auto` picks (`--precision`): bf16 autocast on CUDA and on CPUs with AVX512-BF16 or
AMX, else fp32. The batch is on the device before timing: the input pipeline is `train.bench.data`'s job.

FLOPs: counted once per model by `torch.utils.flop_counter.FlopCounterMode` over one eager forward + backward
(matmuls, convolutions and attention; element-wise work and the optimizer are not counted; gradient
checkpointing's recomputation is not counted, so TFLOP/s is model FLOP/s). `%peak` divides by a matmul
rate measured here in that precision: bf16 8192^3 products on CUDA, 1024^3 on CPU. Columns: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils import flop_counter


from modeling_anatomy_vlm import AnatomyVLMConfig, AnatomyVLMModel
from modeling_anatomy_vlm.modeling_anatomy_vlm import AnatomyVisionTransformer
from train.config import LOSSES
from train.engine.optim import param_groups
from train.engine.precision import resolve_mixed_precision

STAGE3_WEIGHTS = {name: 1.0 for name in LOSSES}  # every loss on: the most expensive stage
WEIGHT_DECAY, MAX_GRAD_NORM, LEARNING_RATE = 0.05, 1.0, 1e-4
BARE_CLASSES = 1000
GPU_DEFAULT_CONFIGS = "vit-s16-224,vit-s16-448,vit-b16-224,vit-b16-448"
CPU_DEFAULT_CONFIGS = "vit-s16-224"


@dataclass(frozen=True)
class VisionSpec:
    """A ViT size: `name:image_size:patch_size:hidden:layers:heads[:mlp]` (mlp defaults to 4 x hidden)."""

    name: str
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int

    @classmethod
    def parse(cls, text: str) -> VisionSpec:
        if text in PRESETS:
            return PRESETS[text]
        fields = text.split(":")
        try:
            name, *numbers = fields
            numbers = [int(v) for v in numbers]
            if len(numbers) == 5:
                numbers.append(4 * numbers[2])
            return cls(name, *numbers)
        except (TypeError, ValueError):
            raise ValueError(f"--configs: {text!r} is neither a preset ({', '.join(PRESETS)}) nor "
                             "name:image_size:patch_size:hidden:layers:heads[:mlp]") from None

    def vision_config(self) -> dict:
        return dict(model_type="vit", image_size=self.image_size, patch_size=self.patch_size,
                    hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_heads, intermediate_size=self.mlp_size)


PRESETS = {
    f"vit-{size}16-{px}": VisionSpec(f"vit-{size}16-{px}", px, 16, hidden, 12, heads, 4 * hidden)
    for size, hidden, heads in (("s", 384, 6), ("b", 768, 12))
    for px in (224, 448)
}


class BareViT(nn.Module):
    """The baseline: our vision tower (same tokens, same blocks) with a linear classifier on [CLS]."""

    def __init__(self, config: AnatomyVLMConfig, num_classes: int = BARE_CLASSES):
        super().__init__()
        self.vision_model = AnatomyVisionTransformer(config)
        self.head = nn.Linear(config.vision_config.hidden_size, num_classes)
        for param in (self.vision_model.embeddings.cls_token, self.vision_model.embeddings.position_embeddings,
                      self.vision_model.anatomy_queries.embeddings):
            nn.init.trunc_normal_(param, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision_model(pixel_values)[:, 0])  # [B, classes]


# ------------------------------------------------------------------------------------------------- inputs
def full_batch(config: AnatomyVLMConfig, batch_size: int, texts_per_image: int, generator: torch.Generator) -> dict:
    """A stage-3 batch as the trainer's `Collator` builds it, with random values of realistic shapes.

    Each image brings `texts_per_image` texts of its own (T = batch_size x texts_per_image after the collator's
    deduplication), each positive for one of its regions. The negative mask only needs a realistic density for
    timing (the step's cost does not depend on which cells are set): t is a negative of region r in every image
    when t is a positive of another region somewhere in the batch, never where it is a positive. Real batches
    decide negatives by contradiction (`train.text.region_texts.collate_region_texts`).
    """
    size, regions, findings = config.image_size, config.num_anatomy_queries, len(config.findings)
    text_hidden = config.text_config.hidden_size
    num_texts = batch_size * texts_per_image
    centres = 0.2 + 0.6 * torch.rand(batch_size, regions, 2, generator=generator)
    sizes = 0.05 + 0.35 * torch.rand(batch_size, regions, 2, generator=generator)
    text_image = torch.arange(num_texts) // texts_per_image  # [T]
    text_region = torch.randint(regions, (num_texts,), generator=generator)  # [T]
    positive = torch.zeros(batch_size, regions, num_texts, dtype=torch.bool)
    positive[text_image, text_region, torch.arange(num_texts)] = True
    region_positive = positive.any(0)  # [R, T]
    other_region = (region_positive.sum(0, keepdim=True) - region_positive.int()) > 0  # [R, T]
    return {
        "pixel_values": torch.randn(batch_size, config.vision_config.num_channels, size, size, generator=generator),
        "boxes": torch.cat([centres, sizes], dim=-1),
        "box_mask": torch.rand(batch_size, regions, generator=generator) > 0.05,  # a few regions unannotated
        "finding_labels": torch.randint(-1, 2, (batch_size, findings), generator=generator).float(),
        "finding_text_embeds": torch.randn(findings, text_hidden, generator=generator),
        "region_prompt_text_embeds": torch.randn(2, regions, findings, text_hidden, generator=generator),
        "region_labels": (torch.rand(batch_size, regions, findings, generator=generator) < 0.05).float(),
        "phrase_text_embeds": torch.randn(num_texts, text_hidden, generator=generator),
        "phrase_positive_mask": positive,
        "phrase_negative_mask": other_region[None] & ~positive,
    }


# ------------------------------------------------------------------------------------------------- steps
def full_loss_fn(model: AnatomyVLMModel, batch: dict, autocast):
    def loss_fn():
        with autocast():
            output = model(**batch)
            parts = {name: getattr(output, f"loss_{name}") for name in LOSSES}
            return sum(STAGE3_WEIGHTS[name] * value for name, value in parts.items()), parts

    return loss_fn


def bare_loss_fn(model: BareViT, batch: dict, autocast):
    pixel_values, labels = batch["pixel_values"], batch["labels"]

    def loss_fn():
        with autocast():
            loss = F.cross_entropy(model(pixel_values).float(), labels)
            return loss, {"classification": loss}

    return loss_fn


def make_step(loss_fn, model: nn.Module, optimizer: torch.optim.Optimizer):
    """One training step as in `train/run.py`: forward + losses, backward, clip, AdamW, zero grads.

    Nothing here reads a value back to the host: the losses come back as device tensors.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> dict:
        loss, losses = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {name: value.detach() for name, value in losses.items()}

    return step


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one SDPA dispatches to.
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(step, vision_model: AnatomyVisionTransformer) -> int:
    """FLOPs of one eager step's forward + backward, without gradient checkpointing's recomputation."""
    checkpointing, vision_model.gradient_checkpointing = vision_model.gradient_checkpointing, False
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
            step()
    finally:
        vision_model.gradient_checkpointing = checkpointing
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------- measuring
def pick_device(parser: argparse.ArgumentParser, choice: str) -> torch.device:
    """`--device auto|cpu|cuda` -> a device; asking for CUDA where there is none is a usage error."""
    if choice == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return torch.device(choice if choice != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> tuple[list[float], dict]:
    """Seconds of each of `steps` steps after `warmup` untimed ones; the host waits only before and after.

    On CUDA each step is bracketed by events recorded into the stream (no host wait between steps)."""
    losses = {}
    for _ in range(warmup):
        losses = step()
    synchronize(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for event in events[1:]:
            losses = step()
            event.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1000 for start, end in zip(events, events[1:])], losses
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses = step()
        times.append(time.perf_counter() - start)
    return times, losses


def matmul_peak(device: torch.device, bf16: bool, repeats: int = 10) -> tuple[float, str]:
    """Median TFLOP/s of square matrix products in the benchmark's precision: 8192^3 on CUDA, 1024^3 on CPU."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if bf16 else torch.float32
    pairs = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
             for _ in range(2)]  # alternate between two operand pairs
    for a, b in pairs * 5:  # warm-up (clocks, library handles)
        a @ b
    synchronize(device)
    times = []
    for i in range(repeats):
        a, b = pairs[i % 2]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12, f"{str(dtype).removeprefix('torch.')} {n}^3 matmul"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Bytes: the CUDA caching allocator's peak on GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def check_no_sync(step, device: torch.device) -> str:
    """Run one step with PyTorch's CUDA sync debugging set to raise: 'ok', or the error of the first sync.

    Catches the blocking syncs PyTorch itself issues: `.item()`, `.cpu()`, `.tolist()`, a tensor in an `if`,
    `nonzero` / boolean-mask indexing, blocking copies between host and device, stream or device synchronize
    called by an op. It does not see the driver's implicit syncs (cudaMalloc / cudaFree when the caching
    allocator grows, hence run after warm-up) nor CPU launch overhead that starves the GPU.
    """
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "ok"
    except RuntimeError as error:
        return f"sync: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        synchronize(device)


# ------------------------------------------------------------------------------------------------- driver
@dataclass
class Result:
    config: str
    image_size: int
    model: str  # "bare" or "full"
    compiled: bool
    batch_size: int
    images_per_s: float
    step_ms: float  # median
    step_ms_all: list[float]
    flops_per_step: int
    tflops: float
    peak_fraction: float
    peak_memory_bytes: int
    losses: dict[str, float]
    graph_breaks: int | None = None  # compiled only: dynamo graph breaks (0 = one graph per step)
    full_over_bare: float | None = None
    sync_check: str | None = None


def build(kind: str, config: AnatomyVLMConfig, args, device: torch.device, generator: torch.Generator):
    if kind == "full":
        model = AnatomyVLMModel(config)
        batch = full_batch(config, args.batch_size, args.texts_per_image, generator)
    else:
        model = BareViT(config)
        size = config.image_size
        batch = {"pixel_values": torch.randn(args.batch_size, 3, size, size, generator=generator),
                 "labels": torch.randint(BARE_CLASSES, (args.batch_size,), generator=generator)}
    model.to(device).train()
    model.vision_model.gradient_checkpointing = args.gradient_checkpointing
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LEARNING_RATE,
                                  fused=device.type == "cuda" or None)
    return model, batch, optimizer


def uses_bf16(device: torch.device, precision: str) -> bool:
    """--precision auto follows the trainer's `mixed_precision: auto` (`train.run.resolve_mixed_precision`)."""
    if precision == "auto":
        return resolve_mixed_precision("auto", on_cpu=device.type == "cpu") == "bf16"
    return precision == "bf16"


def autocast_for(device: torch.device, bf16: bool):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def benchmark_config(spec: VisionSpec, args, device: torch.device, bf16: bool, peak_tflops: float) -> list[Result]:
    config = AnatomyVLMConfig(vision_config=spec.vision_config(), projection_dim=512)
    autocast = autocast_for(device, bf16)
    results = []
    for kind in ("bare", "full"):
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model, batch, optimizer = build(kind, config, args, device, generator)
        loss_fn = (full_loss_fn if kind == "full" else bare_loss_fn)(model, batch, autocast)
        flops = count_flops(make_step(loss_fn, model, optimizer), model.vision_model)
        for compiled in (False, True) if args.compile else (False,):
            if compiled:
                torch._dynamo.reset()
                dynamo_counters.clear()
            step = make_step(torch.compile(loss_fn) if compiled else loss_fn, model, optimizer)
            reset_peak_memory(device)
            times, losses = time_steps(step, args.steps, max(args.warmup, 1 if compiled else 0), device)
            median = statistics.median(times)
            result = Result(
                config=spec.name, image_size=spec.image_size, model=kind, compiled=compiled, batch_size=args.batch_size,
                images_per_s=args.batch_size / median, step_ms=1000 * median, step_ms_all=[1000 * t for t in times],
                flops_per_step=flops, tflops=flops / median / 1e12, peak_fraction=flops / median / 1e12 / peak_tflops,
                peak_memory_bytes=peak_memory(device), losses={k: float(v) for k, v in losses.items()},
                graph_breaks=sum(dynamo_counters["graph_break"].values()) if compiled else None,
            )
            if args.sync_debug and device.type == "cuda":
                result.sync_check = check_no_sync(step, device)
            results.append(result)
            print(f"  {spec.name} {kind} {'compiled' if compiled else 'eager'}: {result.images_per_s:.1f} img/s",
                  flush=True)
        del model, batch, optimizer, loss_fn, step
        torch._dynamo.reset()  # compiled code holds on to the model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for full in (r for r in results if r.model == "full"):
        bare = next(r for r in results if r.model == "bare" and r.compiled == full.compiled)
        full.full_over_bare = full.images_per_s / bare.images_per_s
    return results


def format_table(results: list[Result], memory_label: str) -> str:
    header = (f"{'config':<14} {'model':<5} {'compile':<7} {'batch':>5} {'img/s':>9} {'step ms':>9} {'TFLOP/s':>8} "
              f"{'%peak':>6} {memory_label:>9} {'full/bare':>9} {'breaks':>6}  sync")
    lines = [header, "-" * len(header)]
    for r in results:
        ratio = f"{r.full_over_bare:.3f}" if r.full_over_bare is not None else "-"
        lines.append(
            f"{r.config:<14} {r.model:<5} {'yes' if r.compiled else 'no':<7} {r.batch_size:>5} {r.images_per_s:>9.1f} "
            f"{r.step_ms:>9.1f} {r.tflops:>8.3f} {100 * r.peak_fraction:>5.1f}% {r.peak_memory_bytes / 2**30:>9.2f} "
            f"{ratio:>9} {'-' if r.graph_breaks is None else r.graph_breaks:>6}  {r.sync_check or '-'}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated presets ({', '.join(PRESETS)}) or "
                             f"name:image:patch:hidden:layers:heads[:mlp] (default: {GPU_DEFAULT_CONFIGS} on GPU, "
                             f"{CPU_DEFAULT_CONFIGS} on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 8 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU; "
                                                                 "at least 1 when compiled)")
    parser.add_argument("--texts-per-image", type=int, default=40, help="phrase texts per image in the batch")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: after timing, run one step with torch.cuda.set_sync_debug_mode('error')")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="auto: the trainer's choice (bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = pick_device(parser, args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    configs = args.configs or (GPU_DEFAULT_CONFIGS if gpu else CPU_DEFAULT_CONFIGS)
    specs = [VisionSpec.parse(text.strip()) for text in configs.split(",")]
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, device, specs)
    finally:
        torch.set_num_threads(threads)


def run(args, device: torch.device, specs: list[VisionSpec]) -> dict:
    gpu = device.type == "cuda"
    if gpu:
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if args.sync_debug and not gpu:
        print("--sync-debug: CUDA only, skipped on CPU")

    bf16 = uses_bf16(device, args.precision)
    peak_tflops, peak_kind = matmul_peak(device, bf16)
    print(f"device {device} ({name}); torch {torch.__version__}; {'bf16 autocast' if bf16 else 'fp32'}; "
          f"measured peak {peak_tflops:.3f} TFLOP/s ({peak_kind}); batch {args.batch_size}, "
          f"{args.texts_per_image} texts/image, {args.warmup} warm-up + {args.steps} timed steps"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}", flush=True)
    results = [r for spec in specs for r in benchmark_config(spec, args, device, bf16, peak_tflops)]
    print(format_table(results, "GiB peak" if gpu else "GiB RSS"))
    report = {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "precision": "bf16" if bf16 else "fp32", "peak_tflops": peak_tflops, "peak_kind": peak_kind,
        "memory": "cuda max_memory_allocated" if gpu else "process peak RSS",
        "batch_size": args.batch_size, "texts_per_image": args.texts_per_image, "steps": args.steps,
        "warmup": args.warmup, "gradient_checkpointing": args.gradient_checkpointing,
        "results": [asdict(r) for r in results],
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

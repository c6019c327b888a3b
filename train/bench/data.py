"""Input-pipeline throughput: 1024 px chest X-ray JPEGs to normalised model batches on the device.

    python -m train.bench.data --workers 8,16 --against bench.json     # GPU machine, batch 256, 224 px
    python -m train.bench.data --device cpu --workers 0,1 --n 32 --batch-size 8 --batches 4

Writes `--n` phantom radiographs (`render_phantom`, long side `--source-size`) as JPEGs once into `--cache-dir`
(kept for later runs), then times batches of `pixel_values` `[B, 3, S, S]` ready on the device:
  loader-pil  torch DataLoader with K worker processes: PIL decode + `AnatomyVLMImageProcessor.resize_pad_uint8`
              (resize with the aspect kept, pad: the training path), `[B, 1, S, S]` uint8 pinned, copied to the
              device, normalised and repeated to 3 channels there (`normalize_pixels`);
  loader-tv   the same with `torchvision.io.decode_jpeg` on the CPU instead of PIL;
  nvjpeg      CUDA only: the workers only read the files' bytes; `decode_jpeg(device="cuda")` decodes the batch and
              resize + pad + normalise run on the GPU with the processor's geometry (`resize_pad_normalise`).
The timed batches cycle over the `--n` files, which are in the page cache after the first pass: this measures
decoding and resizing, not the disk. `--against` prints each variant's rate over the full train step's
images/s from a `train.bench.step --json` file (the issue asks for >= 1.5x the compiled step).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file


from modeling_anatomy_vlm import AnatomyVLMImageProcessor
from modeling_anatomy_vlm.image_processing_anatomy_vlm import load_grayscale
from train.bench.step import pick_device
from train.data.phantom import render_phantom
from train.config import REPO_ROOT

DEFAULT_CACHE = REPO_ROOT / ".cache" / "bench_data"
DECODERS = {"loader-pil": "pil", "loader-tv": "torchvision", "nvjpeg": None}  # variant -> decoder in the workers
JPEG_QUALITY = 92  # as the phantom data set
# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still are what this benchmark measures.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


# ------------------------------------------------------------------------------------------------- source files
def _write_jpeg(job: tuple[str, int, int, int]) -> None:
    path, index, seed, size = job
    partial = f"{path}.partial"
    Image.fromarray(render_phantom(index, seed, size).image, "L").save(partial, "JPEG", quality=JPEG_QUALITY)
    os.replace(partial, path)  # a file under its final name is complete


def jpeg_files(cache_dir: Path, n: int, source_size: int, seed: int, workers: int) -> list[Path]:
    """`n` phantom JPEGs with long side `source_size` under `cache_dir`; only missing ones are rendered."""
    folder = cache_dir / f"phantom-{source_size}px-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    jobs = [(str(p), i, seed, source_size) for i, p in enumerate(paths) if not p.exists()]
    if jobs:
        print(f"rendering {len(jobs)} {source_size} px phantom JPEGs into {folder} (once)", flush=True)
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                list(pool.map(_write_jpeg, jobs, chunksize=8))
        else:
            for job in jobs:
                _write_jpeg(job)
    return paths


# ------------------------------------------------------------------------------------------------- pipelines
class JpegDataset(torch.utils.data.Dataset):
    """Item i is file i mod n: `pixel_values` `[C, S, S]` after `decoder` ("pil" or "torchvision"), or the
    file's raw bytes (`decoder=None`, for decoding on the GPU)."""

    def __init__(self, paths: list[Path], length: int, processor: AnatomyVLMImageProcessor, decoder: str | None):
        self.paths, self.length, self.processor, self.decoder = [str(p) for p in paths], length, processor, decoder

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        """`[1, S, S]` uint8, resized and padded: what the trainer's workers send (normalised on the device)."""
        path = self.paths[index % len(self.paths)]
        if self.decoder is None:
            return read_file(path)
        if self.decoder == "pil":
            return self.processor.resize_pad_uint8(load_grayscale(path))
        gray = decode_jpeg(read_file(path), mode=ImageReadMode.GRAY)[0]  # [H, W] uint8
        return self.processor.resize_pad_uint8(gray)


def resize_pad_normalise(images: list[torch.Tensor], processor: AnatomyVLMImageProcessor) -> torch.Tensor:
    """Decoded uint8 `[1, H, W]` images (on any device) -> `pixel_values` `[B, C, S, S]` by the processor's own
    geometry (`resize_pad`, one resize per image: their aspect ratios differ) and `normalize_pixels`."""
    return processor.normalize_pixels(torch.stack([processor.resize_pad(image[0]) for image in images]))


def time_pipeline(loader, to_device_batch, warmup: int, batches: int, device: torch.device) -> float:
    """Images/s of `batches` batches after `warmup` ones.

    K workers start together and deliver their first K batches together: the warm-up must take all of them (and
    the timed part span several rounds of K), or those already-made batches would count as free throughput."""
    iterator = iter(loader)
    for _ in range(warmup):
        to_device_batch(next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(to_device_batch(next(iterator)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def run_variant(name: str, workers: int, warmup: int, batches: int, batch_size: int, paths, processor,
                device: torch.device) -> float:
    gpu_decode = DECODERS[name] is None
    dataset = JpegDataset(paths, (warmup + batches) * batch_size, processor, DECODERS[name])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
        pin_memory=device.type == "cuda" and not gpu_decode, collate_fn=list if gpu_decode else None,
    )
    if gpu_decode:
        def to_device_batch(raw: list[torch.Tensor]) -> torch.Tensor:
            return resize_pad_normalise(decode_jpeg(raw, mode=ImageReadMode.GRAY, device=device), processor)
    else:
        def to_device_batch(batch: torch.Tensor) -> torch.Tensor:
            return processor.normalize_pixels(batch.to(device, non_blocking=True))
    return time_pipeline(loader, to_device_batch, warmup, batches, device)


def step_rates(path: Path, image_size: int) -> list[tuple[str, float]]:
    """(label, images/s) of the full train steps at `image_size` in a `train.bench.step --json` report."""
    report = json.loads(path.read_text())
    rows = [r for r in report["results"] if r["model"] == "full" and r["image_size"] == image_size]
    return [(f"{r['config']} {'compiled' if r['compiled'] else 'eager'}", r["images_per_s"]) for r in rows]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--n", type=int, default=1024, help="distinct JPEG files")
    parser.add_argument("--source-size", type=int, default=1024, help="long side of the JPEGs in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="model input side S")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 8 on CPU")
    parser.add_argument("--workers", default=None, help="comma-separated DataLoader worker counts (default: CPU cores)")
    parser.add_argument("--variants", default=",".join(DECODERS))
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: workers + 1)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: max(8, 3 x workers))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    parser.add_argument("--against", type=Path, default=None, help="a train.bench.step --json report")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = pick_device(parser, args.device)
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 8)
    worker_counts = [int(k) for k in (args.workers or str(os.cpu_count() or 1)).split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = set(variants) - set(DECODERS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}")
    steps = step_rates(args.against, args.image_size) if args.against else []
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths = jpeg_files(args.cache_dir, args.n, args.source_size, args.seed, max(worker_counts + [1]))
        processor = AnatomyVLMImageProcessor(size=args.image_size)
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"device {device}; {args.n} JPEGs, long side {args.source_size} px, {mean_kb:.0f} KB mean -> "
              f"{args.image_size} px; batch {args.batch_size}", flush=True)
        results = []
        for name in variants:
            if name == "nvjpeg" and device.type != "cuda":
                print("nvjpeg: skipped, decoding on the GPU needs CUDA")
                continue
            for workers in worker_counts:
                warmup = args.warmup if args.warmup is not None else max(2, workers + 1)
                batches = args.batches if args.batches is not None else max(8, 3 * workers)
                rate = run_variant(name, workers, warmup, batches, args.batch_size, paths, processor, device)
                results.append({"variant": name, "workers": workers, "batch_size": args.batch_size,
                                "image_size": args.image_size, "warmup_batches": warmup, "timed_batches": batches,
                                "images_per_s": rate})
                print(f"  {name:<10} {workers:>3} workers: {rate:8.1f} images/s", flush=True)
    finally:
        torch.set_num_threads(threads)

    header = f"{'variant':<10} {'workers':>7} {'img/s':>9} {'ms/batch':>9}"
    header += "".join(f" {'/ ' + label:>22}" for label, _ in steps)
    print(header + "\n" + "-" * len(header))
    for r in results:
        ratios = "".join(f" {r['images_per_s'] / rate:>21.2f}x" for _, rate in steps)
        print(f"{r['variant']:<10} {r['workers']:>7} {r['images_per_s']:>9.1f} "
              f"{1000 * args.batch_size / r['images_per_s']:>9.1f}{ratios}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "n": args.n, "source_size": args.source_size,
                                         "results": results, "steps": dict(steps)}, indent=2))
    return results


if __name__ == "__main__":
    main()

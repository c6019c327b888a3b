"""Per-core cost of one training image: decoding a full-size MIMIC-CXR-JPG file vs reading the prepared store.

    python -m train.bench.decode [--n 8] [--size 224] [--cache-dir .cache/bench_decode] [--json PATH]

Writes `--n` synthetic radiographs of MIMIC-CXR-JPG's size and weight once into `--cache-dir` (kept for later runs):
3,000 x 2,500 px (height x width) 8-bit grayscale JPEGs, quality 95, drawn by `render_phantom` at 768 px, upscaled
(bicubic) and given film-grain-like noise (2-px grain plus pixel noise), so each is ~1.5 MB like a real file. Then,
in one process with `torch.set_num_threads(1)` (a DataLoader worker per core), times per image, each ending in a
`[1, S, S]` uint8 tensor (resized with the aspect kept, padded at the bottom and right):
  full         read the file, PIL full decode, `load_grayscale`, the processor's resize (bilinear, antialias) to
               long side S, rounded to uint8 (`train.data.prepare.decode_resized(..., draft=False)`);
  draft        the same with PIL draft mode (libjpeg DCT-domain 1/2, 1/4, 1/8 scaling to >= the target size);
  torchvision  `torchvision.io.decode_jpeg` (gray) + the same resize;
  shards       `PreparedImages.get` from a store `train.data.prepare` wrote at `--size` (draft mode): a stat of the
               source and a copy out of the memory-mapped shard.
Each variant runs `--repeats` passes over the files and reports the median pass (ms/img); the files and shards are
in the page cache, so this measures CPU, not the disk. Also reports how far draft-mode pixels are from full-decode
pixels after the resize (uint8 levels, mean abs and max over all pixels) and a 16-core projection (cores x per-core
rate, ignoring the memory bandwidth 16 readers share) against the 4,000 img/s a GPU training step needs.

Last line: decode: full .. ms/img, draft .., torchvision ..; shards .. ms/img -> ..x faster than full decode per
core; 16-core projection .. img/s at S px (target >= 4,000); draft vs full: mean .., max .. levels
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.config import REPO_ROOT
from train.data.phantom import render_phantom
from train.data.prepare import PreparedImages, decode_resized, prepare, resize_to_uint8, target_size

DEFAULT_CACHE = REPO_ROOT / ".cache" / "bench_decode"
HEIGHT, WIDTH = 3000, 2500  # a typical MIMIC-CXR-JPG PA film
QUALITY = 95
RENDER_SIZE = 768
CORES = 16
TARGET_IMAGES_PER_S = 4000
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


# ------------------------------------------------------------------------------------------------- source files
def synthetic_radiograph(index: int, seed: int = 0) -> np.ndarray:
    """uint8 `[3000, 2500]`: a phantom upscaled to MIMIC-CXR-JPG's size, with grain that gives ~1.5 MB at q95."""
    phantom = render_phantom(index, seed, RENDER_SIZE).image
    base = np.asarray(Image.fromarray(phantom, "L").resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.float32)
    rng = np.random.default_rng([seed, index])
    coarse = rng.standard_normal((HEIGHT // 2, WIDTH // 2), dtype=np.float32)
    coarse = np.asarray(Image.fromarray(coarse, "F").resize((WIDTH, HEIGHT), Image.BILINEAR))
    grain = 2.5 * coarse / coarse.std() + rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32)
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def source_files(cache_dir: Path, n: int) -> list[Path]:
    """`n` full-size JPEGs under `cache_dir`; only missing ones are written (complete files carry the final name)."""
    folder = Path(cache_dir) / f"mimic-like-{HEIGHT}x{WIDTH}-q{QUALITY}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        print(f"writing {len(missing)} synthetic {HEIGHT} x {WIDTH} px JPEGs into {folder} (once)", flush=True)
    for i, path in missing:
        partial = path.with_name(path.name + ".partial")
        Image.fromarray(synthetic_radiograph(i), "L").save(partial, "JPEG", quality=QUALITY)
        os.replace(partial, path)
    return paths


# ------------------------------------------------------------------------------------------------- variants
def pad(pixels: np.ndarray, size: int) -> torch.Tensor:
    """uint8 `[h, w]` -> `[1, size, size]` uint8, black at the bottom and right (the processor's padding)."""
    canvas = torch.zeros(1, size, size, dtype=torch.uint8)
    canvas[0, : pixels.shape[0], : pixels.shape[1]] = torch.from_numpy(pixels)
    return canvas


def pil_variant(size: int, draft: bool):
    def run(path: Path) -> torch.Tensor:
        return pad(decode_resized(path, path.read_bytes(), size, draft)[0], size)

    return run


def torchvision_variant(size: int):
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    def run(path: Path) -> torch.Tensor:
        gray = decode_jpeg(read_file(str(path)), mode=ImageReadMode.GRAY)[0]
        height, width = target_size(*gray.shape, size)
        return pad(resize_to_uint8(gray.float().div_(255.0).numpy(), height, width), size)

    return run


def shards_variant(store: PreparedImages, size: int):
    def run(path: Path) -> torch.Tensor:
        hit = store.get(path)
        if hit is None:
            raise RuntimeError(f"{path}: not served by the prepared store")
        return pad(hit[0], size)

    return run


def time_variant(run, paths: list[Path], repeats: int, passes_per_repeat: int = 1) -> tuple[float, list[float]]:
    """Median over `repeats` of the ms per image of `passes_per_repeat` passes over `paths` (after one warm-up)."""
    run(paths[0])
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes_per_repeat):
            for path in paths:
                run(path)
        timings.append(1000.0 * (time.perf_counter() - start) / (passes_per_repeat * len(paths)))
    return statistics.median(timings), timings


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8, help="full-size JPEGs to time (default %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="model input side S (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant; the median counts")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the JPEGs are kept")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    paths = source_files(args.cache_dir, args.n)
    mean_mb = float(np.mean([p.stat().st_size for p in paths])) / 1e6
    print(f"{args.n} synthetic JPEGs, {HEIGHT} x {WIDTH} px, quality {QUALITY}: mean file size {mean_mb:.2f} MB; "
          f"one thread; model input {args.size} px; CPU: {cpu_name()}", flush=True)

    # draft vs full pixels after the resize
    diffs = [np.abs(decode_resized(p, p.read_bytes(), args.size, True)[0].astype(np.int16)
                    - decode_resized(p, p.read_bytes(), args.size, False)[0]) for p in paths]
    draft_mean = float(np.mean([d.mean() for d in diffs]))
    draft_max = int(max(d.max() for d in diffs))

    results = {}
    for name, run in (("full", pil_variant(args.size, draft=False)), ("draft", pil_variant(args.size, draft=True)),
                      ("torchvision", torchvision_variant(args.size))):
        results[name] = time_variant(run, paths, args.repeats)
        print(f"  {name:<12} {results[name][0]:9.3f} ms/img", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        # the store's source folder: links to exactly these n files (the cache may hold more)
        source = Path(tmp) / "source"
        source.mkdir()
        for path in paths:
            (source / path.name).symlink_to(path.resolve())
        start = time.perf_counter()
        prepare(source, Path(tmp) / "prepared", size=args.size, num_proc=1, shard_size=max(1, args.n),
                progress=False)
        prepare_s = time.perf_counter() - start
        store = PreparedImages.open(Path(tmp) / "prepared")
        linked = [store.source_root / p.name for p in paths]
        passes = max(1, 2000 // len(linked))  # a read takes microseconds: enough of them to time
        results["shards"] = time_variant(shards_variant(store, args.size), linked, args.repeats, passes)
        print(f"  {'shards':<12} {results['shards'][0]:9.3f} ms/img  (prepare of the {args.n} files took "
              f"{prepare_s:.1f} s, one process)", flush=True)

    ms = {name: value[0] for name, value in results.items()}
    speedup = ms["full"] / ms["shards"]
    projection = CORES * 1000.0 / ms["shards"]
    print(f"\n{'variant':<12} {'ms/img':>9} {'img/s/core':>11} {f'{CORES}-core img/s':>14}")
    for name, value in ms.items():
        print(f"{name:<12} {value:9.3f} {1000 / value:11,.0f} {CORES * 1000 / value:14,.0f}")
    print(f"draft vs full after the resize to {args.size} px: mean {draft_mean:.2f}, max {draft_max} uint8 levels")
    summary = (f"decode: full {ms['full']:.1f} ms/img, draft {ms['draft']:.1f}, torchvision {ms['torchvision']:.1f}; "
               f"shards {ms['shards']:.3f} ms/img -> {speedup:,.0f}x faster than full decode per core; "
               f"{CORES}-core projection {projection:,.0f} img/s at {args.size} px (target >= "
               f"{TARGET_IMAGES_PER_S:,}); draft vs full: mean {draft_mean:.1f}, max {draft_max} levels")
    print(summary)
    report = {
        "n": args.n, "size": args.size, "height": HEIGHT, "width": WIDTH, "quality": QUALITY,
        "mean_file_mb": mean_mb, "cpu": cpu_name(), "threads": 1, "repeats": args.repeats,
        "ms_per_image": ms, "ms_per_image_all": {name: value[1] for name, value in results.items()},
        "shards_speedup_over_full": speedup, "projection_cores": CORES, "projection_images_per_s": projection,
        "target_images_per_s": TARGET_IMAGES_PER_S, "draft_vs_full_mean_levels": draft_mean,
        "draft_vs_full_max_levels": draft_max, "prepare_s": prepare_s, "summary": summary,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()

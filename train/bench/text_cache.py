"""Text-embedding cache at MIMIC scale: fill, reopen and look up a cache of N distinct texts.

    python -m train.bench.text_cache --texts 5000000 --dim 768                # fp16: 7.7 GB of vectors on disk
    python -m train.bench.text_cache --texts 1000 --dim 16 --lookup-batches 3 --dir /tmp

Fills a fresh cache under `--dir` with `--texts` distinct texts ("phrase {i} of a synthetic report") through
`TextEmbeddingCache.fill`, the storage path the trainer uses; the vectors come from a cheap deterministic
stand-in for the encoder (text i -> A[i mod 4099] + B[i // 4099 mod 4093], two fixed random tables), so the
timing is of the cache, not of a model. Then reopens the cache in a new object and times `lookup` on
`--lookup-batches` random batches of `--batch-size` existing texts (hash, searchsorted, gather, float32 copy),
checking every batch against the stand-in's vectors. The files just written are usually still in the page cache,
so the lookups measure a warm cache. The cache is deleted at the end unless `--keep`.

Last line: texts=N build_s=... reopen_s=... lookups_per_s=... peak_rss_gb=...
  build_s       `fill` from nothing: normalise + hash + dedupe, sort, embed (the stand-in), write + fsync each chunk,
                commit, sort the index;
  reopen_s      `TextEmbeddingCache.open` of the finished cache;
  lookups_per_s texts looked up per second;
  peak_rss_gb   peak resident memory of the process (`resource.getrusage`). It counts the memory-mapped file pages
                that lookups touched (and the kernel maps up to 64 KB around each one): page cache that the
                kernel can drop, not memory the process allocated. The line before the last splits it (RssAnon:
                allocated; RssFile: mapped file pages) and gives the peak after the build, before any lookup.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from train.text.cache import DTYPES, TextEmbeddingCache

TABLE_ROWS = (4099, 4093)  # coprime: (i mod 4099, i // 4099 mod 4093) differs for every i < 16.7 M


def synthetic_text(i: int) -> str:
    return f"phrase {i} of a synthetic report"


class SyntheticVectors:
    """The encoder's stand-in: text i -> A[i mod 4099] + B[i // 4099 mod 4093] (`[n, dim]` float32)."""

    def __init__(self, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.standard_normal((TABLE_ROWS[0], dim), dtype=np.float32)
        self.b = rng.standard_normal((TABLE_ROWS[1], dim), dtype=np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = np.fromiter((int(text.split(" ", 2)[1]) for text in texts), dtype=np.int64, count=len(texts))
        return self.a[ids % TABLE_ROWS[0]] + self.b[ids // TABLE_ROWS[0] % TABLE_ROWS[1]]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def resident_gb() -> str:
    """Resident memory now, split into private (RssAnon) and memory-mapped file pages (RssFile), from /proc."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return "n/a"
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if line.startswith("Rss"))
    return " ".join(f"{key}={int(fields[key].split()[0]) / 1024**2:.2f}" for key in ("RssAnon", "RssFile"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=100_000, help="distinct texts in the cache")
    parser.add_argument("--dim", type=int, default=768, help="vector width")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype")
    parser.add_argument("--chunk-size", type=int, default=8192, help="texts per committed chunk")
    parser.add_argument("--batch-size", type=int, default=4096, help="texts per lookup")
    parser.add_argument("--lookup-batches", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None, help="where the cache folder is made (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the cache folder")
    parser.add_argument("--progress", action="store_true", help="show the build's progress bar")
    args = parser.parse_args(argv)

    texts = [synthetic_text(i) for i in range(args.texts)]
    vectors = SyntheticVectors(args.dim)
    root = Path(tempfile.mkdtemp(prefix="text_cache_bench_", dir=args.dir))
    try:
        start = time.perf_counter()
        TextEmbeddingCache.fill(root / "text_cache", texts, vectors, fingerprint="bench", dim=args.dim,
                                dtype=args.dtype, chunk_size=args.chunk_size, progress=args.progress)
        build_s = time.perf_counter() - start
        build_peak_gb = peak_rss_gb()

        start = time.perf_counter()
        cache = TextEmbeddingCache.open(root / "text_cache")
        reopen_s = time.perf_counter() - start
        assert len(cache) == args.texts

        rng = np.random.default_rng(1)
        lookup_s = 0.0
        for _ in range(args.lookup_batches):
            batch = [texts[i] for i in rng.integers(0, args.texts, args.batch_size)]
            start = time.perf_counter()
            found = cache.lookup(batch)
            lookup_s += time.perf_counter() - start
            expected = torch.from_numpy(vectors(batch).astype(args.dtype).astype(np.float32))
            if not torch.equal(found, expected):
                raise AssertionError("a looked-up vector differs from the one stored for its text")
        disk_gb = sum(f.stat().st_size for f in cache.folder.iterdir()) / 1e9
        resident = resident_gb()
    finally:
        if args.keep:
            print(f"cache kept in {root / 'text_cache'}")
        else:
            shutil.rmtree(root)

    result = {
        "texts": args.texts,
        "build_s": round(build_s, 2),
        "reopen_s": round(reopen_s, 4),
        "lookups_per_s": round(args.lookup_batches * args.batch_size / lookup_s),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    print(f"dim={args.dim} dtype={args.dtype} chunk_size={args.chunk_size} disk_gb={disk_gb:.2f} "
          f"lookup_batches={args.lookup_batches}x{args.batch_size} peak_rss_after_build_gb={build_peak_gb:.2f} "
          f"resident_after_lookups_gb: {resident}")
    print(" ".join(f"{key}={value}" for key, value in result.items()))
    return result


if __name__ == "__main__":
    main()

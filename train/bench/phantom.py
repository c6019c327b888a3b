"""Throughput of the phantom generator: render-only and end-to-end (JPEG, report, scene graph, masks, CSVs).

    python -m train.bench.phantom --n 200
"""

import argparse
import os
import shutil
import tempfile
import time

from train.data.phantom import generate_dataset, render_phantom


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="workers of the parallel run (0 = all cores)")
    parser.add_argument("--tmp", default=None, help="where the end-to-end runs write (default: the system temp dir; "
                        "/dev/shm separates generator cost from file-system cost)")
    args = parser.parse_args(argv)
    cores = args.workers or os.cpu_count() or 1

    render_phantom(0, args.seed, args.size)  # build the texture banks once
    t = time.perf_counter()
    for i in range(args.n):
        render_phantom(i, args.seed, args.size)
    dt = time.perf_counter() - t
    print(f"render only        , 1 worker : {args.n / dt:7.1f} images/s ({1000 * dt / args.n:.2f} ms/image)")

    runs = [1] + ([cores] if cores > 1 else [])
    for workers in runs:
        tmp = tempfile.mkdtemp(prefix="phantom_bench_", dir=args.tmp)
        try:
            t = time.perf_counter()
            generate_dataset(tmp, args.n, args.seed, args.size, workers=workers, progress=False)
            dt = time.perf_counter() - t
            print(f"end to end (write) , {workers} worker{'s' if workers > 1 else ' '}: {args.n / dt:7.1f} images/s "
                  f"({1000 * dt / args.n:.2f} ms/image)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

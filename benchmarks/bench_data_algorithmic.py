"""Maze and prefix-sum generation speed on one core, against the public easy-to-hard generator.

The public generator (one maze at a time in pure Python) makes about 3,000 size-9 and 90 size-59
mazes/s on one core of the reference machine; the target here is at least 10x that. Best of
`--repeats` runs, since the machine may be shared.

    .venv/bin/python benchmarks/bench_data_algorithmic.py [--repeats 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, before numpy loads

import argparse  # noqa: E402
import time  # noqa: E402

from softshare.data.tasks import generate_mazes, generate_prefix_sums  # noqa: E402

MAZES = {9: 50_000, 13: 20_000, 33: 5_000, 59: 1_000, 201: 100}  # size -> count per run
REFERENCE = {9: 3_000, 59: 90}  # public generator, mazes/s on one core
PREFIX_SUMS = {16: 10_000, 32: 10_000, 512: 10_000}  # length -> count per run


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"{'maze size':>9} {'image':>9} {'count':>7} {'seconds':>8} {'mazes/s':>9} {'vs public':>10}")
    for size, count in MAZES.items():
        took = best_time(lambda: generate_mazes(count, size, seed=0), args.repeats)
        rate = count / took
        ratio = f"{rate / REFERENCE[size]:.1f}x" if size in REFERENCE else "-"
        side = 2 * size + 6
        print(f"{size:>9} {f'{side}x{side}':>9} {count:>7,} {took:>8.3f} {rate:>9,.0f} {ratio:>10}")

    print(f"\n{'bits':>9} {'count':>7} {'seconds':>8} {'strings/s':>11}")
    for length, count in PREFIX_SUMS.items():
        took = best_time(lambda: generate_prefix_sums(count, length, seed=0), args.repeats)
        print(f"{length:>9} {count:>7,} {took:>8.3f} {count / took:>11,.0f}")


if __name__ == "__main__":
    main()

"""Is the on-device loader fast enough? Augmented batches/s vs the training steps/s of the fastest model.

Batch 128 of CIFAR-shaped synthetic uint8 data with crop (4-pixel padding) + flip + Cutout 16, on the
CPU, against forward+backward+SGD steps of the registered model with the fewest FLOPs at the same
batch size, measured in interleaved rounds so both see the same machine load. The loader should be
at least 10x faster than the model consumes batches (on a GPU the gap only grows: the same tensor
ops run there too).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import softshare
from softshare.data import BatchLoader

CIFAR10_MEAN = (0.4914, 0.4822, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def forward_flops(name: str) -> int:
    """FLOPs of one 32x32 forward pass, counted on the meta device (nothing is computed)."""
    with torch.device("meta"):
        model = softshare.create_model(name, num_classes=10)
        x = torch.empty(1, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def loader_rate(loader: BatchLoader, epoch: int, seconds: float) -> float:
    """Augmented batches per second over at least `seconds` (cycling through epochs)."""
    done, start = 0, time.perf_counter()
    while True:
        for _ in loader.iterate(epoch):
            done += 1
            if time.perf_counter() - start >= seconds:
                return done / (time.perf_counter() - start)
        epoch += 1


def train_rate(model, optimizer, x, y, steps: int) -> float:
    """Training steps (forward + backward + SGD step) per second."""
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--loader-seconds", type=float, default=2.0, help="loader time per round")
    parser.add_argument("--steps", type=int, default=2, help="training steps per round")
    args = parser.parse_args()

    flops = {name: forward_flops(name) for name in softshare.list_models()}
    name = min(flops, key=flops.get)
    print(f"threads={torch.get_num_threads()}  fastest model: {name} "
          f"({flops[name] / 1e9:.2f} GFLOPs per 32x32 forward; candidates: {len(flops)})")

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (args.images,), generator=gen)
    loader = BatchLoader(images, labels, CIFAR10_MEAN, CIFAR10_STD, args.batch_size, shuffle=True,
                         drop_last=True, crop_padding=4, flip=True, cutout=16, device="cpu")
    model = softshare.create_model(name, num_classes=10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = next(loader.iterate(0))
    train_rate(model, optimizer, x, y, 1)  # warm-up
    loader_rate(loader, 0, 0.2)

    data_rates, model_rates = [], []
    for r in range(args.rounds):
        data_rates.append(loader_rate(loader, r, args.loader_seconds))
        model_rates.append(train_rate(model, optimizer, x, y, args.steps))
        print(f"round {r}: loader {data_rates[-1]:8.1f} batches/s   {name} {model_rates[-1]:6.3f} steps/s")
    data, steps = statistics.median(data_rates), statistics.median(model_rates)
    verdict = "OK" if data >= 10 * steps else "BELOW TARGET"
    print(f"median: loader {data:.1f} batches/s ({data * args.batch_size:.0f} images/s), "
          f"{name} {steps:.3f} steps/s; loader/model = {data / steps:.0f}x (target >= 10x: {verdict})")


if __name__ == "__main__":
    main()

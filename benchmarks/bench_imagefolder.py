"""How many CPU cores does the ImageFolder loader need to keep one GPU fed?

Generates JPEGs of ImageNet's typical size (500x375 and 375x500, quality 90) from the two photos
scikit-learn ships (random crops, so each file differs), then measures, in this one process
(1 thread, so the rate is per core):

- decode only (Pillow open + full decode to RGB);
- the training transform (decode with draft-mode shrinking where the crop allows, random-resized
  crop to 224, flip) as the DataLoader workers run it;
- the validation transform (resize 256 + centre crop 224);

and the whole DataLoader (workers, collation) with as many workers as this machine has cores.
Cores needed = GPU training rate / per-core training-transform rate. No GPU is measured here: the
GPU rates are published figures or estimates derived from them (see GPU_RATES) unless you pass
your own measured rate with --gpu-rate.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_imagefolder.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from softshare.data.imagefolder import ImageFolderDataset, ImageFolderLoader, scan_split

# Published: NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, 1x A100 80GB, mixed precision, DALI,
# batch 256: 2,470 img/s (pytorch-21.03 container; PyTorch/Classification/ConvNets/resnet50v1.5/README.md).
# The other two rows are estimates, not measurements: WRN-50-2 costs 11.4 GFLOPs per image against
# ResNet-50's 4.1 (torchvision's model tables), so ~2.8x fewer img/s on the same GPU; an H200 is taken
# as at most 3x an A100 for these convnets (bf16 dense peak ~3.2x, memory bandwidth 2.4x).
GPU_RATES = {
    "ResNet-50, A100 (published)": 2470.0,
    "WRN-50-2, A100 (estimate: published ResNet-50 / 2.8)": 2470.0 / 2.8,
    "WRN-50-2, H200 (estimate: 3x the A100 estimate)": 3 * 2470.0 / 2.8,
    "ResNet-50, H200 (estimate: 3x published A100)": 3 * 2470.0,
}


def make_jpegs(root: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs, 4 classes, ImageNet-typical 500x375 (a quarter portrait), quality 90."""
    from sklearn.datasets import load_sample_images  # optional dependency (the `test` extra)

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 640x427 each
    rng = random.Random(seed)
    for i in range(count):
        photo = photos[i % 2]
        scale = rng.uniform(0.6, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        size = (375, 500) if i % 4 == 3 else (500, 375)
        image = photo.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BICUBIC)
        folder = root / "train" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.JPEG", quality=90)


def rate(fn, n: int, rounds: int) -> float:
    """Best of `rounds` passes of fn(i) for i < n, in images/s."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = max(best, n / (time.perf_counter() - start))
    return best


def measure(root: Path, rounds: int, workers: int, batch: int) -> dict:
    split = scan_split(root, "train")
    n = len(split)
    train = ImageFolderDataset(split, train=True, size=224)
    val = ImageFolderDataset(split, train=False, size=224)

    def decode_only(i: int) -> None:
        with Image.open(split.path(i)) as image:
            image.convert("RGB")

    results = {
        "decode_only": rate(decode_only, n, rounds),
        "train_transform": rate(lambda i: train.load(i, 0), n, rounds),
        "val_transform": rate(lambda i: val.load(i, 0), n, rounds),
    }
    loader = ImageFolderLoader(split, train=True, batch_size=batch, size=224, workers=workers)
    list(loader.iterate(0))  # start the workers, warm the page cache
    start = time.perf_counter()
    images = 0
    for epoch in range(1, rounds + 1):
        for x, _ in loader.iterate(epoch):
            images += len(x)
    results[f"dataloader_{workers}_workers"] = images / (time.perf_counter() - start)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--gpu-rate", type=float, action="append", default=[],
                        help="a measured GPU training rate (img/s) to size against; repeatable")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root, args.images)
        sizes = [p.stat().st_size for p in root.rglob("*.JPEG")]
        results = measure(root, args.rounds, args.workers, args.batch)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"CPU: {cpu}, {len(os.sched_getaffinity(0))} cores visible; torch {torch.__version__}; "
          f"{args.images} JPEGs 500x375 q90, mean {statistics.mean(sizes) / 1024:.0f} KiB")
    print("\nimages/s, one process, 1 thread (= per core):")
    for key in ("decode_only", "train_transform", "val_transform"):
        print(f"  {key:28s} {results[key]:8.1f}")
    key = f"dataloader_{args.workers}_workers"
    print(f"  {key:28s} {results[key]:8.1f}  (whole loader, {args.workers} worker processes, batch {args.batch})")
    per_core = results["train_transform"]
    rates = dict(GPU_RATES)
    rates.update({f"given --gpu-rate {r:g}": r for r in args.gpu_rate})
    print("\ncores to feed one GPU (GPU img/s / training transform img/s per core):")
    for name, gpu in rates.items():
        print(f"  {name:58s} {gpu:7.0f} img/s -> {gpu / per_core:5.1f} cores")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "results": results, "gpu_rates": rates,
                                               "cores_needed": {k: v / per_core for k, v in rates.items()}}, indent=1))


if __name__ == "__main__":
    main()

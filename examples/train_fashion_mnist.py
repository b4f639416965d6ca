"""Train a soft-shared Wide ResNet on Fashion-MNIST from Python, then evaluate and fold it.

    python examples/train_fashion_mnist.py                 # the fashion_mnist_cpu preset: 10 epochs
    python examples/train_fashion_mnist.py --epochs 1      # one epoch
    python examples/train_fashion_mnist.py --tiny          # scikit-learn's digits (what the test runs)

How long (docs/fashion_mnist.md): a 10-epoch run of the preset (55,000 training images, 5,000
validation images) took 28-31 min wall, 160-198 s per epoch, with two runs side by side on the
project's 2-core machine, one thread each (2026-12-03); 93 min when other jobs loaded it too.

Fashion-MNIST is read from --data-root, or Debian's dataset-fashion-mnist package, or
downloaded with --download.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import softshare
from softshare.eval import evaluator_for
from softshare.train.config import resolve_config
from softshare.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--data-root")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="digits (bundled with scikit-learn), 1 epoch")
    args = parser.parse_args()

    overrides = {"out_dir": args.out_dir, "name": "fashion_mnist_example", "logger": ["jsonl", "csv"],
                 "lsm_every": 1, "download": args.download}
    if args.data_root:
        overrides["data_root"] = args.data_root
    if args.epochs:
        overrides["epochs"] = args.epochs
    preset = "fashion_mnist_cpu"
    if args.tiny:  # the same code path at smoke-test size
        preset = "digits_tiny"
        overrides.update(name="digits_example", epochs=1, model="swrn_16_1_1", device="cpu")
    config = resolve_config(preset, overrides=overrides)
    result = train(config)  # runs/<name>/: metrics.jsonl, metrics.csv, curves.png, lsm/, checkpoints/
    print(f"{config.model}: validation accuracy {result.final_metrics['val_acc']:.2%} after {config.epochs} "
          f"epoch(s); best {result.best_metric:.2%} at epoch {result.best_epoch} (held-out training images: the "
          f"test set was not used)")
    evaluate = evaluator_for(config.to_dict(), device=config.device)
    model = softshare.load(result.run_dir)  # the best checkpoint (chosen on validation), eval mode
    print(f"test accuracy of the best checkpoint: {evaluate(model)['acc']:.2%}")
    folded = softshare.fold_model(model, threshold=0.9)
    print(f"folding at |cos| >= 0.9: loops {folded.loops}, parameters {folded.params_before:,} -> "
          f"{folded.params_after:,}")
    print(f"run directory: {result.run_dir}")


if __name__ == "__main__":
    try:
        main()
    except softshare.SoftshareError as err:  # a bad input or a broken optional package: one line, exit 2
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

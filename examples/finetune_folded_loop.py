"""Fold a soft-shared algorithmic run, then train its final loop *as a loop*, briefly.

A k >= 2 net on prefix sums often folds into blocks that end in a short loop, but in training
that loop ran once or twice, so run hundreds of times it drifts (it "overthinks"). This script
folds the run's best checkpoint at --threshold, fine-tunes the folded net for a few epochs with a
random number of iterations per batch (the trained count up to twice that, full-depth loss), so
that the loop learns a step that can be repeated, and scores it before and after as `softshare
eval` does (the stable rule, 20x the trained iterations). It is the "fold at a lower |cos| and
fine-tune the loop" lever of docs/algorithmic.md ("When does recurrence emerge?"):

    python examples/finetune_folded_loop.py runs/<k2 run> --threshold 0.95 --epochs 5 --out runs/ft

The fine-tuning goes through `softshare.fit` (run directory, checkpoints, resume), so any model
and wrapper trains the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import softshare
from softshare.checkpoint import find_checkpoint, read_meta
from softshare.data.tasks import examples
from softshare.eval import evaluate_task
from softshare.fold import fold_model


class ThinkLonger(nn.Module):
    """In training, run the folded net a random number of iterations in [trained, 2 x trained]."""

    def __init__(self, net: nn.Module, trained: int):
        super().__init__()
        self.net, self.trained = net, trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = int(torch.randint(self.trained, 2 * self.trained + 1, ()).item()) if self.training else self.trained
        return self.net(x, iterations=count)


def stable_scores(net: nn.Module, config: dict, sizes: list[int], count: int) -> dict[int, float]:
    """Exact match per size at the stable rule, thinking up to 20x the trained iterations."""
    result = evaluate_task(net, config, sizes=sizes, count=count, fold=False).result
    return {int(size): scores["stable"] for size, scores in result["test"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run of --model shared on an algorithmic task")
    parser.add_argument("--threshold", type=float, default=0.95, help="fold at |cos| >= this")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--count", type=int, default=100, help="test instances per size")
    parser.add_argument("--out", default="runs/finetuned-loop", help="the fine-tuning's run directory")
    args = parser.parse_args()

    config = read_meta(find_checkpoint(args.run))["config"]
    folded = fold_model(softshare.load(args.run), args.threshold)
    net = folded.model
    print(f"folded at |cos| >= {args.threshold}: loops {folded.loops[0]}")
    if net.max_iterations is not None:
        raise SystemExit("no final loop at this threshold: nothing can think longer (try a lower --threshold)")
    print("before:", stable_scores(net, config, args.sizes, args.count))

    x, y = examples(config["task"], config["train_size"], config["train_count"], config["seed"])
    batches = [(x[i:i + config["batch_size"]], y[i:i + config["batch_size"]])
               for i in range(0, len(x), config["batch_size"])]
    out = softshare.fit(ThinkLonger(net, config["depth"]), batches, loss=F.cross_entropy,
                        out_dir=Path(args.out).parent, name=Path(args.out).name, epochs=args.epochs,
                        optimizer="adam", lr=args.lr, weight_decay=2e-4, schedule="constant", grad_clip=1.0,
                        seed=config["seed"])
    net.eval()
    print("after: ", stable_scores(net, config, args.sizes, args.count), f"({len(batches) * args.epochs} steps; {out})")


if __name__ == "__main__":
    main()

"""`softshare demo`: the end-to-end demo (`make demo`)."""

from __future__ import annotations

import argparse

from ..studies.demo import DemoConfig, run_demo
from ._common import add_overwrite, nonnegative_float, nonnegative_int, positive_float, positive_int, unit_float

ORDER = 90


def register(subparsers: argparse._SubParsersAction) -> None:
    d = DemoConfig()
    p = subparsers.add_parser("demo", help="end-to-end demo on generated mazes (make demo)",
                              description="Generate mazes, train a soft-shared net and a feed-forward control, "
                                          "draw the LSM, fold the shared net into a loop and evaluate all on "
                                          "larger mazes; writes OUT/report.md. Defaults: ~3.5 min on 2 idle CPU cores.")
    p.add_argument("--out", default=d.out, help=f"output directory (default: {d.out}); only an earlier demo's "
                                                 f"output there is replaced")
    add_overwrite(p, "--out")
    p.add_argument("--train-count", type=positive_int, default=d.train_count)
    p.add_argument("--test-count", type=positive_int, default=d.test_count)
    p.add_argument("--test-sizes", type=positive_int, nargs="+", default=d.test_sizes)
    p.add_argument("--width", type=positive_int, default=d.width)
    p.add_argument("--depth", type=positive_int, default=d.depth, help="residual blocks")
    p.add_argument("--num-templates", type=positive_int, default=d.num_templates)
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    p.add_argument("--recurrence-reg", type=nonnegative_float, default=d.recurrence_reg)
    p.add_argument("--threshold", type=unit_float, default=d.threshold, help="LSM threshold for folding")
    p.add_argument("--extra-iterations", type=nonnegative_int, default=d.extra_iterations)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fields = DemoConfig.__dataclass_fields__
    run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields}), overwrite=args.overwrite)
    return 0

"""`softshare demo`: the end-to-end demo (`make demo`)."""

from __future__ import annotations

import argparse

from ..studies.demo import DemoConfig, run_demo
from ._common import add_figure_format, add_overwrite, log_to_stdout, nonnegative_float, nonnegative_int, positive_int



def register(subparsers: argparse._SubParsersAction) -> None:
    d = DemoConfig()
    p = subparsers.add_parser("demo", description="Train a recurrent net, soft-shared nets with one and two templates "
                                                  "and a feed-forward net on 32-bit prefix sums side by side, draw the "
                                                  "shared nets' LSMs, fold them into loops and score all on strings up "
                                                  "to 512 bits at the label-free stopping rule; writes OUT/report.md. "
                                                  "Defaults: 865 s on the 2-core machine with two other runs beside "
                                                  "it (seed 0; README).")
    p.add_argument("--out", default=d.out, help=f"output directory (default: {d.out}); only an earlier demo's "
                                                 f"output there is replaced")
    add_overwrite(p, "--out")
    p.add_argument("--train-count", type=positive_int, default=d.train_count)
    p.add_argument("--test-count", type=positive_int, default=d.test_count, help="strings per test size")
    p.add_argument("--test-sizes", type=positive_int, nargs="+", default=d.test_sizes, help="string lengths")
    p.add_argument("--width", type=positive_int, default=d.width)
    p.add_argument("--depth", type=positive_int, default=d.depth, help="trained iterations")
    p.add_argument("--num-templates", type=positive_int, default=d.num_templates, help="templates per bank (shared net)")
    p.add_argument("--kn-templates", type=positive_int, default=d.kn_templates,
                   help="templates per bank of the second shared net, trained with the k >= 2 recipe (its loops are "
                        "found in training)")
    p.add_argument("--kn-lsm-every", type=positive_int, default=d.kn_lsm_every,
                   help="record that net's Layer Similarity Matrix every N epochs (the figure of loops appearing)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--recurrence-reg", type=nonnegative_float, default=d.recurrence_reg)
    p.add_argument("--patience", type=positive_int, default=d.patience,
                   help="stopping rule: iterations a prediction must stay unchanged")
    p.add_argument("--seed", type=nonnegative_int, default=d.seed)
    p.add_argument("--device", default=d.device)
    add_figure_format(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fields = DemoConfig.__dataclass_fields__
    with log_to_stdout("softshare.experiment"):  # a line per net and size while scoring (the slow part)
        run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields}), overwrite=args.overwrite)
    return 0

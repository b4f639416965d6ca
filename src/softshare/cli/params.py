"""`softshare params MODEL`: where a model's parameters are, and what sharing saves."""

from __future__ import annotations

import argparse

import torch

from ..analysis import sharing_stats
from ..models import create_model
from ._common import format_table, json_object, positive_int



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("params", description="Show each bank's layers, templates and parameters, and the "
                                                    "total against the same architecture without sharing.")
    p.add_argument("model", help="model name, e.g. swrn_28_10_2 (see `softshare models`)")
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--in-channels", type=positive_int, default=3)
    p.add_argument("--model-args", type=json_object, default={}, metavar="JSON",
                   help="extra create_model arguments, e.g. '{\"width\": 16, \"num_templates\": 2}'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with torch.device("meta"):
        model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                             **args.model_args)
    stats = sharing_stats(model)
    rows = [(b.name, b.num_layers, b.num_templates, list(b.weight_shape).__repr__(), b.params, b.unshared_params)
            for b in stats.banks]
    if rows:
        print(format_table(["bank", "layers", "templates", "template shape", "parameters", "unshared"], rows))
        print()
    else:
        print(f"{args.model} has no template banks (nothing is shared).\n")
    print(f"total parameters:        {stats.total:,}")
    print(f"unshared equivalent:     {stats.unshared_total:,}")
    print(f"saving:                  {stats.unshared_total / stats.total:.2f}x fewer parameters "
          f"({1 - stats.total / stats.unshared_total:.1%} removed)")
    return 0

"""`softshare models`: the registered model names and their parameter counts."""

from __future__ import annotations

import argparse

import torch

from ..layers.structure import count_parameters
from ..models import create_model, list_families, list_models
from ._common import format_table, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", description="List the named models of every registered family.")
    p.add_argument("pattern", nargs="?", default="*", help="glob filter on model names (default: all)")
    p.add_argument("--num-classes", type=positive_int, default=10, help="classifier size used for the counts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    with torch.device("meta"):  # count parameters without allocating them
        counts = {name: _parameters(name, args.num_classes) for name in names}
        families = [f for f in list_families() if args.pattern == "*" or any(n in f.examples for n in names)]
        rows = [(f.readable_pattern(), f.examples[0], _parameters(f.examples[0], args.num_classes), f.description)
                for f in families]
    print(format_table(["model", "parameters"], list(counts.items())))
    print(f"\nfamilies: any name matching the pattern works (parameters at {args.num_classes} classes)")
    print(format_table(["pattern", "example", "parameters", "what"], rows))
    return 0


def _parameters(name: str, num_classes: int) -> int:
    return count_parameters(create_model(name, num_classes=num_classes))

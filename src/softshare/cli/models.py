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
    rows = []
    with torch.device("meta"):  # count parameters without allocating them
        for name in list_models(args.pattern):
            model = create_model(name, num_classes=args.num_classes)
            rows.append((name, count_parameters(model)))
    print(format_table(["model", "parameters"], rows))
    print("\nfamilies (any size matching the pattern works):")
    for family in list_families():
        print(f"  {family.pattern.pattern:28s} {family.description}")
    return 0

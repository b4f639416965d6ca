"""`softshare share BUILDER`: what share() does to any model, and optionally the converted checkpoint."""

from __future__ import annotations

import argparse
import math

from torch import nn

from ..budget import build_skeleton, memory_budget
from ..checkpoint import save_checkpoint
from ..convert import share
from ..convert.share import GROUP_BY
from ..errors import SoftshareError, import_optional
from ..storage import atomic_path, check_output, mark_output
from ..layers.structure import count_parameters
from ..models import create_model
from ._common import add_overwrite, json_object, positive_int



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "share", description="Build a model (a registered name, or module:callable such as "
                    "torchvision.models:resnet18 or mypkg.nets:build), and print what share() does: "
                    "groups of same-shape layers, which ones become a bank of k templates, and the "
                    "parameters before and after. Only groups that get smaller are shared unless "
                    "--allow-growth. With --out, the converted model is saved as a checkpoint "
                    "(load it with softshare.load_into(model, DIR) after building the same model).")
    p.add_argument("model", help="registered model name, or MODULE:CALLABLE returning an nn.Module")
    p.add_argument("-k", "--num-templates", type=positive_int, default=2, help="templates per bank (default: 2)")
    p.add_argument("--select", nargs="+", metavar="GLOB",
                   help="layers to consider, glob patterns on module names (default: every Conv1d/Conv2d)")
    p.add_argument("--group-by", choices=GROUP_BY, default="shape",
                   help="layers of one shape share a bank: anywhere (shape), within a stage (stage: the paper's "
                        "one bank per stage), or within their parent module (parent) (default: shape)")
    p.add_argument("--model-args", type=json_object, default={}, metavar="JSON",
                   help="keyword arguments for the builder, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--allow-growth", action="store_true",
                   help="also share groups whose bank would not be smaller than their layers")
    p.add_argument("--init-from-weights", action="store_true",
                   help="start the banks from the model's weights (truncated SVD) instead of at random")
    p.add_argument("--out", metavar="DIR", help="save the converted model as a checkpoint directory here (new, "
                                                 "or an earlier `softshare share` output)")
    add_overwrite(p, "--out")
    p.set_defaults(func=run)


def build(spec: str, kwargs: dict) -> nn.Module:
    """A registered model name, or ``module:callable`` imported and called with `kwargs`."""
    if ":" not in spec:
        return create_model(spec, **kwargs)
    module_name, _, attr = spec.partition(":")
    module = import_optional(module_name, f"cannot build {spec}: give MODULE:CALLABLE of an installed, importable "
                                          f"module, e.g. torchvision.models:resnet18")
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise SoftshareError(f"cannot build {spec}: {module_name} has no callable {attr!r}; give MODULE:CALLABLE, "
                             f"e.g. torchvision.models:resnet18")
    try:
        model = builder(**kwargs)
    except TypeError as err:
        raise SoftshareError(f"{spec}(**{kwargs}) failed: {err}; fix --model-args") from None
    if not isinstance(model, nn.Module):
        raise SoftshareError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def run(args: argparse.Namespace) -> int:
    if args.out is None and args.init_from_weights:
        raise SoftshareError("--init-from-weights only matters with --out (the plan does not depend on it)")
    if args.out:  # before any work: never replace what the user has there
        check_output(args.out, "share", overwrite=args.overwrite)
    # a plan needs shapes only: built on the meta device (no memory, no init), counted as it is built
    budget, _ = memory_budget()
    fix = "fix --model-args, or plan it without --out (the plan allocates nothing)"
    model = build_skeleton(lambda: build(args.model, args.model_args), budget / 8 if args.out else math.inf,
                           f"model {args.model}", fix)
    plan = share(model, args.num_templates, select=args.select, group_by=args.group_by, allow_growth=args.allow_growth,
                 dry_run=True)
    print(plan.summary())
    if args.out:
        model = build(args.model, args.model_args)  # for real: it fits the budget
        share(model, args.num_templates, select=args.select, group_by=args.group_by,
              init_from_weights=args.init_from_weights, allow_growth=args.allow_growth)
        with atomic_path(args.out, keep_foreign=True) as tmp:  # the old output stays until the new one is complete
            save_checkpoint(tmp, model)
            mark_output(tmp, "share")
        how = (f"softshare.load({args.out!r})" if ":" not in args.model else
               f"softshare.load_into(model, {args.out!r}) on the model built again")
        print(f"saved {args.out} ({count_parameters(model):,} parameters): load it with {how}")
    return 0

"""`softshare convert-author CHECKPOINT --model swrn_L_w_k --out DIR`: import the paper's checkpoints."""

from __future__ import annotations

import argparse

from ..checkpoint import read_meta
from ..convert import convert_author
from ._common import add_overwrite



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert-author", description="Convert a .pth.tar saved by the reference implementation (lolemacs/soft-sharing) into a "
                    "softshare checkpoint directory giving the same logits. The file is read without running "
                    "any pickled code.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth.tar or model_best.pth.tar")
    p.add_argument("--model", required=True, help="architecture of the file, e.g. swrn_28_10_2 (wrn_L_w if unshared)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (load it with softshare.load)")
    add_overwrite(p, "--out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = convert_author(args.checkpoint, args.model, args.out, overwrite=args.overwrite)
    meta = read_meta(out)
    epoch = f" (epoch {meta['epoch']})" if meta["epoch"] is not None else ""
    print(f"converted {args.checkpoint}{epoch} to {out}: {args.model}, "
          f"{meta['model']['num_classes']} classes")
    return 0

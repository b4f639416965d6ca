"""`softshare lsm RUN_OR_CHECKPOINT`: layer similarity heatmaps of a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis import LSM_DIR, layer_similarity, plot_lsm_history, read_lsm_history, save_lsm, short_layer_names
from ..checkpoint import find_checkpoint, load
from ..errors import SoftshareError
from ..storage import check_output, mark_output
from ._common import add_figure_format, add_overwrite, format_table



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lsm", description="Draw, for every template bank, S_ij = |cos(a_i, a_j)| between its layers' coefficient "
                    "vectors (1 = the same layer up to scale), and save the matrices as lsm.json. For a run "
                    "directory trained with --lsm-every, also redraw the history across epochs.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (best checkpoint, else last), checkpoint directory or model.safetensors")
    p.add_argument("--out", metavar="DIR", help="output directory (default for a run directory: RUN/lsm)")
    add_overwrite(p, "--out")
    add_figure_format(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    is_run = path.is_dir() and find_checkpoint(path) != path
    if args.out is None and not is_run:
        raise SoftshareError(f"{path} is a checkpoint, not a run directory; say where the figures go with --out DIR")
    out = Path(args.out) if args.out else path / LSM_DIR
    if out != path / LSM_DIR:  # the run's own lsm/ is this job's place; anywhere else must be new or ours
        check_output(out, "lsm", overwrite=args.overwrite, legacy=("lsm.json",))
    model = load(path)
    if out.exists() and not out.is_dir():
        raise SoftshareError(f"{out} is a file; the LSM figures go into a directory: remove it or pass --out DIR")
    written = save_lsm(model, out, args.figure_format)
    mark_output(out, "lsm")
    if is_run and read_lsm_history(path):
        written.append(plot_lsm_history(path, figure_format=args.figure_format))
    for similarity in layer_similarity(model):
        names = short_layer_names(similarity.layers)
        rows = [[name, *(f"{v:.2f}" for v in row)] for name, row in zip(names, similarity.matrix.tolist())]
        print(f"{similarity.bank}:")
        print(format_table(["", *names], rows) + "\n")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0

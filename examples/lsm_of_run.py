"""Load a trained run and draw its Layer Similarity Matrices: which layers became the same layer.

    python examples/lsm_of_run.py runs/fashion_mnist_example --out lsm_figures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import softshare
from softshare.analysis import plot_lsm, plot_lsm_history, read_lsm_history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory (or a checkpoint)")
    parser.add_argument("--out", type=Path, default=Path("lsm_figures"))
    args = parser.parse_args()

    model = softshare.load(args.run)
    similarities = softshare.layer_similarity(model)
    for lsm in similarities:
        off_diagonal = lsm.matrix.clone().fill_diagonal_(0)
        i, j = divmod(int(off_diagonal.argmax()), len(lsm.layers))
        print(f"{lsm.bank}: {len(lsm.layers)} layers; most alike: {lsm.layers[i]} and {lsm.layers[j]} "
              f"(|cos| = {off_diagonal[i, j]:.3f})")
    for path in plot_lsm(similarities, args.out):
        print(f"wrote {path}")
    if read_lsm_history(args.run):  # trained with --lsm-every N: how the LSM changed
        print(f"wrote {plot_lsm_history(args.run)}")


if __name__ == "__main__":
    try:
        main()
    except softshare.SoftshareError as err:  # a bad input or a broken optional package: one line, exit 2
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

"""`softshare curves RUN... --out FIG`: training curves of one or several runs on shared axes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SoftshareError
from ..storage import FIGURE_FORMATS, check_output, figure_path, save_figure
from ..train.run_dir import SPLITS, curves_figure, curves_note, eval_prefix, read_metrics
from ._common import add_figure_format, add_overwrite

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "curves", description="Draw loss and accuracy (%) per epoch of each run, training dashed and evaluation solid, "
                    "a colour per run, on shared axes, so runs compare at a glance (a run's own curves.png "
                    "shows one run).")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_METRICS", help="run directories or metrics.jsonl files")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the figure (a new file; .png, .pdf or .svg, else the --format suffix is added)")
    add_overwrite(p, "--out")
    add_figure_format(p)
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="legend label per run (default: run names)")
    p.add_argument("--title", help="figure title (default: the labels)")
    p.add_argument("--eval-split", choices=["validation", "test"],
                   help="what the runs' evaluated metrics measured (default: test_* keys are the test set; val_* "
                        "keys validation, unless config.json says val_size 0: runs from before the test_* keys)")
    p.add_argument("--note", help="a line under the plots (default: why the training loss is higher, when the runs "
                                  "used label smoothing)")
    p.set_defaults(func=run)


def _read(spec: str) -> tuple[str, list[dict], dict]:
    """A run's name, metrics rows and config ({} for a bare metrics.jsonl)."""
    path = Path(spec)
    run = path if path.is_dir() else path.parent
    if not (run / "metrics.jsonl").is_file() and not path.is_file():
        raise SoftshareError(f"{spec} is neither a run directory with metrics.jsonl nor a metrics file; "
                             f"give runs/<name> or its metrics.jsonl")
    rows = read_metrics(run) if path.is_dir() else [json.loads(line) for line in path.read_text().splitlines()
                                                     if line.strip()]
    if not rows:
        raise SoftshareError(f"{spec} has no epochs recorded yet; train it first")
    try:
        config = json.loads((run / "config.json").read_text()) if path.is_dir() else {}
    except (OSError, ValueError):
        config = {}
    return (run.name if path.is_dir() else path.stem), rows, config


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    suffix = out.suffix.lstrip(".").lower()
    if suffix not in FIGURE_FORMATS:
        out = figure_path(out, args.figure_format)
    elif suffix != args.figure_format and args.figure_format != "png":
        raise SoftshareError(f"--out {args.out} and --format {args.figure_format} disagree; drop one")
    if args.labels and len(args.labels) != len(args.runs):
        raise SoftshareError(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs; give one per run")
    check_output(out, "curves figure", overwrite=args.overwrite, directory=False)
    read = [_read(spec) for spec in args.runs]
    labels = args.labels or [name for name, _, _ in read]
    if len(set(labels)) != len(labels):
        raise SoftshareError(f"two runs would have the same label {labels}; name them with --labels")
    config = next((c for _, _, c in read if c), {})
    split = args.eval_split or ("test" if config.get("val_size") == 0 else None)  # None: by the metric keys
    note = args.note or curves_note(config, split or SPLITS[eval_prefix(read[0][1])])
    figure = curves_figure({label: rows for label, (_, rows, _) in zip(labels, read)},
                           args.title or " vs ".join(labels), split, note)
    print(f"wrote {save_figure(figure, out)}")
    return 0

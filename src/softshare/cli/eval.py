"""`softshare eval`: score a trained model on its test set (an ImageFolder run: on its val/ split)."""

from __future__ import annotations

import argparse
import contextlib
import json

from ..errors import SoftshareError
from ..eval import evaluate_checkpoint
from ..fold import DEFAULT_THRESHOLD
from ._common import add_figure_format, add_overwrite, format_table, log_to_stdout, positive_int, similarity



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", description="Evaluate a run directory or checkpoint on the test set.")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--data", help="dataset name (default: the one it was trained on)")
    p.add_argument("--data-root", help="where the dataset files are")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=positive_int, help="default: 500 images, 100 task instances")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    task = p.add_argument_group("algorithmic tasks (exact match per size and iteration; JSON + plot written)")
    task.add_argument("--sizes", type=positive_int, nargs="+", help="test sizes (default: the run's test_sizes)")
    task.add_argument("--iterations", type=positive_int,
                      help="score after 1..N iterations (default: ff/shared depth; nets that run longer, recurrent "
                           "or folded: 20x trained)")
    task.add_argument("--patience", type=positive_int,
                      help="stopping rule: stop once a prediction is unchanged for this many iterations (default 10)")
    task.add_argument("--count", type=positive_int, help="instances per size (default: the run's test_count)")
    task.add_argument("--no-fold", dest="fold", action="store_false",
                      help=f"score a soft-shared net as it is, for its trained iterations (default: fold it at "
                           f"|cos| >= {DEFAULT_THRESHOLD} so that a final loop runs longer, as the studies do)")
    task.add_argument("--fold-threshold", dest="threshold", type=similarity, metavar="T",
                      help=f"fold at |cos| >= T instead of {DEFAULT_THRESHOLD}: a lower T merges blocks that are "
                           f"nearly the same into longer loops (the fold's cost at the training size is printed)")
    task.add_argument("--out", metavar="JSON", help="result path (default: <run>/eval-<best|last>.json)")
    add_overwrite(task, "the --out file (and the figures beside it)")
    add_figure_format(task)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    task_options = {k: getattr(args, k)
                    for k in ("sizes", "iterations", "count", "out", "patience", "overwrite", "threshold")
                    if getattr(args, k)}
    if not args.fold:
        if args.threshold is not None:
            raise SoftshareError("--fold-threshold and --no-fold contradict each other: drop one")
        task_options["fold"] = False
    if args.figure_format != "png":
        task_options["figure_format"] = args.figure_format
    # progress lines on long test sets, unless stdout is for the JSON
    with contextlib.nullcontext() if args.json else log_to_stdout("softshare.eval"):
        result = evaluate_checkpoint(args.checkpoint, dataset=args.data, data_root=args.data_root,
                                     download=args.download, device=args.device, batch_size=args.batch_size,
                                     **task_options)
    if args.json:
        print(json.dumps(result, indent=2))
    elif "accuracy" in result:
        print(_task_table(result))
    else:
        print(f"{result['chosen']}\nscored on the {result['dataset']} {result['split']} set ({result['count']:,} images): "
              f"loss {result['loss']:.4f}  top-1 error {100 * (1 - result['acc']):.2f}%  "
              f"top-5 error {100 * (1 - result['top5_acc']):.2f}%")
    return 0


def _task_table(result: dict) -> str:
    """Exact match (%) per size at a few iteration counts, the best one, and the stopping rules."""
    last, trained = result["iterations"][-1], result["trained_iterations"]
    shown = sorted({min(trained, last), last} | {t for t in (4 * trained,) if t < last})
    rows = []
    for size, acc in result["accuracy"].items():
        best = max(range(len(acc)), key=acc.__getitem__)
        stop = result["stop"][size]
        rows.append([int(size), *(round(100 * acc[t - 1], 1) for t in shown), f"{100 * acc[best]:.1f} @{best + 1}",
                     f"{100 * stop['stable']['exact_match']:.1f} @{stop['stable']['mean_iteration']:.0f}",
                     f"{100 * stop['confident']['exact_match']:.1f} @{stop['confident']['mean_iteration']:.0f}"])
    table = format_table(["size", *(f"{t} it" for t in shown), "best", "stable rule", "confident rule"], rows)
    extra = f", {result['mazes_plot']}, {result['mazes_animation']}" if "mazes_plot" in result else ""
    return (f"{result['chosen']}\n{result['model']}, trained at size {result['train_size']} with {trained} "
            f"iterations: exact match % on {result['count']} test instances per size; the rules stop without "
            f"labels (stable: prediction unchanged for {result['patience']} iterations; @ = mean iteration)\n"
            f"{_fold_line(result['fold'])}{table}\nwritten: {result['json']}, {result['plot']}{extra}")


def _fold_line(fold: dict | None) -> str:
    """What folding did to a soft-shared net before it was scored (nothing for other nets)."""
    if fold is None:
        return ""
    longer = ("its last loop runs longer than trained" if fold["runs_longer"] else
              "no final loop formed, so it runs its trained iterations only")
    return (f"folded at |cos| >= {fold['threshold']} into loops {fold['loops']} ({longer}; "
            f"exact match at the training size {100 * fold['acc_before']:.1f}% -> {100 * fold['acc_after']:.1f}%); "
            f"--no-fold scores it unfolded\n")

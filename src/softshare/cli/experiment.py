"""`softshare experiment STUDY`: reproducible studies, one subcommand each with its own flags.

- ``algorithmic``: ff vs soft-shared vs recurrent nets on mazes and prefix sums;
- ``recurrence``: accuracy and folding against the recurrence regulariser's weight.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..eval.algorithmic import STOP_PATIENCE
from ..fold import DEFAULT_THRESHOLD
from ..storage import FIGURE_FORMATS, check_output, mark_output, output_kind
from ..studies.algorithmic import DEFAULT_VARIANTS, TASKS, VARIANTS, run_experiment
from ..studies.recurrence import LAMBDAS, SETTINGS, run_study
from ._common import add_figure_format, log_to_stdout, nonnegative_float, nonnegative_int, positive_int



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment", description="Run a study end to end through the ordinary trainer, one run directory per setting, and "
                    "write results.json, results.md (and plots) to --out. Rerunning the same command continues "
                    "an interrupted study.")
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)

    a = studies.add_parser(
        "algorithmic", help="ff vs soft-shared vs recurrent nets: training speed and extrapolation",
        description="Train ff, shared (k = 1, 2, 4; with and without the recurrence regulariser) and recurrent "
                    "(with and without DT-L) nets with one recipe for several seeds, then measure (a) steps and "
                    "wall time to 95% training exact match, (b) test exact match on larger sizes at the "
                    "label-free stopping rule and at the best iteration, running nets that can (recurrent, shared "
                    "folded into a loop) up to 20x the trained iterations, and (c) what the shared nets fold into.")
    a.add_argument("--scale", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: presets prefix_sums_cpu/mazes_cpu (prefix sums, 5 seeds: about 90 min with "
                        "--jobs 2 on 2 cores); gpu: prefix_sums_gpu/mazes_gpu (one GPU)")
    a.add_argument("--tasks", "--task", nargs="+", default=["prefix-sums"], choices=TASKS,
                   help="prefix-sums (default), mazes or both")
    a.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                   metavar="VARIANT", help=f"subset of {' '.join(VARIANTS)} (default: {' '.join(DEFAULT_VARIANTS)})")
    a.add_argument("--seeds", nargs="+", type=nonnegative_int, default=[0, 1, 2, 3, 4])
    a.add_argument("--jobs", type=positive_int, default=1,
                   help="runs at once, each in its own process with one thread (default 1; 2 on a 2-core machine)")
    a.add_argument("--patience", type=positive_int, default=STOP_PATIENCE,
                   help=f"the stopping rule: stop once a prediction is unchanged for this many iterations "
                        f"(default {STOP_PATIENCE})")
    a.add_argument("--epochs", type=positive_int, help="override the presets' epochs (a reduced run)")
    a.add_argument("--train-count", type=positive_int, help="override the presets' training-set size")
    a.add_argument("--test-count", type=positive_int, help="override the presets' test instances per size")
    _common_flags(a)
    a.set_defaults(func=run_algorithmic)

    r = studies.add_parser(
        "recurrence", help="accuracy and folding against --recurrence-reg",
        description=f"For each task, regulariser weight LAMBDA and seed, train with --recurrence-reg LAMBDA, then "
                    f"report accuracy, the shared layers that fold into loops at LSM >= {DEFAULT_THRESHOLD}, and "
                    f"the folded net's accuracy.")
    r.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    r.add_argument("--lambdas", nargs="+", type=nonnegative_float, default=list(LAMBDAS), metavar="LAMBDA",
                   help=f"recurrence regulariser weights (default: {' '.join(f'{v:g}' for v in LAMBDAS)})")
    r.add_argument("--seeds", nargs="+", type=nonnegative_int, default=[0])
    r.add_argument("--epochs", type=positive_int, help="override the settings' epochs (a reduced run)")
    _common_flags(r)
    r.set_defaults(func=run_recurrence)


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", help="results directory (default: runs/experiment-<study>[-<scale>])")
    add_figure_format(p)


def _claim(out: str, kind: str) -> str:
    """A rerun continues its own earlier (or interrupted) study; nothing else is written into."""
    if _unmarked_study(Path(out)):  # begun before studies marked their output: it is ours to continue
        mark_output(out, kind)
    check_output(out, kind, flag=None, legacy=("results.json",)).mkdir(parents=True, exist_ok=True)
    mark_output(out, kind)
    return out


def _unmarked_study(path: Path) -> bool:
    """A study directory written before output markers: only runs/ (every entry a softshare run
    directory) and the study's results files, and no marker of any kind."""
    if not path.is_dir() or path.is_symlink() or output_kind(path) is not None or not (path / "runs").is_dir():
        return False
    allowed = {"runs", "results.json", "results.md"}
    if any(p.name not in allowed and p.suffix.lstrip(".") not in FIGURE_FORMATS for p in path.iterdir()):
        return False
    return all(p.is_dir() and (p / "config.json").is_file() for p in (path / "runs").iterdir())


def run_algorithmic(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_count", args.train_count),
                                   ("test_count", args.test_count)) if v is not None}
    out = _claim(args.out or f"runs/experiment-algorithmic-{args.scale}", "experiment algorithmic")
    with log_to_stdout("softshare.experiment", "softshare.train"):
        run_experiment(out, args.scale, tuple(args.tasks), tuple(args.variants), tuple(args.seeds), overrides,
                       args.device, args.jobs, args.patience, args.figure_format)
    print(f"done: {out}/results.md")
    return 0


def run_recurrence(args: argparse.Namespace) -> int:
    out = _claim(args.out or "runs/experiment-recurrence", "experiment recurrence")
    with log_to_stdout("softshare.experiment", "softshare.train"):
        run_study(out, tuple(args.tasks), tuple(args.lambdas), tuple(args.seeds), args.device, args.epochs,
                  args.figure_format)
    print(f"done: {out}/results.md")
    return 0

"""`softshare experiment STUDY`: reproducible studies, one subcommand each with its own flags.

- ``algorithmic``: ff vs soft-shared vs recurrent nets on mazes and prefix sums;
- ``recurrence``: accuracy and folding against the recurrence regulariser's weight.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..eval.algorithmic import STOP_PATIENCE
from ..fold import DEFAULT_THRESHOLD
from ..storage import FIGURE_FORMATS, check_output, mark_output, output_lock
from ..studies.algorithmic import DEFAULT_VARIANTS, TASKS, VARIANTS, plan_experiment, run_experiment
from ..studies.recurrence import LAMBDAS, SETTINGS, check_study, run_study
from ..train.run_dir import is_run
from ._common import add_figure_format, add_overwrite, log_to_stdout, nonnegative_float, nonnegative_int, positive_int



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
                   help="cpu: presets prefix_sums_cpu/mazes_cpu (prefix sums, the default variants and 5 seeds "
                        "with --test-count 100 took 35 min with --jobs 2 on the idle 2-core machine, "
                        "docs/algorithmic.md); gpu: prefix_sums_gpu/mazes_gpu (one GPU)")
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
    p.add_argument("--out", help="results directory (default: runs/experiment-<study>[-<scale>]); rerunning "
                                 "into it continues the study")
    add_overwrite(p, "--out (the study's files there are written; other files stay)")
    add_figure_format(p)


STUDY_FILES = ("runs", "results.json", "results.md")  # and the study's figures (FIGURE_FORMATS)


@contextlib.contextmanager
def _claim(out: str, kind: str, overwrite: bool) -> Iterator[str]:
    """Hold `out` for the study: new, or its own earlier (or interrupted) study, or anything with
    --overwrite (only the study's own files are written there). One study at a time writes it."""
    legacy = _unmarked_study  # a study directory begun before studies marked their output
    path = check_output(out, kind, overwrite=overwrite, legacy=legacy)
    with output_lock(path, f"study output {kind}"):
        path.mkdir(parents=True, exist_ok=True)
        mark_output(path, kind, complete=False, files=())
        yield out
        mark_output(path, kind, files=[name for name in STUDY_FILES if (path / name).exists()])


def _unmarked_study(path: Path) -> bool:
    """A study directory written before output markers: only runs/ (every entry a softshare run
    directory, by proof) and the study's results files."""
    if not (path / "runs").is_dir():
        return False
    if any(p.name not in STUDY_FILES and p.suffix.lstrip(".") not in FIGURE_FORMATS for p in path.iterdir()):
        return False
    return all(is_run(p) for p in (path / "runs").iterdir())


def run_algorithmic(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_count", args.train_count),
                                   ("test_count", args.test_count)) if v is not None}
    out = args.out or f"runs/experiment-algorithmic-{args.scale}"
    plan_experiment(Path(out), args.scale, tuple(args.tasks), tuple(args.variants), tuple(args.seeds), overrides,
                    args.device, args.jobs, args.patience, args.figure_format)  # all validated before any write
    with _claim(out, "experiment algorithmic", args.overwrite), \
            log_to_stdout("softshare.experiment", "softshare.train"):
        run_experiment(out, args.scale, tuple(args.tasks), tuple(args.variants), tuple(args.seeds), overrides,
                       args.device, args.jobs, args.patience, args.figure_format)
    print(f"done: {out}/results.md")
    return 0


def run_recurrence(args: argparse.Namespace) -> int:
    out = args.out or "runs/experiment-recurrence"
    check_study(out, tuple(args.tasks), tuple(args.lambdas), tuple(args.seeds), args.device, args.epochs,
                args.figure_format)
    with _claim(out, "experiment recurrence", args.overwrite), \
            log_to_stdout("softshare.experiment", "softshare.train"):
        run_study(out, tuple(args.tasks), tuple(args.lambdas), tuple(args.seeds), args.device, args.epochs,
                  args.figure_format)
    print(f"done: {out}/results.md")
    return 0

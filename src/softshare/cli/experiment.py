"""`softshare experiment algorithmic`: ff vs soft-shared vs recurrent nets on mazes and prefix sums."""

from __future__ import annotations

ORDER = 70


def register(subparsers) -> None:
    from ._common import nonnegative_int, positive_int

    p = subparsers.add_parser(
        "experiment", help="reproducible comparison: training speed and extrapolation on algorithmic tasks",
        description="Train ff, shared (k = 1, 2, 4) and recurrent nets on mazes and prefix sums for several "
                    "seeds, then measure (a) steps and wall time to 95%% training exact match and (b) test "
                    "exact match on larger sizes. Writes results.json, results.md and plots to --out. Rerunning "
                    "the same command continues an interrupted experiment.")
    p.add_argument("name", choices=["algorithmic", "recurrence"],
                   help="algorithmic: ff vs shared vs recurrent; recurrence: the --recurrence-reg study "
                        "(accuracy and layers that fold at LSM >= 0.99 for LAMBDA in 0, 0.05, 1 on Fashion-MNIST "
                        "and mazes)")
    p.add_argument("--scale", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: presets mazes_cpu/prefix_sums_cpu (about an hour on 2 cores); "
                        "gpu: mazes_gpu/prefix_sums_gpu (one GPU)")
    p.add_argument("--tasks", nargs="+", default=["mazes", "prefix-sums"], choices=["mazes", "prefix-sums"])
    p.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                   help="subset of ff shared_k1 shared_k2 shared_k4 recurrent recurrent_recall "
                        "(default: all but recurrent_recall)")
    p.add_argument("--seeds", nargs="+", type=nonnegative_int, default=[0, 1, 2])
    p.add_argument("--epochs", type=positive_int, help="override the presets' epochs (a reduced run)")
    p.add_argument("--train-count", type=positive_int, help="override the presets' training-set size")
    p.add_argument("--test-count", type=positive_int, help="override the presets' test instances per size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", help="results directory (default: runs/experiment-<name>-<scale>)")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    import sys

    from ..experiment import DEFAULT_VARIANTS, run_experiment

    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_count", args.train_count),
                                   ("test_count", args.test_count)) if v is not None}
    out = args.out or f"runs/experiment-{args.name}-{args.scale}"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(name) for name in ("softshare.experiment", "softshare.train")]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        if args.name == "recurrence":
            from ..recurrence_study import run_study

            run_study(out, seed=args.seeds[0], device=args.device, epochs=args.epochs)
        else:
            run_experiment(out, args.scale, tuple(args.tasks), tuple(args.variants or DEFAULT_VARIANTS),
                           tuple(args.seeds), overrides, args.device)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    print(f"done: {out}/results.md")
    return 0

"""`softshare train`: train a model on an image dataset or an algorithmic task."""

from __future__ import annotations

import argparse
import json

from ..train.config import PRESETS, add_config_arguments, load_config_file, overrides_from_args, resolve_config
from ..train.loop import train
from ._common import log_to_stdout



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", description="Train with defaults < --preset < --config file < flags. The run directory "
                    "runs/<name>/ gets the resolved config, metrics.jsonl, curves.png, train.log and "
                    "checkpoints/{last,best}. Several GPUs: torchrun --nproc-per-node N -m softshare train ...",
        epilog="presets: " + ", ".join(PRESETS))
    p.add_argument("--preset", help="named configuration (see the list below)")
    p.add_argument("--config", dest="config_file", metavar="FILE",
                   help="YAML or JSON file of config fields; it may name a `preset:` to build on")
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue a run: a run directory or checkpoint, or 'auto' for this run's last checkpoint "
                        "(none yet: start it). The run keeps its saved config; flags and --config values given "
                        "with --resume change epochs, lr, schedule, lr-milestones, lr-gamma, warmup-epochs, "
                        "grad-clip, eval/lsm/checkpoint-every (logged and recorded in run_info.json) and "
                        "are refused for anything else")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (the fields of its task) and exit")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    config = resolve_config(args.preset, args.config_file, overrides)
    if args.print_config:
        print(json.dumps(config.task_dict(), indent=2))
        return 0
    # what the user asked for explicitly (file and flags, not a preset, not even the file's `preset:`):
    # a resume applies or refuses it
    given = {k.replace("-", "_") for k in load_config_file(args.config_file)} if args.config_file else set()
    given.discard("preset")
    changes = {k: getattr(config, k) for k in given | set(overrides)}
    with log_to_stdout("softshare.train"):
        result = train(config, resume=args.resume, changes=changes)
    if result.run_dir is not None and not result.interrupted:
        best = f", best {result.best_metric:.4f}" if result.best_metric is not None else ""
        print(f"done: {result.run_dir}{best}")
    return 130 if result.interrupted else 0

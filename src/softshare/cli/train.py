"""`softshare train`: train a model on an image dataset or an algorithmic task."""

from __future__ import annotations

import argparse
import json

from ..train.config import PRESETS, add_config_arguments, config_layers, overrides_from_args, resolve_config
from ..train.loop import train
from ..train.resume import saved_config
from ._common import log_to_stdout

ORDER = 30


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (paper recipe presets, CPU/GPU/torchrun DDP)",
        description="Train with defaults < --preset < --config file < flags. The run directory "
                    "runs/<name>/ gets the resolved config, metrics.jsonl, curves.png, train.log and "
                    "checkpoints/{last,best}. Several GPUs: torchrun --nproc-per-node N -m softshare train ...",
        epilog="presets: " + ", ".join(PRESETS))
    p.add_argument("--preset", help="named configuration (see the list below)")
    p.add_argument("--config", dest="config_file", metavar="FILE",
                   help="YAML or JSON file of config fields; it may name a `preset:` to build on")
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue a run: a run directory (continued where it is) or checkpoint, or 'auto' for "
                        "this run's last checkpoint (none yet: start it). The run keeps its saved config; flags "
                        "and --config values given with --resume change epochs (not below those done), lr, "
                        "schedule, lr-milestones, lr-gamma, warmup-epochs, grad-clip, eval/lsm/checkpoint-every "
                        "and where it runs (device, amp, data-root holding the same data...), each logged and "
                        "recorded in run_info.json, and are refused for anything else; a --preset must be the "
                        "run's own")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds an earlier run (its checkpoints and metrics "
                        "are deleted) or other files (only the files a run writes are replaced; the rest stay)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (the fields of its task) and exit")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    layers = config_layers(args.preset, args.config_file, overrides)
    preset = next(((source.removeprefix("preset "), values) for values, source in layers
                   if source.startswith("preset ")), None)
    file_values = next((values for values, source in layers if source == str(args.config_file)), {})
    # a resume resolves the flags against the run's saved config, not against another task's defaults
    base = saved_config(args.resume, preset and preset[0], file_values, overrides)
    config = resolve_config(args.preset, args.config_file, overrides, base=base)
    if args.print_config:
        print(json.dumps(config.task_dict(), indent=2))
        return 0
    # what the user asked for explicitly (file and flags, not a preset, not even the file's `preset:`):
    # a resume applies or refuses it; a preset given with a resume must be the run's own
    given = set(file_values) | set(overrides)
    changes = {k.replace("-", "_"): getattr(config, k.replace("-", "_")) for k in given}
    with log_to_stdout("softshare.train"):
        result = train(config, resume=args.resume, changes=changes, overwrite=args.overwrite,
                       preset=preset if args.resume else None)
    if result.run_dir is not None and not result.interrupted:
        if result.best_metric is not None:
            print(f"done: {result.run_dir} (checkpoints/best: epoch {result.best_epoch}, validation score "
                  f"{result.best_metric:.4f}, chosen on validation only; checkpoints/last: epoch {result.epochs_done})")
        else:
            print(f"done: {result.run_dir} (checkpoints/last: epoch {result.epochs_done}; no 'best' checkpoint: the "
                  f"run has no validation split to choose it on)")
    return 130 if result.interrupted else 0

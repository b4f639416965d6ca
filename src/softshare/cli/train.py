"""`softshare train`: train a model on an image dataset or an algorithmic task."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from ..errors import SoftshareError
from ..train.config import PRESETS, TrainConfig, load_config_file, resolve_config
from ..train.config_help import CUSTOM, FIELD_CHOICES, FIELD_HELP, FIELD_TASKS
from ..train.loop import train
from ._common import log_to_stdout


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", description="Train with defaults < --preset < --config file < flags. The run directory "
                             "runs/<name>/ gets the resolved config, metrics.jsonl, curves.png, train.log and "
                             "checkpoints/{last,best}. Several GPUs: torchrun --nproc-per-node N -m softshare "
                             "train ...",
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
    config, changes = config_from_args(args)
    if args.print_config:
        print(json.dumps(config.task_dict(), indent=2))
        return 0
    with log_to_stdout("softshare.train"):
        result = train(config, resume=args.resume, changes=changes)
    if result.run_dir is not None and not result.interrupted:
        best = f", best {result.best_metric:.4f}" if result.best_metric is not None else ""
        print(f"done: {result.run_dir}{best}")
    return 130 if result.interrupted else 0


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's config (the --config file read once), and what the user asked for explicitly
    (file and flags, not a preset, not even the file's `preset:`), which a resume applies or refuses."""
    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    file_values = load_config_file(args.config_file) if args.config_file else {}
    config = resolve_config(args.preset, args.config_file, flags, file_values=file_values)
    if config.task == CUSTOM:
        raise SoftshareError("task custom trains a model and data of your own: call softshare.fit(model, "
                             "train_data, ...) from Python; the command line trains classification, mazes or "
                             "prefix-sums")
    given = {k.replace("-", "_") for k in file_values} - {"preset"}
    return config, {k: getattr(config, k) for k in given | set(flags)}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--batch-size``...), defaulting to 'not given'; help, choices
    and tasks from `train.config_help`."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("config fields (override preset and --config)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tasks = FIELD_TASKS.get(f.name)
        where = f" [{', '.join(tasks)}]" if tasks else ""
        help_text = f"{FIELD_HELP[f.name]}{where} (default: {default})".replace("%", "%%")
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, dest=f.name, help=help_text)
        if f.name in FIELD_CHOICES:  # (task custom is softshare.fit's, from Python)
            kwargs["choices"] = [c for c in FIELD_CHOICES[f.name] if c != CUSTOM]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="*", type=args[0])
        elif hint is dict:
            kwargs.update(type=json.loads, metavar="JSON")
        else:
            kwargs["type"] = next((a for a in args if a is not type(None)), hint)
        group.add_argument(flag, **kwargs)

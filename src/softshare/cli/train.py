"""`softshare train`: train a model on an image dataset or an algorithmic task."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from ..errors import SoftshareError
from ..train.config import PRESETS, TrainConfig, config_layers, default_text, load_config_file, resolve_config
from ..train.config_help import CUSTOM, FIELD_CHOICES, FIELD_HELP, FIELD_TASKS
from ..train.loop import train
from ..train.resume import saved_config
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
    config, changes, preset = config_from_args(args)
    if args.print_config:
        print(json.dumps(config.task_dict(), indent=2))
        return 0
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


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any], tuple[str, dict] | None]:
    """The run's config (the --config file read once), what the user asked for explicitly (file
    and flags, not a preset, not even the file's `preset:`), which a resume applies or refuses, and
    the preset named (name, values), which a resume checks is the run's own. A resume resolves the
    flags against the run's saved config, not against the defaults of another task."""
    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    file_values = load_config_file(args.config_file) if args.config_file else {}
    layers = config_layers(args.preset, args.config_file, flags, file_values)
    preset = next(((source.removeprefix("preset "), values) for values, source in layers
                   if source.startswith("preset ")), None)
    given_file = next((values for values, source in layers if source == str(args.config_file)), {})
    base = saved_config(args.resume, preset and preset[0], given_file, flags)
    config = resolve_config(args.preset, args.config_file, flags, file_values=file_values, base=base)
    if config.task == CUSTOM:
        raise SoftshareError("task custom trains a model and data of your own: call softshare.fit(model, "
                             "train_data, ...) from Python; the command line trains classification, mazes or "
                             "prefix-sums")
    given = {k.replace("-", "_") for k in file_values} - {"preset"}
    return config, {k: getattr(config, k) for k in given | set(flags)}, preset


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--batch-size``...), defaulting to 'not given'; help, choices
    and tasks from `train.config_help`."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("config fields (override preset and --config)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        tasks = FIELD_TASKS.get(f.name)
        where = f" [{', '.join(tasks)}]" if tasks else ""
        help_text = f"{FIELD_HELP[f.name]}{where} ({default_text(f.name)})".replace("%", "%%")
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

"""One typed training config: defaults in code < task defaults < preset < YAML/JSON file < flags."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import SoftshareError, unknown_name
from .config_help import ALL_TASKS, CUSTOM, FIELD_CHOICES, FIELD_TASKS, applies


@dataclass
class TrainConfig:
    """Everything a run depends on. Saved resolved in the run directory and in every checkpoint.

    Defaults are the paper's CIFAR recipe (SGD + Nesterov, lr 0.1, batch 128, wd 5e-4 except
    on sharing coefficients, 200 epochs, lr x0.2 at 60/120/160).
    """

    # what to train
    task: str = "classification"  # classification | mazes | prefix-sums | custom (softshare.fit)
    # a registered model name; on mazes / prefix sums also the body (ff, shared, recurrent), which
    # `algorithmic.resolve_model_name` turns into the task's family; custom: the model's class
    model: str = "swrn_28_10_2"
    model_args: dict = field(default_factory=dict)  # extra create_model kwargs
    dataset: str = "cifar10"
    data_root: str | None = None
    download: bool = False
    val_size: int | None = None  # None: the dataset's default; 0: train on all, score test, keep no "best"
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam (L2 decay in the gradient, as DeepThinking) | adamw (decoupled)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine | constant
    lr_milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    lr_gamma: float = 0.2
    warmup_epochs: float = 0.0
    lr_reference_batch: int = 0  # > 0: lr is for this global batch, scaled linearly to batch_size x processes
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    recurrence_reg: float = 0.0  # weight of the pull towards collinear coefficients
    recurrence_reg_anneal: float = 0.0  # > 0: the weight falls linearly to 0 at this epoch
    recurrence_reg_start: float = 0.0  # the penalty's weight is 0 before this epoch
    recurrence_reg_warmup: float = 0.0  # > 0: from there the weight rises linearly from 0 over this many epochs
    recurrence_reach: int = 1  # the penalty pulls together layers up to this many blocks apart
    recurrence_signed: bool = False  # the penalty counts W and -W as opposite (1 - cos), not as one layer
    coef_lr_scale: float = 1.0  # sharing coefficients learn at lr x this
    coef_weight_decay: float = 0.0  # weight decay on sharing coefficients (the paper: none)
    ema_decay: float = 0.0  # exponential moving average of the weights; 0 = off
    # augmentation (image tasks)
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0  # side of the Cutout hole; 0 = off
    # ImageFolder (--dataset imagefolder): random-resized crop to image_size (train), resize + centre crop (val)
    image_size: int = 224
    workers: int = -1  # DataLoader worker processes per rank; -1: this node's cores / ranks, at most 16
    # algorithmic tasks
    train_size: int = 9  # maze side or bit-string length seen in training
    test_sizes: list[int] = field(default_factory=list)
    train_count: int = 10000
    test_count: int = 1000
    select_size: int = 0  # > 0: the best checkpoint thinks best at this size (held-out, stable rule)
    select_count: int = 200  # held-out instances at select_size
    width: int = 64
    depth: int = 8  # iterations the body runs in training (ff/shared: that many distinct iterations)
    num_templates: int = 2
    alpha: float = 0.0  # progressive-loss mix; 0 = plain full-depth loss
    random_state: float = 0.0  # fraction of training instances whose thought starts from a random state
    run_on: int = 0  # the progressive loss may run this many iterations past depth (ff/shared: the last repeated)
    run_on_fixed_mix: bool = False  # shared: those repeats use the last iteration's mix with its coefficients detached
    blocks: int = 2  # residual blocks per iteration (DeepThinking: 2)
    lipschitz: bool = False  # DT-L: spectrally normalised, 1-Lipschitz iterations (against overthinking)
    recall_relu: bool = True  # DeepThinking's ReLU after the recall conv; False: a linear recall
    head_convs: int = 3  # 3: DeepThinking's head (w -> w -> w/2 -> 2); 2: without its w -> w conv
    recall_init: str = "pytorch"  # pytorch | he | identity: how the recall convs start (ff: identity)
    lr_throttle: bool = False  # iteration weights learn at lr / depth (DeepThinking's maze recipe)
    grid: bool = False  # mazes: iterate at the maze grid's resolution, not the 2x image's (4.7x faster steps)
    # run and hardware
    name: str = ""
    out_dir: str = "runs"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | none
    channels_last: bool = True  # fastest on this CPU (fp32) and on CUDA with bf16
    compile: bool = False
    eval_every: int = 1
    lsm_every: int = 0
    checkpoint_every: int = 1
    logger: list[str] = field(default_factory=lambda: ["jsonl"])  # + csv | tensorboard | wandb
    log_every: int = 50  # TensorBoard / W&B: training loss and lr every N optimizer steps; 0 = off
    figure_format: str = "png"  # png | pdf | svg: curves and LSM figures

    def run_name(self) -> str:
        return self.name or f"{self.task}-{self.dataset if self.task == 'classification' else ''}-{self.model}".replace("--", "-")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def task_dict(self) -> dict:
        """The fields that mean something for this config's task (what --print-config shows)."""
        return {k: v for k, v in self.to_dict().items() if applies(k, self.task)}


_PAPER_CIFAR = dict(task="classification", epochs=200, batch_size=128, optimizer="sgd", lr=0.1,
                    momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="multistep",
                    lr_milestones=[60, 120, 160], lr_gamma=0.2, crop_padding=4, flip=True)


def _paper(dataset: str, model: str, cutout: bool) -> dict:
    return {**_PAPER_CIFAR, "dataset": dataset, "model": model, "cutout": 16 if cutout else 0}


PRESETS: dict[str, dict[str, Any]] = {
    **{f"{ds}_{m}{'_cutout' if c else ''}": _paper(ds, m, c)
       for ds in ("cifar10", "cifar100")
       for m, c in (("swrn_28_10_2", False), ("swrn_28_10_2", True), ("swrn_28_14_2", True),
                    ("swrn_28_10_1", False), ("wrn_28_10", False), ("wrn_28_10", True))},
    # CPU scale: a soft-shared WRN on real Fashion-MNIST images (docs/fashion_mnist.md: how long). 5,000 of
    # the 60,000 training images are held out: "best" is chosen on them, the test set is only scored.
    "fashion_mnist_cpu": dict(task="classification", dataset="fashion_mnist", model="swrn_22_1_2",
                              val_size=5000, epochs=10, batch_size=128, optimizer="sgd", lr=0.1,
                              weight_decay=5e-4, schedule="cosine", warmup_epochs=0.5,
                              label_smoothing=0.1, crop_padding=2, flip=True, cutout=0),
    # ImageNet (an ImageFolder: --data-root DIR with train/ and val/): the standard 90-epoch ResNet recipe
    # (Goyal et al. 2017): lr 0.1 per 256 images scaled to the global batch, 5 warm-up epochs, x0.1 at 30/60/80,
    # wd 1e-4 (none on coefficients); bf16 + channels-last on CUDA. --label-smoothing 0.1 is optional.
    **{f"imagenet_{m}": dict(task="classification", dataset="imagefolder", model=m, epochs=90, batch_size=256,
                             optimizer="sgd", lr=0.1, lr_reference_batch=256, momentum=0.9, nesterov=True,
                             weight_decay=1e-4, schedule="multistep", lr_milestones=[30, 60, 80], lr_gamma=0.1,
                             warmup_epochs=5.0, label_smoothing=0.0, flip=True, crop_padding=0, cutout=0,
                             image_size=224, amp="auto", channels_last=True)
       for m in ("swrn_50_2_2", "wrn_50_2", "swrn_50_2_1", "resnet_50", "sresnet_50_2")},
    # seconds-scale smoke run on scikit-learn's bundled digits (237 of its 1,437 training images held out)
    "digits_tiny": dict(task="classification", dataset="digits", model="swrn_22_1_2", val_size=237,
                        epochs=12, batch_size=64, lr=0.05, schedule="cosine", crop_padding=1,
                        flip=False, weight_decay=5e-4),
}


# The algorithmic tasks follow DeepThinking's recipe (aks2203/deep-thinking, Bansal et al. 2022), not
# the CIFAR one above: Adam lr 1e-3 with L2 weight decay 2e-4 (none on sharing coefficients), warm-up,
# step schedule, progressive loss. These replace the code defaults when the resolved task is one of
# them (a preset, file or flag still wins). docs/algorithmic.md says what each preset measured.
_ALGORITHMIC = dict(optimizer="adam", lr=1e-3, weight_decay=2e-4, schedule="multistep", lr_milestones=[],
                    lr_gamma=0.1, warmup_epochs=0.0, grad_clip=1.0, crop_padding=0, flip=False, cutout=0,
                    label_smoothing=0.0, model="recurrent", num_templates=2, alpha=1.0, depth=30, width=32,
                    blocks=2, channels_last=True)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # mazes with alpha 0.01 as DeepThinking, the CPU prefix-sums body (linear recall, 2-conv head),
    # no throttle, clip 1, and the net at the maze grid's resolution: DeepThinking's own recipe at
    # width 16 stayed at 0% exact match in 1,600 steps (seed 0); this body on the 2x image at width
    # 16 reached 13-38% in 20 epochs of 4,000 mazes; on the grid (4.7x faster steps, paths half as
    # many iterations long) width 32 fits 20 epochs of 10,000 mazes in ~25 minutes of one core and
    # solves 9x9 mazes (docs/algorithmic.md has every seed)
    "mazes": dict(_ALGORITHMIC, train_size=9, test_sizes=[9, 13, 17, 33, 59], train_count=10000,
                  test_count=100, width=32, batch_size=50, epochs=20, alpha=0.01, grad_clip=1.0,
                  warmup_epochs=2.0, lr_throttle=False, recall_relu=False, head_convs=2, grid=True,
                  select_size=13, select_count=50),
    # the prefix-sums recipe at width 32 (8,000 strings of 32 bits, batch 100, 30 iterations), with
    # what made width 32 learn in every seed on 2 CPU cores (docs/algorithmic.md, "Why"): one
    # residual block per iteration, a linear recall, a 2-conv head and lr 2e-3
    "prefix-sums": dict(_ALGORITHMIC, train_size=32, test_sizes=[32, 48, 64, 128, 256, 512], train_count=8000,
                        test_count=500, batch_size=100, epochs=30, warmup_epochs=2.0, blocks=1, lr=2e-3,
                        recall_relu=False, head_convs=2, select_size=128, select_count=200),
}
# softshare.fit: your model, data and loss; the recipe fields (optimizer, lr, epochs...) are yours to
# give. A constant lr unless a schedule is asked for, and your model's memory layout as it is.
TASK_DEFAULTS[CUSTOM] = dict(schedule="constant", lr_milestones=[], channels_last=False, dataset="")
PRESETS.update({
    "mazes_cpu": dict(TASK_DEFAULTS["mazes"], task="mazes"),
    "prefix_sums_cpu": dict(TASK_DEFAULTS["prefix-sums"], task="prefix-sums"),
    # DeepThinking's published settings on one GPU
    "mazes_gpu": dict(TASK_DEFAULTS["mazes"], task="mazes", width=128, depth=30, blocks=2, train_count=50000,
                      test_count=1000, batch_size=50, epochs=50, alpha=0.01, warmup_epochs=10.0,
                      lr_milestones=[100], lr_throttle=True, grad_clip=0.0, recall_relu=True, head_convs=3,
                      grid=False),
    "prefix_sums_gpu": dict(TASK_DEFAULTS["prefix-sums"], task="prefix-sums", width=400, depth=30, blocks=2,
                            recall_relu=True, head_convs=3, lr=1e-3, train_count=8000, val_size=2000,
                            test_count=1000, batch_size=100, epochs=150, lr_milestones=[60, 100],
                            warmup_epochs=5.0, alpha=1.0),
})


# A body's own recipe inside an algorithmic task's: it refines the task's defaults, so it applies
# to the fields that the config file and the flags leave unset and that the preset (if any) leaves
# at the task's default (`--preset prefix_sums_cpu --model ff` trains the ff body with what makes it
# learn; prefix_sums_gpu keeps its own width 400). Keyed by (task, body); bodies: ff, recurrent,
# shared_k1 and shared_kn (two or more templates). docs/algorithmic.md says what each measured.
BODY_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # The feed-forward control: its 30 distinct recall convs sit outside the residual path, so at
    # PyTorch's default scale the gradient vanishes over depth, and at He's scale 3 of 5 held-out
    # seeds (1000-1004) still crawled along a plateau; starting each recall conv as the identity on
    # the state makes the net a plain residual net at init (tuning and seen seeds: 9 of 10 at 100%,
    # the tenth 92%; He: 7 of 10 >= 95%). The progressive loss asks its head to read any depth of
    # distinct iterations (DeepThinking trains ff nets at alpha 0 too), and a cosine decay steadies
    # its 281k weights (docs/algorithmic.md)
    ("prefix-sums", "ff"): dict(alpha=0.0, recall_init="identity", schedule="cosine"),
    # Width 48 for the nets whose recurrence is built in: at width 32 a fifth to two fifths of seeds
    # sit on the plateau or learn a step that does not generalise (held-out seeds 5-9: 3 of 5 each);
    # at width 48 every tuning seed learned within 800 steps, and the recurrent net solves 512-bit
    # strings at >= 90% in 10 of 10 held-out seeds (2000-2009), 4-5 CPU-minutes each (k = 1: the docs)
    ("prefix-sums", "recurrent"): dict(width=48),
    # k = 1 learns a scale c_t per iteration, and at width 48 alone 4 of 10 held-out nets learned a
    # step that drifts when repeated (6 of 10 at >= 90% on 512 bits; slower scales: 6 of 10 again,
    # withdrawn). Starting half the strings from a random thought (path independence) asks the step
    # to work from any state: the four seeds that drifted then solved 512 bits (docs/algorithmic.md)
    ("prefix-sums", "shared_k1"): dict(width=48, random_state=0.5),
    # Two or more templates: without a pull towards recurrence nothing folds (0 of 15 nets of
    # k = 2 and 4; the coefficients hardly move from their start). The recurrence regulariser at 1
    # makes every tuning seed's net end in a loop, but neighbours-only it is met by a slow turn
    # (short loops) and, sign-blind, by loops whose step flips sign from iteration to iteration;
    # pulling layers up to 5 blocks apart together with 1 - cos (signed) gives loops of one step,
    # and half the strings start from a random state (path independence): tuning seeds 100-104 4 of
    # 5 at >= 90% on 512 bits, held out (6000-6004) 2 of 5. Most failures learned 32 bits but their
    # last block did not run on; the progressive loss's passes running up to 15 iterations past
    # depth, the last iteration repeated there (run_on, evaluated alike), fixed 4 of the 5 such
    # failures among 8 tuning seeds (6 of 8 at >= 90%, the default 3 of 8), but the nets answered
    # with a last layer of their own (|cos| < 0.99 to its neighbour): the repeats' gradient set its
    # mix apart. Detaching its coefficients in those repeats (run_on_fixed_mix: the templates still
    # learn from them) lets the last layer join its neighbours' loop, and with passes up to 30
    # past depth all 8 tuning nets end in a loop the fold found that solves 512 bits (15: 4 of 8).
    # The paper's orthogonal start is kept. Every lever, and how far each is from "discovered":
    # docs/algorithmic.md
    ("prefix-sums", "shared_kn"): dict(recurrence_reg=1.0, random_state=0.5, recurrence_reach=5,
                                       recurrence_signed=True, run_on=30, run_on_fixed_mix=True),
}


def body_defaults(config: TrainConfig, preset: dict[str, Any]) -> dict[str, Any]:
    """The body defaults that apply to `config` under `preset`'s values: all but the fields where the
    preset chose a value of its own (one that differs from the task's default)."""
    task_values = TASK_DEFAULTS.get(config.task, {})
    chosen = {key for key, value in preset.items() if key in task_values and task_values[key] != value}
    return {k: v for k, v in BODY_DEFAULTS.get((config.task, body_of(config)), {}).items() if k not in chosen}


def body_of(config: TrainConfig) -> str | None:
    """The algorithmic body a config trains (ff, recurrent, shared_k1, shared_kn), None for images."""
    if config.task not in TASK_DEFAULTS:
        return None
    body = config.model.rsplit("_", 1)[-1] if config.model.startswith(("prefix_", "maze_")) else config.model
    if body == "shared":
        return "shared_k1" if config.model_args.get("num_templates", config.num_templates) == 1 else "shared_kn"
    return body


def _coerce(name: str, value: Any) -> Any:
    """Check a value from a file or flag against the field's annotation. Nothing is converted that
    would change it: no float to int (1.7 is not 1), no bool to int, no string to list."""
    hint = typing.get_type_hints(TrainConfig)[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = hint if origin is None else (list if origin is list else next((a for a in args if a is not type(None)), hint))
    try:
        if base is list:
            if not isinstance(value, list):
                raise TypeError
            return [_exact(item, args[0] if args else str) for item in value]
        return _exact(value, base)
    except TypeError:
        raise SoftshareError(f"config field {name!r} expects {_type_name(hint)}, got {value!r}") from None


def _exact(value: Any, kind: type) -> Any:
    """`value` as `kind` when it is one (an int also as a float); else TypeError."""
    if kind is bool or isinstance(value, bool):
        if kind is bool and isinstance(value, bool):
            return value
        raise TypeError
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    if kind in (int, str, dict) and isinstance(value, kind):
        return value
    raise TypeError


def _type_name(hint: Any) -> str:
    """``int``, ``a list of int``, ``float or null``: a field's type as a user reads it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {args[0].__name__}" if args else "a list"
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return hint.__name__


def apply_overrides(config: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """A copy of `config` with `overrides` applied; unknown keys are an error naming `source`."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    clean = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise unknown_name(f"config key (in {source})", key, fields)
        clean[name] = _coerce(name, value)
    return dataclasses.replace(config, **clean)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read overrides from a .yaml/.yml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise SoftshareError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SoftshareError(f"cannot read config file {path} as UTF-8 text ({type(err).__name__}); give a YAML or "
                             f"JSON file of field: value lines") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except yaml.MarkedYAMLError as err:  # its text spans lines (a snippet of the file): one line here
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
        if "python/" in problem or "constructor for the tag" in problem:
            problem = "a tag softshare does not load (only plain values: numbers, strings, lists, mappings)"
        raise SoftshareError(f"cannot parse config file {path}{where}: {problem}") from None
    except (yaml.YAMLError, ValueError) as err:  # yaml and json raise different types; both mean the same
        raise SoftshareError(f"cannot parse config file {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise SoftshareError(f"config file {path} must hold a mapping of field: value")
    return data


def config_layers(preset: str | None = None, config_file: str | None = None,
                  overrides: dict[str, Any] | None = None,
                  file_values: dict[str, Any] | None = None) -> list[tuple[dict[str, Any], str]]:
    """[(values, source)] of the preset, the file and the flags, lowest priority first.

    The file may name a ``preset:`` of its own (used unless `preset` is given). `file_values`
    are the file's contents when the caller has read it already (`load_config_file`)."""
    file_values = dict(file_values if file_values is not None else load_config_file(config_file) if config_file
                       else {})
    if "preset" in file_values:  # a file may build on a preset; --preset on the command line wins
        named = file_values.pop("preset")
        if not isinstance(named, str):
            raise SoftshareError(f"config file {config_file}: preset must be a preset name, got {named!r}")
        preset = preset or named
    if preset and preset not in PRESETS:
        raise unknown_name("preset", preset, PRESETS)
    layers = [(PRESETS[preset], f"preset {preset}")] if preset else []
    if config_file:
        layers.append((file_values, str(config_file)))
    if overrides:
        layers.append((overrides, "command line"))
    return layers


def resolve_config(preset: str | None = None, config_file: str | None = None,
                   overrides: dict[str, Any] | None = None, file_values: dict[str, Any] | None = None,
                   base: TrainConfig | None = None) -> TrainConfig:
    """Defaults < task defaults (TASK_DEFAULTS, by the resolved task) < preset < body defaults
    (BODY_DEFAULTS, by the resolved task and body) < file < flags.

    The file may name a ``preset:`` of its own (used unless `preset` is given). `file_values`
    are the file's contents when the caller has read it already (`load_config_file`). `base` (a
    resumed run's saved config, already resolved) replaces the defaults, task and body defaults."""
    layers = config_layers(preset, config_file, overrides, file_values)
    config = base or TrainConfig()
    task = next((values["task"] for values, _ in reversed(layers) if "task" in values), config.task)
    if base is None and task in TASK_DEFAULTS:
        config = apply_overrides(config, TASK_DEFAULTS[task], f"{task} defaults")
    for values, source in layers:
        config = apply_overrides(config, values, source)
    body = body_defaults(config, next((values for values, source in layers if source.startswith("preset ")), {}))
    if body and base is None:
        given = {key.replace("-", "_") for values, source in layers if not source.startswith("preset ") for key in values}
        config = apply_overrides(config, {k: v for k, v in body.items() if k not in given},
                                 f"{config.task} {body_of(config)} defaults")
    validate(config)
    return config


def _range(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False):
    """(predicate, description) of a closed/open interval; None = unbounded on that side."""
    def ok(v: float) -> bool:
        return math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) \
            and (hi is None or (v < hi if hi_open else v <= hi))
    def num(x: float) -> str:
        return f"{int(x):,}" if x == int(x) else f"{x:g}"
    if lo is not None and hi is not None:
        what = f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
    else:
        what = f"{'>' if lo_open else '>='} {num(lo)}"
    return ok, what


_COUNT = 100_000_000  # more than any dataset here; larger is a typo (and an allocation of that size)
# Every numeric field's allowed values (lists: each element). Floats must also be finite.
RANGES: dict[str, tuple] = {
    "val_size": _range(0, _COUNT), "epochs": _range(1, 1_000_000), "batch_size": _range(1, 1 << 20),
    "lr": _range(0, None, lo_open=True), "momentum": _range(0, 1, hi_open=True),
    "weight_decay": _range(0, None), "lr_milestones": _range(0, 1_000_000), "lr_gamma": _range(0, 1, lo_open=True),
    "warmup_epochs": _range(0, 1_000_000), "lr_reference_batch": _range(0, 1 << 24),
    "label_smoothing": _range(0, 1), "grad_clip": _range(0, None),
    "recurrence_reg": _range(0, None), "recurrence_reg_anneal": _range(0, 1_000_000),
    "recurrence_reg_start": _range(0, 1_000_000), "recurrence_reg_warmup": _range(0, 1_000_000),
    "recurrence_reach": _range(1, 1_000_000),
    "coef_lr_scale": _range(0, None, lo_open=True), "coef_weight_decay": _range(0, None), "ema_decay": _range(0, 1, hi_open=True),
    "crop_padding": _range(0, 64), "cutout": _range(0, 1024), "image_size": _range(8, 4096),
    "workers": _range(-1, 256),
    "train_size": _range(1, 10_000), "test_sizes": _range(1, 10_000), "train_count": _range(1, _COUNT),
    "test_count": _range(1, _COUNT),
    "select_size": _range(0, 10_000), "select_count": _range(1, 1_000_000), "width": _range(1, 4096), "depth": _range(1, 10_000),
    "num_templates": _range(1, 1024), "alpha": _range(0, 1), "random_state": _range(0, 1), "run_on": _range(0, 100_000), "blocks": _range(1, 1000), "head_convs": _range(2, 3),
    "seed": _range(0, 2 ** 63 - 1),
    "eval_every": _range(1, 1_000_000), "lsm_every": _range(0, 1_000_000), "checkpoint_every": _range(1, 1_000_000),
    "log_every": _range(0, 1_000_000_000),
}
# The allowed values of the fields with choices are config_help.FIELD_CHOICES (also the CLI's choices).


def validate(config: TrainConfig) -> None:
    """Check every field's range and the combinations, before anything is written or built."""
    for name, (ok, what) in RANGES.items():
        value = getattr(config, name)
        for item in (value if isinstance(value, list) else [value]):
            if item is not None and not ok(item):
                finite = "" if math.isfinite(item) else " and finite"
                raise SoftshareError(f"{name} must be {what}{finite}, got {item!r}")
    for name, choices in FIELD_CHOICES.items():
        value = getattr(config, name)
        for item in (value if isinstance(value, list) else [value]):
            if item not in choices:
                raise SoftshareError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {item!r}")
    if config.name and (config.name in (".", "..") or "/" in config.name or "\\" in config.name):
        raise SoftshareError(f"name must be a plain directory name (no '/'), got {config.name!r}")
    if config.run_on and not config.alpha:
        raise SoftshareError(f"run_on ({config.run_on}) lengthens the progressive loss's passes, and alpha is 0 "
                             f"(no progressive loss): give --alpha > 0 or --run-on 0")
    if config.task == "classification" and re.fullmatch(r"ff|shared|recurrent|(maze|prefix)_\w+", config.model):
        raise SoftshareError(f"model {config.model!r} solves the algorithmic tasks; train it with --task mazes "
                             f"or --task prefix-sums")


def task_defaults(name: str) -> dict[str, Any]:
    """{task: the default of field `name` for that task} over the command line's tasks it applies to
    (what a run of each task gets with no preset, file or flag; `custom` is softshare.fit's)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    base = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    tasks = [task for task in FIELD_TASKS.get(name, ALL_TASKS) if task != CUSTOM] or ["classification"]
    return {task: TASK_DEFAULTS.get(task, {}).get(name, base) for task in tasks}


def default_text(name: str) -> str:
    """``default: 0.1`` or, where tasks differ, ``default: 0.1; mazes: 0.001; prefix-sums: 0.002``."""
    defaults = task_defaults(name)
    values = list(defaults.values())
    if all(v == values[0] for v in values) and not any(name in body for body in BODY_DEFAULTS.values()):
        return f"default: {values[0]}"
    items = [f"{value}" if task == "classification" else f"{task}: {value}" for task, value in defaults.items()]
    items += [f"{task} {body}: {values[name]}" for (task, body), values in BODY_DEFAULTS.items() if name in values]
    return "default: " + "; ".join(items)

"""What each TrainConfig field means, its choices and the tasks it applies to.

`train --help` and `--print-config` are generated from these tables, and a test checks that
every field has an entry, so a new field cannot appear undocumented. Validation of the values
stays in `config.validate`.
"""

from __future__ import annotations

from ..storage import FIGURE_FORMATS

CUSTOM = "custom"  # a model and data of the user's own, trained through softshare.fit
ALL_TASKS = ("classification", "mazes", "prefix-sums", CUSTOM)
IMAGE = ("classification",)
ALGORITHMIC = ("mazes", "prefix-sums")

# field -> one-line help
FIELD_HELP: dict[str, str] = {
    "task": "what to learn: image classification or an algorithmic task (custom: softshare.fit's own model "
            "and data, from Python)",
    "model": "registered model name (softshare models), e.g. swrn_28_10_2; algorithmic: ff, shared, recurrent",
    "model_args": "extra create_model arguments as JSON, e.g. '{\"num_templates\": 4}'",
    "dataset": "image dataset (cifar10, cifar100, fashion_mnist, mnist, digits...), or imagefolder: "
               "--data-root DIR with train/ and val/ class folders (ImageNet)",
    "data_root": "directory holding the dataset files or the task's data files (default: the dataset's usual "
                 "place; algorithmic: generate)",
    "download": "download the dataset if it is missing",
    "val_size": "training examples held out for validation, where 'best' is chosen (default: the dataset's, "
                "or test_count); 0: train on all, score the test set each epoch (test_* metrics) and keep no "
                "'best' checkpoint, only 'last'",
    "epochs": "passes over the training set",
    "batch_size": "examples per step (per process under torchrun)",
    "optimizer": "sgd (Nesterov momentum, the paper's), adam (weight decay as L2 in the gradient, as "
                 "DeepThinking), or adamw (torch AdamW: decoupled weight decay)",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum for SGD",
    "weight_decay": "L2 / decoupled weight decay; never applied to sharing coefficients",
    "schedule": "learning-rate schedule after warmup",
    "lr_milestones": "epochs where the multistep schedule multiplies lr by lr_gamma",
    "lr_gamma": "multistep decay factor",
    "warmup_epochs": "linear warmup length in epochs (fractions allowed)",
    "lr_reference_batch": "lr is for this global batch and is scaled linearly to batch_size x processes "
                          "(ImageNet: 256); 0 = lr as given",
    "label_smoothing": "cross-entropy label smoothing",
    "grad_clip": "clip the gradient norm to this; 0 = off",
    "recurrence_reg": "weight of the pull towards collinear coefficients (logged apart from the task loss)",
    "recurrence_reg_anneal": "> 0: the recurrence penalty's weight falls linearly to 0 at this epoch; 0: constant",
    "recurrence_reg_start": "the recurrence penalty is off before this epoch (the net learns its task as distinct "
                            "layers before the pull ties them together); 0: on from the start",
    "recurrence_reg_warmup": "> 0: from recurrence_reg_start the penalty's weight rises linearly from 0 over this many "
                             "epochs; 0: full at once",
    "recurrence_signed": "the recurrence penalty takes 1 - cos, so a layer and its negative are opposites (default: "
                         "1 - cos^2, sign ignored as the LSM ignores it)",
    "recurrence_reach": "the recurrence penalty pulls together layers of a role up to this many blocks apart (1: "
                        "neighbours only, which a net can satisfy by turning slowly; longer: directions that stay put)",
    "coef_lr_scale": "sharing coefficients learn at lr x this (templates at lr)",
    "coef_weight_decay": "weight decay on sharing coefficients (the paper uses none)",
    "ema_decay": "keep an exponential moving average of the weights with this decay (e.g. 0.999); "
                 "0 = off. Evaluated (ema_* metrics) and saved in checkpoints/ema",
    "crop_padding": "random-crop padding in pixels; 0 = no crop",
    "flip": "random horizontal flips",
    "cutout": "side of the Cutout hole in pixels; 0 = off",
    "image_size": "imagefolder: side of the random-resized training crop and of the centre-cropped val images",
    "workers": "imagefolder: DataLoader worker processes per rank; -1 = this node's cores / ranks, at most 16",
    "train_size": "maze side or bit-string length seen in training",
    "test_sizes": "sizes to evaluate on (larger than trained: extrapolation)",
    "train_count": "training examples to generate",
    "test_count": "test examples per size",
    "select_size": "pick the best checkpoint by exact match at the stable stopping rule on held-out instances "
                   "of this size (longer than trained: which epoch thinks longest), then by validation at the "
                   "training size, ties to the later epoch; 0: by validation at the training size",
    "select_count": "held-out instances at select_size",
    "width": "channels of the algorithmic nets",
    "depth": "iterations the algorithmic net runs in training (ff and shared: that many distinct iterations; "
             "recurrent: one iteration run that many times)",
    "num_templates": "templates in the bank of the shared algorithmic net",
    "alpha": "progressive-loss mix (0 = plain full-depth loss)",
    "run_on": "the progressive loss's passes may end up to this many iterations past depth, an ff or shared net "
              "repeating its last iteration there, so that the last step learns to be repeated (as a folded net "
              "repeats it when it thinks longer); 0: never past depth",
    "run_on_fixed_mix": "a shared net's repeats of its last iteration past depth (run_on) use that iteration's mix "
                        "with its coefficients detached: the templates learn from them, the last layer's own mix is "
                        "not pulled away from its neighbours', so that the last layer can fold into their loop "
                        "(nothing to do with run_on 0)",
    "random_state": "fraction of training instances whose thought starts from a random state instead of the "
                    "projection of the input (path independence); 0 = off",
    "blocks": "residual blocks per iteration of the algorithmic nets (DeepThinking: 2)",
    "lipschitz": "DT-L: spectrally normalised, 1-Lipschitz iterations (against overthinking)",
    "recall_relu": "the ReLU after the recall conv as DeepThinking (--no-recall-relu: a linear recall)",
    "head_convs": "convs in the output head: 3 as DeepThinking (w -> w -> w/2 -> 2), 2 without the w -> w one",
    "recall_init": "how the recall convs start: pytorch (PyTorch's default), he (fan-in, ReLU gain: the "
                   "gradient reaches every iteration of a feed-forward body; a tied body's state grows with it) or "
                   "identity (the state passed through unchanged, the input at PyTorch's default: each iteration "
                   "starts as a residual step; the ff default)",
    "lr_throttle": "iteration weights learn at lr / depth (DeepThinking's maze recipe)",
    "grid": "the maze net iterates at the maze grid's resolution (one pixel per 2x2 block of the image): "
            "4.7x faster steps at 9x9, and a path is half as many iterations long (--no-grid: the image's, "
            "as DeepThinking)",
    "name": "run name, the run directory is out_dir/name; empty: made from task, dataset and model",
    "out_dir": "parent directory of run directories",
    "seed": "random seed (data order, augmentation, initialisation)",
    "deterministic": "deterministic kernels (slower)",
    "device": "auto, cpu, cuda or cuda:N",
    "amp": "mixed precision: auto (bf16 on CUDA, off on CPU), bf16 or none",
    "channels_last": "channels-last memory format (fastest on CPU fp32 and CUDA bf16)",
    "compile": "torch.compile the model",
    "eval_every": "evaluate every N epochs (and after the last)",
    "lsm_every": "record the Layer Similarity Matrix every N epochs; 0 = off",
    "checkpoint_every": "save checkpoints/last every N epochs (and after the last)",
    "logger": "metric sinks besides metrics.jsonl (always written): csv, tensorboard, wandb",
    "log_every": "tensorboard/wandb: the training loss and lr every N optimizer steps (the epoch's metrics are "
                 "logged at every epoch); 0 = off",
    "figure_format": "format of the run's figures (curves, LSM): png, or vector pdf or svg for a paper",
}

FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "task": ALL_TASKS,
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("multistep", "cosine", "constant"),
    "amp": ("auto", "bf16", "none"),
    "recall_init": ("pytorch", "he", "identity"),
    "logger": ("jsonl", "csv", "tensorboard", "wandb"),
    "figure_format": FIGURE_FORMATS,
}

# fields that mean something for some tasks only (the rest apply to all)
FIELD_TASKS: dict[str, tuple[str, ...]] = {
    **{name: IMAGE for name in ("dataset", "download", "crop_padding", "flip", "cutout", "image_size", "workers")},
    "label_smoothing": (*IMAGE, CUSTOM),  # custom: of the default cross-entropy loss
    **{name: ALGORITHMIC for name in ("train_size", "test_sizes", "train_count", "test_count",
                                      "select_size", "select_count", "width", "depth",
                                      "num_templates", "alpha", "random_state", "run_on", "run_on_fixed_mix",
                                      "blocks", "lipschitz",
                                      "recall_relu", "head_convs", "recall_init", "lr_throttle")},
    "grid": ("mazes",),
}


def applies(field: str, task: str) -> bool:
    """Whether `field` means anything for `task` (what --print-config shows)."""
    return task in FIELD_TASKS.get(field, ALL_TASKS)

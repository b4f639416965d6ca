"""Data: image datasets as in-memory uint8 tensors with a loader that augments whole batches on
device (this package's modules; a new in-memory image source registers in `registry`), an
ImageFolder streamed from disk (`data.imagefolder`: `--dataset imagefolder`), and the algorithmic
tasks' data (`data.tasks`). Imports nothing of softshare but `errors` and `storage`."""

from .dataset import ImageDataset, channel_stats, split_indices
from .loader import BatchLoader
from .registry import DATASETS, canonical_name, default_data_root, load_dataset

__all__ = [
    "ImageDataset",
    "BatchLoader",
    "DATASETS",
    "load_dataset",
    "canonical_name",
    "default_data_root",
    "split_indices",
    "channel_stats",
]

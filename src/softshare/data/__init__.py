"""Image datasets as in-memory uint8 tensors, and a loader that augments whole batches on device."""

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

"""scikit-learn's bundled 8x8 handwritten digits: real images with no download, for fast tests."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import import_optional
from .dataset import ImageDataset, channel_stats, split_indices

TEST_SIZE = 360  # of 1797 images: a 1437/360 train/test split
VAL_SIZE = 237  # of the 1437 training images held out for validation by default: 1,200 left to train on
SPLIT_SEED = 0


def load_digits_dataset() -> ImageDataset:
    """The 1797 digits as uint8 (N, 1, 8, 8) images (0..16 scaled to 0..255), split with a fixed seed."""
    datasets = import_optional("sklearn.datasets", "the digits dataset needs scikit-learn: "
                                                   "pip install 'softshare[digits]' -c constraints.txt")
    bunch = datasets.load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = split_indices(len(labels), TEST_SIZE, SPLIT_SEED)
    train_x = images[train_idx]
    mean, std = channel_stats(train_x)
    return ImageDataset("digits", train_x, labels[train_idx], images[test_idx], labels[test_idx], 10,
                        mean, std, tuple(str(d) for d in range(10)), default_val_size=VAL_SIZE)

"""Algorithmic tasks of the easy-to-hard benchmark: mazes and prefix sums, generated offline.

`mazes` and `prefix_sums` generate numpy arrays, `files` saves and loads them (also the public
benchmark's own files), `datasets` hands the training code tensors from either source.
"""

from .datasets import maze_dataset, prefix_sum_dataset
from .files import (load_mazes, load_prefix_sums, maze_dir, maze_tensors, prefix_sum_dir,
                    prefix_sum_tensors, save_mazes, save_prefix_sums, write_mazes)
from .mazes import MAX_SIZE, MIN_SIZE, SPLITS, check_maze_args, generate_mazes, image_side
from .prefix_sums import DISTINCT_BELOW, check_prefix_sum_args, generate_prefix_sums, prefix_sum_inputs

__all__ = [
    "DISTINCT_BELOW", "MAX_SIZE", "MIN_SIZE", "SPLITS", "check_maze_args", "check_prefix_sum_args",
    "generate_mazes", "generate_prefix_sums", "image_side", "load_mazes", "load_prefix_sums",
    "maze_dataset", "maze_dir", "maze_tensors", "prefix_sum_dataset", "prefix_sum_dir",
    "prefix_sum_inputs", "prefix_sum_tensors", "save_mazes", "save_prefix_sums", "write_mazes",
]

"""Algorithmic tasks of the easy-to-hard benchmark: mazes and prefix sums, generated offline.

`mazes` and `prefix_sums` generate numpy arrays, `files` saves and loads them (also the public
benchmark's own files), `datasets` hands training and evaluation tensors from either source,
including which rows of a set a run trains, validates and is tested on.
"""

from .datasets import (IN_CHANNELS, evaluation_examples, examples, maze_dataset, prefix_sum_dataset,
                       selection_examples, validation_count)
from .files import (load_mazes, load_prefix_sums, maze_dir, maze_tensors, prefix_sum_dir,
                    prefix_sum_tensors, save_mazes, save_prefix_sums, write_mazes)
from .mazes import MAX_SIZE, MIN_SIZE, SPLITS, check_maze_args, generate_mazes, image_side
from .prefix_sums import DISTINCT_BELOW, check_prefix_sum_args, generate_prefix_sums, prefix_sum_inputs

__all__ = [
    "IN_CHANNELS", "examples", "evaluation_examples", "selection_examples", "validation_count",
    "DISTINCT_BELOW", "MAX_SIZE", "MIN_SIZE", "SPLITS", "check_maze_args", "check_prefix_sum_args",
    "generate_mazes", "generate_prefix_sums", "image_side", "load_mazes", "load_prefix_sums",
    "maze_dataset", "maze_dir", "maze_tensors", "prefix_sum_dataset", "prefix_sum_dir",
    "prefix_sum_inputs", "prefix_sum_tensors", "save_mazes", "save_prefix_sums", "write_mazes",
]

"""Evaluation: image classifiers (loss, top-1/top-5), algorithmic nets (exact match per size and
iteration; folded nets thinking longer), `evaluator_for` a run, and the figures of the results.
Label-free stopping rules and new curves belong in `algorithmic`/`plots`. Imports `checkpoint`,
`data`, `layers`, `device`; never `train` or `studies`."""

from .algorithmic import (
    default_iterations,
    evaluate_task_checkpoint,
    exact_match_by_iteration,
    exact_match_thinking_longer,
    longest_loop,
    score,
    solve_mask,
)
from .classification import (
    classifier_sums,
    evaluate_classifier,
    imagefolder_evaluator,
    summarise,
    test_set_evaluator,
)
from .plots import plot_accuracy_vs_iterations
from .run import Evaluator, evaluate_checkpoint, evaluator_for, run_config

__all__ = [
    "evaluate_classifier", "classifier_sums", "summarise", "test_set_evaluator", "imagefolder_evaluator",
    "score", "solve_mask", "exact_match_by_iteration", "exact_match_thinking_longer", "longest_loop",
    "default_iterations", "evaluate_task_checkpoint", "plot_accuracy_vs_iterations",
    "Evaluator", "evaluator_for", "evaluate_checkpoint", "run_config",
]

"""Evaluation, the one place a run is scored: image classifiers (loss, top-1/top-5), algorithmic
nets (exact match per size and iteration, the label-free stopping rules, a soft-shared net folded
to think longer: `evaluate_task`), `evaluator_for` a run and `evaluate_checkpoint`, and the
figures of the results. Studies, the demo and the CLI call these and only arrange and report.
Imports `checkpoint`, `data`, `fold`, `layers`, `device`; never `train` or `studies`."""

from .algorithmic import (
    LEARNED,
    STOP_PATIENCE,
    TaskEvaluation,
    default_iterations,
    evaluate_task,
    evaluate_task_checkpoint,
    exact_match_by_iteration,
    solve_mask,
    solved,
    think,
    thinking_net,
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
    "solve_mask", "solved", "think", "exact_match_by_iteration", "default_iterations", "thinking_net",
    "evaluate_task", "TaskEvaluation", "evaluate_task_checkpoint", "LEARNED", "STOP_PATIENCE",
    "plot_accuracy_vs_iterations", "Evaluator", "evaluator_for", "evaluate_checkpoint", "run_config",
]

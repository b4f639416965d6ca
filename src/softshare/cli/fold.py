"""`softshare fold RUN_OR_CHECKPOINT --out DIR`: turn collinear shared blocks into explicit loops."""

from __future__ import annotations

import argparse

from ..checkpoint import find_checkpoint, load, load_checkpoint, save_checkpoint
from ..errors import SoftshareError
from ..eval import evaluator_for
from ..fold import DEFAULT_THRESHOLD, DEFAULT_THRESHOLDS, count_parameters, fold_model, loop_blocks, set_iterations, sweep
from ..fold.report import pick_metric, sweep_table, write_fold_report, write_sweep
from ..storage import atomic_path, check_output, mark_output
from ._common import add_figure_format, add_overwrite, log_to_stdout, positive_int, similarity



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fold", description="Group consecutive soft-shared blocks whose coefficient vectors are pairwise |cos| >= "
                    "threshold (for every shared layer of the block), rebuild each group as one block run in "
                    "a loop, and save the folded model as a checkpoint in DIR with fold_report.json/.md. "
                    "Blocks that fold with no neighbour become plain blocks (loops of length 1).")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (best checkpoint, else last), checkpoint directory or model.safetensors")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="output: the folded checkpoint and its report (with --sweep: the sweep table and curve)")
    add_overwrite(p, "--out")
    p.add_argument("--threshold", type=similarity, default=DEFAULT_THRESHOLD,
                   help=f"similarity threshold in (0, 1] (default {DEFAULT_THRESHOLD})")
    p.add_argument("--sweep", action="store_true",
                   help="instead of one fold, tabulate parameters (and accuracy with --data) over --thresholds")
    p.add_argument("--thresholds", type=similarity, nargs="+", default=None, metavar="T",
                   help=f"thresholds for --sweep (default {' '.join(f'{t:g}' for t in DEFAULT_THRESHOLDS)})")
    p.add_argument("--data", metavar="NAME", help="evaluate before/after folding on this dataset")
    p.add_argument("--device", default="auto", help="device for evaluation: auto, cpu, cuda, cuda:N")
    p.add_argument("--iterations", type=positive_int, nargs="+", default=[], metavar="N",
                   help="with --data, also evaluate the folded model with its loops run N times")
    add_figure_format(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.iterations and not args.data:
        raise SoftshareError("--iterations only changes accuracy; give --data NAME to evaluate")
    source = find_checkpoint(args.path)
    out = check_output(args.out, "fold", overwrite=args.overwrite, protect=[source])
    checkpoint = load_checkpoint(source, train_state=False)
    model, meta = load(checkpoint), checkpoint.meta
    evaluate = evaluator_for(meta.get("config"), args.device, dataset=args.data) if args.data else None
    before = dict(evaluate(model)) if evaluate else None
    if args.sweep:
        with log_to_stdout("softshare.fold"):  # a line per threshold folded (and evaluated)
            rows = sweep(model, args.thresholds or DEFAULT_THRESHOLDS, evaluate)
        with atomic_path(out, keep_foreign=True) as tmp:  # appears at once, replacing only the old one's files
            written = [out / p.relative_to(tmp) for p in write_sweep(rows, tmp, count_parameters(model), before,
                                                                      args.figure_format)]
            mark_output(tmp, "fold")
        print(sweep_table(rows, count_parameters(model), pick_metric(before)))
        print("wrote " + ", ".join(map(str, written)))
        return 0
    result = fold_model(model, args.threshold)
    metrics = {}
    if evaluate:
        metrics = {"original": before, "folded": dict(evaluate(result.model))}
        if args.iterations and not any(loop.length > 1 for _, loop in loop_blocks(result.model)):
            print("no loop longer than 1 at this threshold: --iterations changes nothing")
        for count in args.iterations:
            set_iterations(result.model, count)
            metrics[f"folded, loops run {count} times"] = dict(evaluate(result.model))
        set_iterations(result.model, None)
    with atomic_path(out, keep_foreign=True) as tmp:  # appears at once, replacing only the old one's files
        save_checkpoint(tmp, result.model, config=meta.get("config"), epoch=meta.get("epoch"),
                        metrics=metrics.get("folded"))
        written = [out / p.relative_to(tmp) for p in write_fold_report(result, tmp, source=str(source), metrics=metrics)]
        mark_output(tmp, "fold")
    print(f"loops per site at threshold {args.threshold}: {result.loops}")
    print(f"parameters: {result.params_before:,} -> {result.params_after:,}")
    for label, values in metrics.items():
        print(f"{label}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float)))
    print(f"wrote folded checkpoint {out} and " + ", ".join(map(str, written)))
    return 0

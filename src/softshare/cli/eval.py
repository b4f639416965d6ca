"""`softshare eval`: score a trained model on its test set."""

from __future__ import annotations

ORDER = 35


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="loss and top-1/top-5 error (or task exact-match) on the test set",
                              description="Evaluate a run directory or checkpoint on the test set.")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--data", help="dataset name (default: the one it was trained on)")
    p.add_argument("--data-root", help="where the dataset files are")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, dataset=args.data, data_root=args.data_root,
                                 download=args.download, device=args.device, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['checkpoint']} on {result['dataset']} test set ({result['count']} images): "
              f"loss {result['loss']:.4f}  top-1 error {100 * result['top1_error']:.2f}%  "
              f"top-5 error {100 * result['top5_error']:.2f}%")
    return 0

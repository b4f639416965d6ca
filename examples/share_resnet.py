"""share() on a ResNet-18 you did not write, then tie, unshare and export.

Uses torchvision's resnet18 when torchvision is installed, otherwise the same architecture
written out below (11,689,512 parameters either way).

    python examples/share_resnet.py --out /tmp/resnet   # 18 s (14 s of CPU), measured below

Measured 2026-12-02 on the project's 2-core AMD EPYC machine at load average ~6.5 (other jobs
running): 18.0 s of wall time, 14.2 s of CPU time, torch 2.13.0+cpu.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

import softshare


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 if available, else the same layout built from nn.Sequential."""
    try:
        from torchvision.models import resnet18 as tv_resnet18
        return tv_resnet18(num_classes=num_classes)
    except ImportError:
        pass

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                               if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(out + self.downsample(x))

    stages, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages.append(nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))
        cin = cout
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/share_resnet"))
    parser.add_argument("-k", type=int, default=2, help="templates per bank")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = resnet18().eval()

    # 1. what share() would do, then do it (starting from the trained weights: truncated SVD)
    print(softshare.share(original, args.k, dry_run=True))
    model = softshare.share(copy.deepcopy(original), args.k, init_from_weights=True).eval()

    # 2. tie: layers of a bank whose coefficient vectors agree get one weight and a scale
    result = softshare.tie(copy.deepcopy(model), threshold=0.99)
    print(result.summary())

    # 3. unshare: plain nn.Conv2d again, same outputs, exportable anywhere
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        shared_out = model(x)
    plain = softshare.unshare(copy.deepcopy(model))
    with torch.no_grad():
        print(f"unshare: max |difference| {(plain(x) - shared_out).abs().max().item():.2e}")

    # 4. export: the shared net in eval mode directly, the unshared one with TorchScript too
    args.out.mkdir(parents=True, exist_ok=True)
    torch.jit.trace(model, x).save(str(args.out / "shared_traced.pt"))
    torch.export.save(torch.export.export(model, (x,)), str(args.out / "shared.pt2"))
    torch.jit.script(plain).save(str(args.out / "unshared_scripted.pt"))
    try:
        torch.onnx.export(model, (x,), str(args.out / "shared.onnx"), dynamo=False)
    except Exception as err:  # onnx not installed: pip install 'softshare[export]'
        print(f"ONNX skipped: {err}")

    # 5. save the shared model; load it into a freshly built plain ResNet-18
    softshare.save_checkpoint(args.out / "checkpoint", model)
    fresh = resnet18()
    softshare.load_into(fresh, args.out / "checkpoint")
    with torch.no_grad():
        print(f"reloaded: max |difference| {(fresh.eval()(x) - shared_out).abs().max().item():.2e}")
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}")


if __name__ == "__main__":
    main()

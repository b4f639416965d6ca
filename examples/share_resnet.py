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
import sys
from pathlib import Path

import torch
from torch import nn

import softshare


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, with its module names (conv1, bn1, ..., downsample)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout and module names (conv1, bn1, layer1-4, fc): 11,689,512
    parameters at 1000 classes, so a checkpoint of one loads into the other."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for index, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 if it is installed, else `ResNet18` above. A torchvision that is
    installed but fails to import (a wheel built for another torch) stops the script with one line."""
    try:
        from torchvision.models import resnet18 as tv_resnet18
    except ImportError:
        return ResNet18(num_classes)
    except Exception as err:  # noqa: BLE001 - a broken install raises anything (RuntimeError, OSError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"share_resnet.py: error: torchvision is installed but fails to import ({type(err).__name__}: "
              f"{first}); repair or uninstall it (this example then uses its own ResNet-18)", file=sys.stderr)
        raise SystemExit(2) from None
    return tv_resnet18(num_classes=num_classes)


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
    try:
        main()
    except softshare.SoftshareError as err:  # a bad input or a broken optional package: one line, exit 2
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

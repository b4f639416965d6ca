"""A model of your own with soft-shared layers: one bank of templates feeds several convs.

    python examples/custom_model.py            # 300 steps on one random batch (see below for how long)
    python examples/custom_model.py --steps 5  # what the test runs

Measured 2026-12-02 on the project's 2-core AMD EPYC machine, busy (load average 4.5-6.7 from
other jobs): 300 steps took 390 s of wall time and 197 s of CPU time (torch 2.13.0+cpu, both
threads); on an idle machine expect well under the CPU time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import softshare


class SharedCNN(nn.Module):
    """A stem, then `depth` residual 3x3 convs that all mix their weights from one bank of k templates."""

    def __init__(self, width: int = 32, depth: int = 6, num_templates: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bank = softshare.TemplateBank(num_templates, (width, width, 3, 3))
        self.convs = nn.ModuleList(softshare.SharedConv2d(self.bank, padding=1) for _ in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)
        softshare.init_coefficients(self.convs)  # orthogonal coefficient vectors, as in the paper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for conv, norm in zip(self.convs, self.norms):
            x = x + conv(torch.relu(norm(x)))
        return self.head(x.mean((2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SharedCNN()
    params = sum(p.numel() for p in model.parameters())
    print(f"{params:,} parameters; 6 separate convs would need "
          f"{params - model.bank.templates.numel() - 6 * 3 + 6 * 32 * 32 * 9:,}")
    # weight decay everywhere except on the sharing coefficients (the paper's recipe)
    optimizer = torch.optim.SGD(softshare.param_groups(model, weight_decay=5e-4), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))  # one batch to memorise
    for step in range(args.steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"loss after {args.steps} steps: {loss.item():.3f}")
    for lsm in softshare.layer_similarity(model):  # which layers have become the same layer
        print(f"LSM of {lsm.bank} (|cos| between the convs' coefficient vectors):")
        print(lsm.matrix.numpy().round(2))


if __name__ == "__main__":
    try:
        main()
    except softshare.SoftshareError as err:  # a bad input or a broken optional package: one line, exit 2
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

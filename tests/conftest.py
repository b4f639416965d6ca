"""Fixtures used by more than one test module (a library module's tests and the CLI's)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import RefSWRN, _collinear_swrn, _reference_file
from softshare import create_model


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    torch.manual_seed(0)
    net = RefSWRN(16, 2, 2).eval()
    tmp = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as monkeypatch:
        path = _reference_file(tmp / "checkpoint.pth.tar", net, monkeypatch, tmp / "pwned")
    return net, path, tmp / "pwned"


@pytest.fixture(scope="module")
def collinear() -> nn.Module:
    return _collinear_swrn()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("swrn_22_1_2")  # 2 shared blocks per stage: 4 layers per bank

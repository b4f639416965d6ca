"""Fixtures used by more than one test module (a library module's tests and the CLI's), and the
`--device` option that runs the device-parametrised tests on a GPU:

    pytest -m device --device cuda     # what benchmarks/gpu_check.py runs on a lent GPU

Every test that takes the `device` fixture is marked `device`; by default it runs on the CPU,
so CPU CI keeps running the same code paths the GPU check runs on CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

# One torch thread in the tests and the processes they start: their tensors are tiny, so a second
# thread buys nothing, and on a machine shared with other jobs it costs a lot (one test took 55 s
# with two threads under load and 4 s with one). Results are checked against references computed
# the same way, never against a thread count.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

from helpers import RefSWRN, _collinear_swrn, _reference_file, make_imagefolder
from softshare import create_model


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="device of the tests that take the `device` fixture: cpu (default), cuda or cuda:N")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: takes the `device` fixture (run on a GPU with --device cuda)")
    spec = config.getoption("--device")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise pytest.UsageError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda was given but no CUDA GPU is visible")
        # Deterministic cuBLAS needs this before the first cuBLAS handle exists (exact resume tests).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type != "cpu":
        raise pytest.UsageError(f"--device {spec!r}: only cpu and cuda are supported")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device under test (`--device`, default cpu)."""
    return torch.device(request.config.getoption("--device"))


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


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory) -> Path:
    """A tiny ImageFolder: 4 classes x (48 train + 16 val) 40 px JPEGs (tests/helpers.make_imagefolder)."""
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))

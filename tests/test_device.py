"""The device-dependent paths on `--device` (cpu by default; `pytest -m device --device cuda` on a GPU).

benchmarks/gpu_check.py runs exactly these tests on CUDA. What "exact" means here:

* against an independent float64 CPU reference (weights mixed with einsum, F.conv2d), the error
  relative to the output's largest magnitude is below 1e-4 in fp32 (TF32 off) and 3e-2 under
  bf16 autocast; folding is compared in float64 on the device itself (1e-10);
* a checkpoint round trip and an interrupted-then-resumed training run are bit-for-bit equal
  to the original, with deterministic algorithms on (`deterministic=True`:
  ``torch.use_deterministic_algorithms``, cuDNN benchmark off; on CUDA also
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, set by conftest.py before cuBLAS starts).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import softshare
from softshare.train.config import TrainConfig, resolve_config
from softshare.train.loop import StopFlag, train

TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # max |error| / max |reference|


@contextlib.contextmanager
def exact_kernels(device: torch.device) -> Iterator[None]:
    """fp32 without TF32 and deterministic cuDNN algorithms on CUDA (restored on exit)."""
    if device.type != "cuda":
        yield
        return
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


@pytest.fixture
def restore_global_flags() -> Iterator[None]:
    """train() sets torch-wide determinism/cuDNN flags; put them back for the tests that follow."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


def scaled_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.detach().double().cpu() - expected).abs().max() / expected.abs().max()).item()


def mixed(layer: softshare.SharedLayer, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The layer's weight mixed on the CPU independently of the library."""
    return torch.einsum("k,k...->...", layer.coefficients.detach().cpu().to(dtype),
                        layer.bank.templates.detach().cpu().to(dtype))


def on(device: torch.device, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -- shared layers against F.conv2d on the mixed weight ------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shared_conv_matches_conv_on_mixed_weight(device, precision, channels_last):
    torch.manual_seed(0)
    bank = softshare.TemplateBank(3, (32, 16, 3, 3))
    layers = nn.ModuleList([softshare.SharedConv2d(bank, padding=1, bias=True),
                            softshare.SharedConv2d(bank, stride=2, padding=1)])
    with torch.no_grad():
        for layer in layers:
            layer.coefficients.normal_()
        layers[0].bias.normal_()
    x = torch.randn(4, 16, 12, 12)
    expected = [F.conv2d(x.double(), mixed(layer), None if layer.bias is None else layer.bias.detach().double(),
                         layer.stride, layer.padding) for layer in layers]
    layers.to(device)
    if channels_last:
        softshare.to_channels_last(layers)
    with exact_kernels(device), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        got = [layer(on(device, x, channels_last)) for layer in layers]
    for out, ref in zip(got, expected):
        assert out.device.type == device.type
        assert out.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert scaled_error(out, ref) < TOLERANCE[precision]


# -- bank gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bank_gradients_match_reference(device, channels_last):
    torch.manual_seed(1)
    bank = softshare.TemplateBank(2, (8, 8, 3, 3))
    layers = nn.ModuleList([softshare.SharedConv2d(bank, padding=1) for _ in range(3)])
    softshare.init_coefficients(layers)
    x = torch.randn(2, 8, 10, 10)
    templates = bank.templates.detach().double().requires_grad_()
    coefficients = [layer.coefficients.detach().double().requires_grad_() for layer in layers]
    h = x.double()
    for c in coefficients:
        h = torch.tanh(F.conv2d(h, torch.einsum("k,k...->...", c, templates), padding=1))
    h.pow(2).sum().backward()

    layers.to(device)
    if channels_last:
        softshare.to_channels_last(layers)
    h = on(device, x, channels_last)
    with exact_kernels(device):
        for layer in layers:
            h = torch.tanh(layer(h))
        h.pow(2).sum().backward()
    assert bank.templates.grad.device.type == device.type
    assert bank.templates.grad.stride() == bank.templates.stride()  # the templates' own layout
    assert scaled_error(bank.templates.grad, templates.grad) < TOLERANCE["fp32"]
    for layer, c in zip(layers, coefficients):
        assert scaled_error(layer.coefficients.grad, c.grad) < TOLERANCE["fp32"]


# -- folding -----------------------------------------------------------------------------------------
def test_fold_is_exact_on_device(device):
    """Exactly collinear blocks fold into loops with the same outputs (float64 on the device)."""
    torch.manual_seed(0)
    model = softshare.create_model("swrn_28_1_2").double()
    with torch.no_grad():
        blocks = model.stages[0].blocks
        for offset, scale in enumerate([1.0, -2.5, 0.3]):
            blocks[1 + offset].conv1.coefficients.copy_(blocks[1].conv1.coefficients * scale)
            blocks[1 + offset].conv2.coefficients.copy_(blocks[1].conv2.coefficients * (-1.3 * scale))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model = model.to(device).eval()
    result = softshare.fold_model(model, 1.0)
    assert result.loops[0] == [3]
    folded = result.model.to(device)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, device=device)
    with exact_kernels(device), torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


# -- checkpoints -------------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_bitwise(device, tmp_path):
    torch.manual_seed(0)
    model = softshare.to_channels_last(softshare.create_model("swrn_16_1_2").to(device))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    path = softshare.save_checkpoint(tmp_path / "ck", model)
    loaded = softshare.to_channels_last(softshare.load(path, device=device))
    assert all(p.device.type == device.type for p in loaded.parameters())
    x = on(device, torch.randn(2, 3, 32, 32), True)
    with exact_kernels(device), torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# -- training: bf16 + channels-last, compiled or not; exact resume -----------------------------------
TINY = dict(dataset="digits", model="swrn_16_1_2", val_size=0, batch_size=64, lr=0.05, schedule="cosine",
            crop_padding=1, flip=False, eval_every=1)


def tiny(out: Path, device: torch.device, **overrides) -> TrainConfig:
    return resolve_config("digits_tiny", overrides={**TINY, "device": str(device), "out_dir": str(out),
                                                    "name": "run", **overrides})


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_short_training_bf16_channels_last(device, tmp_path, compiled, monkeypatch, restore_global_flags):
    if compiled and device.type == "cpu":
        # Inductor's C++ build takes ~1 min on 2 cores; aot_eager traces the same graphs (dynamo and
        # AOT autograd through the bank) without code generation. CUDA runs the real inductor.
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    result = train(tiny(tmp_path, device, epochs=2, amp="bf16", channels_last=True, compile=compiled))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result.final_metrics["val_acc"] > 0.3  # 10 classes: chance is 0.1
    assert all(p.device.type == device.type for p in result.model.parameters())
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert ("CUDA" in info["device"]) == (device.type == "cuda")


class StopAfter(StopFlag):
    """Behaves like a SIGTERM arriving after `steps` optimizer steps."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.remaining = steps

    @property
    def requested(self) -> bool:
        self.remaining -= 1
        return self.remaining < 0

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


def test_interrupted_and_resumed_training_is_bitwise_identical(device, tmp_path, restore_global_flags):
    """amp auto: bf16 autocast on CUDA, fp32 on CPU; deterministic algorithms on."""
    straight = train(tiny(tmp_path / "a", device, epochs=2, deterministic=True))
    stopped = train(tiny(tmp_path / "b", device, epochs=2, deterministic=True), stop=StopAfter(30))
    assert stopped.interrupted  # 22 batches per epoch: stopped in epoch 2
    resumed = train(tiny(tmp_path / "b", device, epochs=2, deterministic=True), resume="auto")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []

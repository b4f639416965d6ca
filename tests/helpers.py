"""Builders shared by several test modules (fixtures built from them are in conftest.py)."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from softshare import create_model, share
from softshare.train.config import resolve_config
from softshare.train.loop import StopFlag


# -- the device-parametrised tests (`device` fixture; `pytest -m device --device cuda` on a GPU) --------
# What "exact" means on a device: against an independent float64 CPU reference, the error relative
# to the output's largest magnitude is below 1e-4 in fp32 (TF32 off) and 3e-2 under bf16 autocast;
# folding is compared in float64 on the device itself (1e-10); a checkpoint round trip and an
# interrupted-then-resumed run are bit-for-bit equal, with deterministic algorithms on
# (`deterministic=True`: torch.use_deterministic_algorithms, cuDNN benchmark off; on CUDA also
# CUBLAS_WORKSPACE_CONFIG=:4096:8, set by conftest.py before cuBLAS starts). docs/gpu.md.
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


def on(device: torch.device, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """`x` on `device`, channels-last if asked."""
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class RefBank(nn.Module):
    def __init__(self, k: int, channels: int):
        super().__init__()
        self.templates = nn.Parameter(torch.randn(k, channels, channels, 3, 3) * 0.05)


class RefSConv2d(nn.Module):
    def __init__(self, bank: RefBank):
        super().__init__()
        self.bank = bank
        self.coefficients = nn.Parameter(torch.randn(bank.templates.shape[0], 1, 1, 1, 1))

    def forward(self, x):
        return F.conv2d(x, (self.bank.templates * self.coefficients).sum(0), padding=1)


class RefBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bank: RefBank | None = None):
        super().__init__()
        self.bank = bank
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = RefSConv2d(bank) if bank else nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = RefSConv2d(bank) if bank else nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        residual = x if self.equal else out  # a projecting block reads the pre-activated input
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + (self.convShortcut(residual) if self.convShortcut is not None else residual)


class RefSWRN(nn.Module):
    def __init__(self, depth: int, width: int, k: int | None, num_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv_3x3 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for s, stride in zip((1, 2, 3), (1, 2, 2)):
            bank = RefBank(k, channels[s]) if k else None
            if bank is not None:
                setattr(self, f"bank_{s}", bank)
            blocks = [RefBlock(channels[s - 1], channels[s], stride)]
            blocks += [RefBlock(channels[s], channels[s], 1, bank) for _ in range(n - 1)]
            setattr(self, f"stage_{s}", nn.Sequential(*blocks))
        self.lastact = nn.Sequential(nn.BatchNorm2d(channels[3]), nn.ReLU())
        self.classifier = nn.Linear(channels[3], num_classes)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "templates" not in name:
                    p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(7)

    def forward(self, x):
        x = self.stage_3(self.stage_2(self.stage_1(self.conv_3x3(x))))
        return self.classifier(F.avg_pool2d(self.lastact(x), 8).flatten(1))


class DataParallelLike(nn.Module):  # gives the `module.` prefix of nn.DataParallel
    def __init__(self, net: nn.Module):
        super().__init__()
        self.module = net


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _reference_file(path, net, monkeypatch, marker, zipfile=True):
    """torch.save what the reference main.py saves, plus objects whose unpickling would run code."""

    class RecorderMeter:
        def __init__(self, epochs):
            self.total_epoch, self.current_epoch = epochs, 3
            self.epoch_losses = np.zeros((epochs, 2), dtype=np.float32) - 1
            self.epoch_accuracy = np.arange(epochs * 2, dtype=np.float32).reshape(epochs, 2)

    class Payload:
        def __init__(self, fn, arg):
            self.fn, self.arg = fn, arg

        def __reduce__(self):
            return self.fn, (self.arg,)

    RecorderMeter.__module__, RecorderMeter.__qualname__ = "utils", "RecorderMeter"
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    net(X.float()).sum().backward()
    opt.step()
    net.zero_grad()
    wrapped = DataParallelLike(net)
    obj = {"epoch": 3, "arch": "swrn", "state_dict": wrapped.state_dict(), "optimizer": opt.state_dict(),
           "recorder": RecorderMeter(5), "curve": np.linspace(0, 1, 4),
           "payload": Payload(os.system, f"touch {marker}"),
           "payload2": Payload(eval, f"open({str(marker)!r}, 'w')")}
    with monkeypatch.context() as patch:  # `utils` exists only while saving, as on the author's machine
        utils = types.ModuleType("utils")
        utils.RecorderMeter = RecorderMeter
        patch.setitem(sys.modules, "utils", utils)
        torch.save(obj, path, _use_new_zipfile_serialization=zipfile)
    return path


# swrn_28_1_2: widths 16/32/64, 4 blocks per stage, blocks 1-3 share the stage's bank of k=2.
SCALES = {0: [1.0, -2.5, 0.3], 1: [0.7, 1.9]}  # stage -> scales of blocks 1.. (stage 2 stays random)


def _collinear_swrn() -> nn.Module:
    """float64 swrn_28_1_2 in eval mode: stage 0 blocks 1-3 and stage 1 blocks 1-2 exactly collinear
    (per role, positive and negative scales), every BatchNorm with non-trivial statistics."""
    torch.manual_seed(0)
    model = create_model("swrn_28_1_2").double()
    with torch.no_grad():
        for stage, scales in SCALES.items():
            blocks = model.stages[stage].blocks
            for offset, scale in enumerate(scales):
                blocks[1 + offset].conv1.coefficients.copy_(blocks[1].conv1.coefficients * scale)
                blocks[1 + offset].conv2.coefficients.copy_(blocks[1].conv2.coefficients * (-1.3 * scale))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _make_collinear(model, stage: int, blocks: list[int]) -> None:
    """Give `blocks` of one stage scaled copies of the first one's conv1/conv2 coefficients."""
    stage_blocks = model.stages[stage].blocks
    with torch.no_grad():
        for role in ("conv1", "conv2"):
            first = getattr(stage_blocks[blocks[0]], role).coefficients
            for scale, b in zip((-2.0, 0.5, 3.0), blocks[1:]):
                getattr(stage_blocks[b], role).coefficients.copy_(scale * first)


TINY = dict(task="mazes", model="recurrent", width=4, depth=2, train_count=40, test_count=8, batch_size=10,
            epochs=2, seed=3, test_sizes=[9, 11], deterministic=True, device="cpu")


def tiny(tmp_path, **fields):
    return resolve_config(overrides={**TINY, "out_dir": str(tmp_path), **fields})


TOY = dict(train_count=200, test_count=8, test_sizes=[32, 40], width=4, depth=2, num_templates=2, epochs=1,
           recurrence_reg=1.0)


class Foreign(nn.Module):
    """A CNN softshare knows nothing about: convs of four 2-D shapes, a Conv1d, a conv with bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # (8, 3, 3, 3): 216
        self.block1 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False),  # (8, 8, 3, 3): 576
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False, padding_mode="reflect"),  # 576
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding="same", bias=True),  # 576 + bias 8
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),  # (16, 8, 3, 3): 1152
        )
        self.mix = nn.Conv2d(16, 16, 1, bias=False)  # (16, 16, 1, 1): 256
        self.seq = nn.Conv1d(16, 16, 3, padding=1, padding_mode="circular", bias=False)  # (16, 16, 3): 768
        self.fc = nn.Linear(16, 10)  # 160 + 10

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.block1(x)
        x = F.relu(self.block2(x))
        x = F.relu(self.mix(x)).flatten(2)
        return self.fc(self.seq(x).mean(2))


def foreign(dtype=torch.float64) -> Foreign:
    torch.manual_seed(0)
    return Foreign().to(dtype)


class StopAfter(StopFlag):
    """Behaves like a SIGINT/SIGTERM arriving after `steps` optimizer steps."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.remaining = steps

    @property
    def requested(self) -> bool:
        self.remaining -= 1
        return self.remaining < 0

    @requested.setter
    def requested(self, value) -> None:
        pass


# -- ImageFolders generated for the tests (--dataset imagefolder) -----------------------------------
FASHION = Path("/usr/share/datasets/fashion-mnist")


def source_images(per_class: int, classes=(1, 7, 8, 3)) -> dict[int, np.ndarray]:
    """28x28 grey images per class: Fashion-MNIST (trouser, sneaker, bag, dress) where installed, else digits."""
    if (FASHION / "train-images-idx3-ubyte.gz").exists():
        with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.stack([np.asarray(Image.fromarray((im * 16).clip(0, 255).astype(np.uint8)).resize((28, 28)))
                      for im in digits.images])
        y = digits.target
    return {c: x[np.flatnonzero(y == c)[:per_class]] for c in classes}


def make_imagefolder(root: Path, train: int = 48, val: int = 16, size: int = 40) -> Path:
    """4 classes x (train + val) RGB JPEGs (quality 90), `size` px square."""
    for c, images in source_images(train + val).items():
        for split, part in (("train", images[:train]), ("val", images[train:])):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(part):
                Image.fromarray(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(
                    folder / f"img_{i:03d}.JPEG", quality=90)
    return root


def add_bad_files(root: Path) -> dict[str, str]:
    """Real ImageNet's troubles: CMYK and PNG files named .JPEG, grey JPEGs (all decodable), and
    a truncated JPEG, garbage and an empty file (not). Returns name -> 'ok' | 'bad'."""
    good = root / "train" / "class_1" / "img_000.JPEG"
    data = good.read_bytes()
    rgb = Image.open(good).convert("RGB")
    kinds = {}
    for split in ("train", "val"):
        folder = root / split / "class_3"
        rgb.convert("CMYK").save(folder / "cmyk.JPEG", format="JPEG", quality=95)
        rgb.save(folder / "png_named.JPEG", format="PNG")
        rgb.convert("L").save(folder / "grey.JPEG", quality=95)
        (folder / "truncated.JPEG").write_bytes(data[: len(data) // 2])
        (folder / "garbage.JPEG").write_bytes(os.urandom(3000))
        (folder / "empty.JPEG").write_bytes(b"")
        for name, kind in (("cmyk", "ok"), ("png_named", "ok"), ("grey", "ok"), ("truncated", "bad"),
                           ("garbage", "bad"), ("empty", "bad")):
            kinds[f"{split}/class_3/{name}.JPEG"] = kind
    return kinds


def train_on_two_ranks(tmp_path: Path, overrides: dict, preset: str | None = None) -> None:
    """`train(resolve_config(preset, overrides))` in 2 processes over gloo (torchrun --standalone);
    both ranks must end with identical weights. Rank r writes the run directory it got to rank{r}.txt."""
    script = tmp_path / "ddp_job.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from softshare.train.config import resolve_config
        from softshare.train.loop import train
        result = train(resolve_config({preset!r}, overrides={overrides!r}))
        rank = int(os.environ["RANK"])
        torch.save({{k: v.clone() for k, v in result.model.state_dict().items()}}, {str(tmp_path)!r} + f"/w{{rank}}.pt")
        open({str(tmp_path)!r} + f"/rank{{rank}}.txt", "w").write(str(result.run_dir))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt", weights_only=True) for r in (0, 1))
    assert [k for k in w0 if not torch.equal(w0[k], w1[k])] == []


def plain_net() -> nn.Module:
    """A foreign net: 6 convs of one shape (with biases) and a head."""
    torch.manual_seed(0)
    body = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(6)]
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


BODY = [f"{i}.0" for i in range(1, 7)]


def collinear_net() -> nn.Module:
    """plain_net shared with k=3, coefficients set so that body convs 1-3 are collinear
    (scales 1, -2, 0.5 of one direction), 4-5 collinear (3, 1 of another), 6 alone."""
    model = share(plain_net(), 3)
    u = torch.tensor([1.0, 2.0, 2.0]) / 3
    v = torch.tensor([2.0, -1.0, 2.0]) / 3
    w = torch.tensor([0.3, 0.1, -0.2])
    with torch.no_grad():
        for name, vector in zip(BODY, [u, -2 * u, 0.5 * u, 3 * v, v, w]):
            model.get_submodule(name).coefficients.copy_(vector)
    return model.eval()


def shared_swrn() -> nn.Module:
    torch.manual_seed(0)
    return create_model("swrn_16_1_2", num_classes=4).eval()


def _share_resnet_example() -> types.ModuleType:
    """examples/share_resnet.py as a module: its ResNet-18 and BasicBlock serve the tests too."""
    path = Path(__file__).resolve().parents[1] / "examples" / "share_resnet.py"
    spec = importlib.util.spec_from_file_location("share_resnet_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


SHARE_RESNET_EXAMPLE = _share_resnet_example()


def resnet18(num_classes: int = 1000) -> nn.Module:
    """A torchvision-style ResNet-18 (torchvision's module names and 11,689,512 parameters), the one
    examples/share_resnet.py falls back to: torchvision itself is not a dependency."""
    torch.manual_seed(0)
    return SHARE_RESNET_EXAMPLE.ResNet18(num_classes)


def broken_package(root: Path, name: str) -> dict:
    """A package that is installed but raises at import (torchvision's wheel for another torch
    does: RuntimeError); returns the environment that finds it first."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


# -- stand-ins for timm's Conv/Linear subclasses (timm is not a dependency) ---------------------------
class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardised per output channel in forward (BiT, NFNets)."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def pad_same(x, kernel_size, stride, dilation):
    """timm's pad_same: TensorFlow's asymmetric 'SAME' padding for any stride."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation):
        total = max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, [*pads[1], *pads[0]])


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: 'same' padding for strided convs, computed from the input in forward."""

    def forward(self, x):
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d: standardisation with a learned per-channel gain (an extra parameter)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels,), 1.5))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TimmLinear(nn.Linear):
    """timm's Linear: overrides forward (a cast under TorchScript), computes what nn.Linear does."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class TaggedConv2d(nn.Conv2d):
    """A subclass that only adds an attribute: nn.Conv2d's forward."""

    tag = "mine"


class FrozenKernelConv2d(nn.Conv2d):
    """A subclass whose forward ignores `self.weight` (a kernel copied at construction): refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("kernel", self.weight.detach().clone())

    def forward(self, x):
        return F.conv2d(x, self.kernel, self.bias, self.stride, self.padding)


class SubclassNet(nn.Module):
    """Three layers of each kind above (same shapes), and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.std = nn.Sequential(*[StdConv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.same = nn.Sequential(*[Conv2dSame(8, 8, 3, stride=2 if i == 0 else 1) for i in range(3)])
        self.scaled = nn.Sequential(*[ScaledStdConv2d(8, 8, 3, padding=1, bias=False) for _ in range(3)])
        self.tagged = nn.Sequential(*[TaggedConv2d(8, 8, 1) for _ in range(3)])
        self.frozen = nn.Sequential(*[FrozenKernelConv2d(8, 8, 1) for _ in range(3)])
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mlp = nn.Sequential(*[TimmLinear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for stage in (self.std, self.same, self.scaled, self.tagged, self.frozen):
            for layer in stage:
                x = torch.relu(layer(x))
        x = x.mean((2, 3))
        for layer in self.mlp:
            x = torch.relu(layer(x))
        return self.head(x)


def subclass_net() -> SubclassNet:
    return SubclassNet().double()


# -- a timm-style ResNet softshare did not build (softshare.fit, the Lightning callback) -------------
# timm's ResNet BasicBlock has torchvision's layers, created in the same order (conv1, bn1, conv2,
# bn2, 1x1 downsample); only its activations are named act1/act2: the example's block serves both.
BasicBlock = SHARE_RESNET_EXAMPLE.BasicBlock


class TinyResNet(nn.Module):
    """stem -> 2 stages of `depth` BasicBlocks (widths w, 2w) -> pool -> fc: share() turns each
    stage's same-shape 3x3 convs into one bank."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 8, depth: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(*[BasicBlock(width, width, 1) for _ in range(depth)])
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), *[BasicBlock(2 * width, 2 * width, 1)
                                                                       for _ in range(depth - 1)])
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.act1(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def brighter_half(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` 1x8x8 noise images labelled 1 where the top half is brighter than the bottom half."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    return x, (x[:, 0, :4].mean(dim=(1, 2)) > x[:, 0, 4:].mean(dim=(1, 2))).long()

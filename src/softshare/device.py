"""Which device to run on, and one description of the machine a result was measured on.

Training, evaluation, the studies and the CLI all resolve ``--device`` here, and every report
(run_info.json, study results) describes its hardware with `environment_description`.
"""

from __future__ import annotations

import platform

import torch

from .errors import SoftshareError


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA if visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SoftshareError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SoftshareError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU and torch's thread count (what a timing depends on)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"


def environment_description(device: torch.device | str = "cpu") -> str:
    """Device, OS and torch version in one line: the provenance of a measured result."""
    if isinstance(device, str):
        device = resolve_device(device)
    return f"{device_description(device)}; {platform.platform()}; torch {torch.__version__}"

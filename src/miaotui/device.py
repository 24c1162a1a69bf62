"""Where a model runs: ``auto`` picks the GPU when PyTorch sees one, else the CPU."""

from __future__ import annotations

import torch

from miaotui.errors import MiaotuiError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None → cuda if available else cpu; ``cpu``, ``cuda``, ``cuda:N`` are checked, not guessed."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise MiaotuiError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MiaotuiError(f"device {spec!r} asked for, but PyTorch sees no CUDA GPU "
                               f"(torch {torch.__version__}; a CPU-only build or no driver)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MiaotuiError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise MiaotuiError(f"device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device

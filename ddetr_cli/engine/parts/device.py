"""Choosing the torch device from a name ('auto', 'cpu', 'cuda', 'cuda:N').
The one device resolver: train, eval, predict and bench all call it."""

from __future__ import annotations

import torch

from ...errors import DeviceError


def resolve_device(name: str | torch.device | None, param: str = "device") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' (or a torch.device) -> torch.device,
    or :class:`~ddetr_cli.errors.DeviceError` naming ``param``."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no CUDA GPU is available to PyTorch", param=param)
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) visible", param=param)
        return dev
    raise DeviceError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)", param=param)

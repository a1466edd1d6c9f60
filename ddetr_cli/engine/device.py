"""Choosing the torch device from a name ('auto', 'cpu', 'cuda', 'cuda:N')."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The requested device does not exist here; one-line message. ``option``
    names the setting it came from (the CLI shows it as the offending option)."""

    def __init__(self, message: str, option: str = "--device") -> None:
        super().__init__(message)
        self.option = option


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, or :class:`DeviceError`."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no CUDA GPU is available to PyTorch", option)
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) visible", option)
        return dev
    raise DeviceError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)", option)

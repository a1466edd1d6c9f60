"""Automatic mixed precision: the modes and which autocast dtype a mode means
on a device. torch is imported inside the functions, so the CLI can read
:data:`AMP_MODES` for its choices without loading it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AMP_MODES = ("off", "auto", "bf16", "fp16")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """'off' -> None; 'auto' -> bf16 on CUDA when supported, else fp16 (None on
    CPU); 'bf16' -> bf16 (CUDA or CPU); 'fp16' -> fp16 on CUDA, bf16 on CPU."""
    import torch

    mode = (mode or "off").lower()
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16":
            return torch.float16
        if mode == "bf16":
            return torch.bfloat16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "auto":
        return None
    return torch.bfloat16


def needs_grad_scaler(dtype: torch.dtype | None, device: torch.device) -> bool:
    import torch

    return dtype == torch.float16 and device.type == "cuda"

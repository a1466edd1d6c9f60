"""Automatic mixed precision: which autocast dtype a mode means on a device."""

from __future__ import annotations

import torch


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """'off' -> None; 'auto' -> bf16 on CUDA when supported, else fp16 (None on
    CPU); 'bf16' -> bf16 (CUDA or CPU); 'fp16' -> fp16 on CUDA, bf16 on CPU."""
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
    return dtype == torch.float16 and device.type == "cuda"

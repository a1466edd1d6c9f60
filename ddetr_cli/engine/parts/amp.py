"""Automatic mixed precision: the modes, which autocast dtype a mode means on a
device, and whether this CPU computes in bf16 natively.

On a CPU, autocast has bf16 only (``fp16`` means bf16 there). A CPU without
native bf16 arithmetic (x86 without AVX512-BF16 or AMX, ARM without FEAT_BF16)
emulates it by converting to float32 and back, which is slower than float32
and less exact, so there training, evaluation and prediction run a ``bf16`` /
``fp16`` request in float32 and say so in one warning (:func:`resolve_amp`);
``auto`` picks bf16 on a CPU only where it is native. ``DDETR_CPU_BF16=1``
uses bf16 on any CPU (emulated where it is not native); ``DDETR_CPU_BF16=0``
never. torch is imported inside the functions, so the CLI can read
:data:`AMP_MODES` for its choices without loading it.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from typing import TYPE_CHECKING

from ...errors import DdetrError

if TYPE_CHECKING:
    import torch

AMP_MODES = ("off", "auto", "bf16", "fp16")
ENV_CPU_BF16 = "DDETR_CPU_BF16"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic: AVX512-BF16 or AMX on x86, the
    ``bf16`` feature on Linux aarch64, FEAT_BF16 on Apple silicon. Asked once."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        import torch

        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    if machine in ("aarch64", "arm64"):
        if sys.platform == "darwin":
            try:
                out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                     timeout=5)  # fmt: skip
            except (OSError, subprocess.SubprocessError):
                return False
            return out.stdout.strip() == "1"
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                return cpuinfo_has_bf16(f.read())
        except OSError:
            return False
    return False


def cpuinfo_has_bf16(text: str) -> bool:
    """Whether a Linux ``/proc/cpuinfo`` (aarch64) lists the ``bf16`` feature."""
    return any(line.lower().startswith("features") and "bf16" in line.split(":", 1)[-1].split()
               for line in text.splitlines())  # fmt: skip


def cpu_bf16_enabled() -> bool:
    """bf16 autocast on the CPU: ``$DDETR_CPU_BF16`` (1 / 0) when set, else
    :func:`cpu_has_native_bf16`."""
    value = os.environ.get(ENV_CPU_BF16, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value:
        raise DdetrError(f"{ENV_CPU_BF16}: expected 1 (bf16 on any CPU) or 0 (never), got {os.environ[ENV_CPU_BF16]!r}")
    return cpu_has_native_bf16()


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``mode`` asks for on ``device``: 'off' -> None; 'auto'
    -> bf16 on CUDA when supported, else fp16; on a CPU bf16 where
    :func:`cpu_bf16_enabled`, else None; 'bf16' -> bf16; 'fp16' -> fp16 on CUDA,
    bf16 on a CPU. :func:`resolve_amp` is what runs use."""
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
        return torch.bfloat16 if cpu_bf16_enabled() else None
    return torch.bfloat16


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """(autocast dtype, warning) for a run: :func:`amp_dtype`, except that bf16
    on a CPU without native bf16 runs in float32 (None) and the warning says so
    (None when there is nothing to say)."""
    dtype = amp_dtype(mode, device)
    if dtype is None or device.type != "cpu" or cpu_bf16_enabled():
        return dtype, None
    return None, (f"amp {mode}: this CPU has no native bf16 (AVX512-BF16 or AMX; FEAT_BF16 on ARM), where bf16 is "
                  f"emulated and slower than float32: running in float32 (set {ENV_CPU_BF16}=1 to use bf16 anyway)")


def needs_grad_scaler(dtype: torch.dtype | None, device: torch.device) -> bool:
    import torch

    return dtype == torch.float16 and device.type == "cuda"

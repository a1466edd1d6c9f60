"""Training throughput: R50 Deformable DETR at the official recipe
(AdamW with the official parameter groups, grad clip 0.1, focal set loss with
aux losses), on random images and random targets."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _random_targets(batch: int, num_classes: int, g: torch.Generator, device: torch.device) -> list[dict]:
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 11, (1,), generator=g))
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2  # [n, 2]
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05  # [n, 2]
        targets.append({
            "labels": torch.randint(0, num_classes, (n,), generator=g).to(device),
            "boxes": torch.cat([cxcy, wh], 1).to(device),
        })
    return targets


def bench_train(
    device: torch.device | str,
    *,
    batch: int = 2,
    height: int = 800,
    width: int = 1066,
    iters: int = 3,
    warmup: int = 1,
    amp: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    preset_name: str = "r50",
    backend: str = "native",
) -> dict:
    """Times ``iters`` full training steps (forward + loss + backward + clip +
    AdamW step) after ``warmup`` untimed ones. ``amp``: None/'off', 'bf16',
    'fp16', 'auto'. ``backend``: the deformable-attention op (native | torch).
    ``progress(done, total)`` is called after every step.
    Returns images/s, seconds per iteration and peak CUDA memory."""
    from ..engine.parts.amp import amp_dtype, needs_grad_scaler
    from ..engine.config import TrainConfig
    from ..engine.parts.optim import build_optimizer
    from ..engine.loops.step import build_criterion, train_step
    from ..models import build_model, preset

    device = torch.device(device)
    cfg = TrainConfig(amp=amp or "off")
    model = build_model(preset(preset_name)).to(device).train()
    model.set_msda_backend(backend)
    num_classes = model.config.num_classes
    criterion = build_criterion(cfg, num_classes)
    optimizer = build_optimizer(model, cfg)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(dtype, device) else None
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=g).to(device)  # [B, 3, H, W]
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)  # [B, H, W]
    targets = _random_targets(batch, num_classes, g, device)
    def step() -> None:
        train_step(model, criterion, optimizer, images, mask, targets, clip_max_norm=cfg.clip_max_norm, dtype=dtype, scaler=scaler)

    times = _time_steps(step, device, warmup, iters, progress)
    return {"name": f"ddetr ({backend} op)", **_row(preset_name, device, batch, height, width, dtype, iters, times)}


def _time_steps(step: Callable[[], None], device: torch.device, warmup: int, iters: int,
                progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Seconds of each of ``iters`` steps after ``warmup`` untimed ones (CUDA
    synchronised around each); resets the CUDA peak-memory counter first."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    for i in range(warmup + iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if progress is not None:
            progress(i + 1, warmup + iters)
    return times


def _row(name: str, device: torch.device, batch: int, height: int, width: int, dtype, iters: int,
         times: list[float]) -> dict:
    per_iter = sum(times) / len(times) if times else float("nan")
    return {
        "model": name,
        "device": str(device),
        "batch": batch,
        "height": height,
        "width": width,
        "amp": str(dtype).replace("torch.", "") if dtype is not None else "off",
        "iters": iters,
        "sec_per_iter": per_iter,
        "images_per_s": batch / per_iter if times else float("nan"),
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


def bench_train_hf(
    device: torch.device | str,
    *,
    batch: int = 2,
    height: int = 800,
    width: int = 1066,
    iters: int = 3,
    warmup: int = 1,
    amp: str | None = None,
) -> dict:
    """The same step with transformers' DeformableDetrForObjectDetection (its
    own loss, AdamW at lr 2e-4, grad clip 0.1). Returns the row of
    :func:`bench_train`, with ``error`` set instead when transformers is
    missing or its training step raises."""
    from ..engine.parts.amp import amp_dtype, needs_grad_scaler
    from .model import _hf_model

    device = torch.device(device)
    try:
        hf = _hf_model(device)
    except Exception as exc:  # noqa: BLE001 - reported as a row, the benchmark goes on
        hf, error = None, f"{type(exc).__name__}: {exc}"
    else:
        error = "transformers is not installed"
    dtype = amp_dtype(amp or "off", device)
    row = {"name": "transformers", **_row("transformers", device, batch, height, width, dtype, iters, [])}
    if hf is None:
        return {**row, "error": error}
    hf.train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=g).to(device)  # [B, 3, H, W]
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=device)  # [B, H, W], 1 = pixel
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]}
              for t in _random_targets(batch, hf.config.num_labels, g, device)]
    optimizer = torch.optim.AdamW(hf.parameters(), lr=2e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(dtype, device) else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = hf(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.1)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    try:
        times = _time_steps(step, device, warmup, iters)
    except Exception as exc:  # noqa: BLE001 - e.g. transformers 5.24's NameError in its loss
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    return {"name": "transformers", **_row("transformers", device, batch, height, width, dtype, iters, times)}

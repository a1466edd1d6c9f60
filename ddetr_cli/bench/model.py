"""End-to-end inference latency of R50 Deformable DETR (random weights).

Cases: our model with the native op, our model with the PyTorch (grid_sample)
op, on CUDA our model with the native op replayed as a CUDA graph, and — when transformers is importable — Hugging Face's
``DeformableDetrForObjectDetection`` with the same architecture (transformers'
own ResNet-50, no timm, nothing downloaded). Each case is timed whole and split
into backbone / encoder / decoder with forward hooks (CUDA is synchronised at
every boundary, so the split adds a few syncs to the CUDA total).

On the CPU, denormal floats are flushed to zero while the benchmark runs:
random weights can drive activations into the denormal range, where x86 FPUs
are 10-100x slower, and that would time the FPU rather than the model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from .roofline import part_flops

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


class _SplitTimer:
    """Accumulates wall time spent inside named sub-modules (hooks)."""

    def __init__(self, device: torch.device, parts: dict[str, nn.Module]) -> None:
        self.device = device
        self.totals = {name: 0.0 for name in parts}
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in parts.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, name: str):
        def hook(module, args):
            self._sync()
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self._sync()
            self.totals[name] += (time.perf_counter() - self._start.pop(name)) * 1e3
        return hook

    def reset(self) -> None:
        self.totals = {name: 0.0 for name in self.totals}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _time_case(fn: Callable[[], object], device: torch.device, parts: dict[str, nn.Module], *, warmup: int,
               repeats: int) -> dict[str, float]:
    timer = _SplitTimer(device, parts)
    try:
        for _ in range(warmup):
            fn()
        totals, splits = [], {name: [] for name in parts}
        for _ in range(repeats):
            timer.reset()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            totals.append((time.perf_counter() - t0) * 1e3)
            for name, ms in timer.totals.items():
                splits[name].append(ms)
    finally:
        timer.close()
    return {"total": statistics.median(totals), **{name: statistics.median(v) for name, v in splits.items()}}


def _hf_model(device: torch.device) -> nn.Module | None:
    try:
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    except ImportError:
        return None
    backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"])  # ResNet-50 (bottleneck 3-4-6-3)
    config = DeformableDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                  num_labels=91, num_queries=300)
    return DeformableDetrForObjectDetection(config).to(device).eval()


def bench_model(device: torch.device, *, dtype: str = "float32", batch: int = 1, height: int = 800,
                width: int = 1066, warmup: int = 1, repeats: int = 3, include_hf: bool = True,
                include_torch_op: bool = True, progress: Callable[[str], None] | None = None,
                model: nn.Module | None = None, onnx: str | None = None) -> list[dict]:
    """Returns one row per case::

        {"name", "ms_per_img", "ratio", "ratio_vs", "backbone_ms", "encoder_ms", "decoder_ms",
         "total_ms", "batch", "height", "width", "dtype", "device", "threads",
         "backbone_gflop", "backbone_gflops", ... (encoder, decoder)}

    ``ratio`` is reference time / this time (> 1: faster than the reference),
    the reference being HF when it ran, else our model with the torch op. The
    split columns are per image too. ``model``: time these weights instead of a
    random R50. ``onnx``: also time this exported graph in onnxruntime (CPU, the
    same thread count; whole-model time only).
    """
    from ..models import build_model, fuse_for_inference, preset

    device = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    autocast_dtype = DTYPES[dtype]
    say = progress or (lambda msg: None)

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=gen).to(device)
    rows: list[dict] = []

    def add(name: str, times: dict[str, float], flops: dict[str, int] | None = None) -> None:
        def per_image(part: str) -> float | None:
            return times[part] / batch if part in times else None  # a CUDA graph has no split

        row = {
            "name": name, "ms_per_img": times["total"] / batch, "ratio": None, "ratio_vs": None,
            "backbone_ms": per_image("backbone"), "encoder_ms": per_image("encoder"),
            "decoder_ms": per_image("decoder"), "total_ms": times["total"], "batch": batch,
            "height": height, "width": width, "dtype": dtype, "device": str(device), "threads": torch.get_num_threads(),
        }
        for part, n in (flops or {}).items():  # dense-layer roofline: GFLOP per image and achieved GFLOP/s
            row[f"{part}_gflop"] = n / batch / 1e9
            row[f"{part}_gflops"] = n / (times[part] / 1e3) / 1e9 if times.get(part) else None
        rows.append(row)

    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        torch.manual_seed(0)
        ours = fuse_for_inference((model if model is not None else build_model(preset("r50"))).to(device).eval())
        parts = {"backbone": ours.backbone, "encoder": ours.transformer.encoder, "decoder": ours.transformer.decoder}

        def run_ours() -> object:
            with torch.inference_mode(), autocast():
                return ours(images)

        ours.set_msda_backend("native")
        flops = part_flops(ours, parts, run_ours)
        for backend in ("native", "torch") if include_torch_op else ("native",):
            say(f"ddetr + {backend} op")
            ours.set_msda_backend(backend)
            add(f"ddetr ({backend} op)", _time_case(run_ours, device, parts, warmup=warmup, repeats=repeats), flops)
        if device.type == "cuda":
            from ..runtime.cuda_graph import CudaGraphRunner

            say("ddetr + native op, CUDA graph")
            ours.set_msda_backend("native")
            graphed = CudaGraphRunner(ours, autocast=autocast_dtype)
            add("ddetr (native op, CUDA graph)", _time_case(lambda: graphed(images), device, {}, warmup=warmup,
                                                            repeats=repeats))
            del graphed
        del ours

        reference = "ddetr (torch op)" if include_torch_op else "ddetr (native op)"
        if onnx is not None:
            rows.append(_onnx_row(onnx, images, warmup, repeats, dtype, say))
        hf = _hf_model(device) if include_hf else None
        if hf is not None:
            say("transformers DeformableDetrForObjectDetection")
            pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=device)
            hf_parts = {"backbone": hf.model.backbone, "encoder": hf.model.encoder, "decoder": hf.model.decoder}

            def run_hf() -> object:
                with torch.inference_mode(), autocast():
                    return hf(pixel_values=images, pixel_mask=pixel_mask)

            add("transformers", _time_case(run_hf, device, hf_parts, warmup=warmup, repeats=repeats),
                part_flops(hf, hf_parts, run_hf))
            reference = "transformers"
            del hf
    finally:
        if flush:
            torch.set_flush_denormal(False)
    ref_ms = next(r["ms_per_img"] for r in rows if r["name"] == reference)
    for r in rows:
        r["ratio"] = ref_ms / r["ms_per_img"]
        r["ratio_vs"] = reference
    return rows


def _onnx_row(path, images: torch.Tensor, warmup: int, repeats: int, dtype: str, say: Callable[[str], None]) -> dict:
    from ..runtime.onnx import OnnxRunner

    say(f"onnxruntime {path}")
    runner = OnnxRunner(path, threads=torch.get_num_threads(), denormals_as_zero=True)
    batch, _, height, width = images.shape
    cpu_images = images.float().cpu()
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    for _ in range(warmup):
        runner(cpu_images, mask)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner(cpu_images, mask)
        times.append((time.perf_counter() - t0) * 1e3)
    total = statistics.median(times)
    return {"name": f"onnxruntime {'+'.join(p.replace('ExecutionProvider', '') for p in runner.providers)}",
            "ms_per_img": total / batch, "ratio": None, "ratio_vs": None, "backbone_ms": None, "encoder_ms": None,
            "decoder_ms": None, "total_ms": total, "batch": batch, "height": height, "width": width,
            "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads()}

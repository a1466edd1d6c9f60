"""A Deformable DETR forward replayed as a CUDA graph.

At batch 1 the GPU finishes each of the forward's ~1,000 kernels faster than
Python can launch the next, so eager inference is bound by the host. A CUDA
graph records the launches once per input shape and replays them with one
call. The forward makes no host sync and no pageable host-to-device copy (the
level geometry lives on the CPU, the offset normalisers are made once per
geometry), which is what capture requires.

Inputs are copied into the graph's static buffers and outputs are cloned out
of them, so callers see ordinary tensors that the next replay does not touch.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    images: torch.Tensor  # [B, 3, H, W] static input
    mask: torch.Tensor  # [B, H, W] static input
    outputs: dict  # static outputs, overwritten by every replay
    keep: list  # tensors the graph reads that the model might drop (level geometries: offset normalisers)


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree


class CudaGraphRunner:
    """``runner(images, padding_mask) -> outputs`` like ``model(images,
    padding_mask)`` in inference mode, replayed from a CUDA graph captured on
    the first call with each (shape, dtype). ``autocast``: None or a dtype for
    ``torch.autocast``. Keeps the last ``max_graphs`` graphs."""

    def __init__(self, model: nn.Module, *, autocast: torch.dtype | None = None, max_graphs: int = 4,
                 warmup: int = 2) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"model: CUDA graphs need a model on a CUDA device, got {device}")
        self.model = model
        self.device = device
        self.autocast = autocast
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle()

    def _context(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.autocast)

    def _capture(self, images: torch.Tensor, mask: torch.Tensor) -> _Captured:
        static_images, static_mask = images.clone(), mask.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode(), self._context():
            for _ in range(self.warmup):  # lazy initialisation (cuBLAS handles, caches) happens outside the capture
                self.model(static_images, static_mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode(), self._context():
            outputs = self.model(static_images, static_mask)
        keep = [m._geometries.copy() for m in self.model.modules() if hasattr(m, "_geometries")]
        return _Captured(graph, static_images, static_mask, outputs, keep)

    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict:
        if images.device != self.device:
            raise ValueError(f"images: on {images.device}, but the model is on {self.device}")
        if padding_mask is None:
            padding_mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=self.device)
        key = (tuple(images.shape), images.dtype)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(images, padding_mask.to(self.device, torch.bool))
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            captured.images.copy_(images)
            captured.mask.copy_(padding_mask)
        captured.graph.replay()
        return _clone(captured.outputs)

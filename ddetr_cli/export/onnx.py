"""ONNX export of a :class:`~ddetr_cli.models.DeformableDETR`, and its self-check.

The graph keeps the model's own contract::

    images        float32 [B, 3, H, W]  normalised (ImageNet mean/std), zero padded
    padding_mask  bool    [B, H, W]     True on padded pixels
    pred_logits   float32 [B, Q, C]     class logits (sigmoid scores)
    pred_boxes    float32 [B, Q, 4]     (cx, cy, w, h) normalised by the padded size

Batch and image size are dynamic by default (``torch.export`` with symbolic
sizes; each side at least :data:`MIN_SIDE` pixels so that every feature level
is at least 2 wide). The deformable attention is exported through the
pure-PyTorch path (``grid_sample``), which every ONNX runtime has. Class names,
category ids and the preprocessing settings are stored in the model's metadata
(:data:`META_KEYS`), where :class:`ddetr_cli.runtime.onnx.OnnxRunner` reads them.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.io import atomic_write
from ..errors import ExportError

INPUTS = ("images", "padding_mask")
OUTPUTS = ("pred_logits", "pred_boxes")
MIN_SIDE = 65  # the coarsest level (stride 64) keeps >= 2 pixels per side
MAX_SIDE = 8192
DEFAULT_OPSET = 18
TOLERANCE = 1e-4
META_KEYS = ("ddetr_format", "class_names", "category_ids", "preprocess", "model_config", "dynamic")


class _Graph(torch.nn.Module):
    """(images, padding_mask) -> (pred_logits, pred_boxes): the dict's two tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images, padding_mask, return_aux=False)
        return out["pred_logits"], out["pred_boxes"]


def sample_batch(height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of two different-sized images: a full ``height x width``
    one and a smaller one (about 3/4 x 5/8 of it) padded to the same size."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, height, width, generator=gen)  # [2, 3, H, W]
    mask = torch.zeros(2, height, width, dtype=torch.bool)  # [2, H, W]
    h2, w2 = max(MIN_SIDE, height * 3 // 4), max(MIN_SIDE, width * 5 // 8)
    images[1, :, h2:], images[1, :, :, w2:] = 0.0, 0.0
    mask[1, h2:], mask[1, :, w2:] = True, True
    return images, mask


def metadata(model: torch.nn.Module, imgsz: int, max_size: int, dynamic: bool) -> dict[str, str]:
    from .. import __version__
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    cfg = model.config
    names = list(getattr(model, "class_names", None) or [str(i) for i in range(cfg.num_classes)])
    ids = getattr(model, "category_ids", None)
    preprocess = {"size": int(imgsz), "max_size": int(max_size), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "channels": "RGB", "scale": 1 / 255, "pad": "bottom-right, zeros; padding_mask True on padded pixels",
                  "boxes": "cxcywh normalised by the padded size", "scores": "sigmoid(pred_logits)"}
    config = {k: v for k, v in cfg.__dict__.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    return {
        "ddetr_format": "1",
        "ddetr_version": __version__,
        "class_names": json.dumps(names),
        "category_ids": json.dumps(None if ids is None else [int(i) for i in ids]),
        "preprocess": json.dumps(preprocess),
        "model_config": json.dumps(config),
        "dynamic": json.dumps(bool(dynamic)),
    }


def export_onnx(model: torch.nn.Module, out: str | Path, *, imgsz: tuple[int, int] = (800, 1066),
                opset: int = DEFAULT_OPSET, dynamic: bool = True, size: int | None = None,
                max_size: int | None = None) -> Path:
    """Writes ``model`` as an ONNX graph to ``out`` (atomically) and returns the path.

    ``imgsz`` (H, W): the traced input size; with ``dynamic=False`` the only size
    the graph accepts (the batch stays dynamic). ``size`` / ``max_size``: the resize settings stored in the
    metadata (default: the model's training sizes, else 800 / 1333)."""
    from ..data import inference_size

    H, W = (int(v) for v in imgsz)
    if dynamic and min(H, W) < MIN_SIDE:
        raise ExportError(f"{H} {W} is below {MIN_SIDE} pixels on a side (the dynamic graph's minimum)", param="imgsz")
    if opset < 18:
        raise ExportError(f"{opset} is too old; the exporter needs opset 18 or newer", param="opset")
    size, max_size = inference_size(getattr(model, "input_size", None), size, max_size)
    model = model.to("cpu").float().eval()
    previous = model.config.msda_backend
    model.set_msda_backend("torch")  # the grid_sample path: portable, and what the exporter can trace
    try:
        images, mask = sample_batch(H, W)
        b = torch.export.Dim("batch", min=1, max=1024)  # the batch stays dynamic in a static graph too
        dynamic_shapes = {"images": {0: b}, "padding_mask": {0: b}}
        if dynamic:
            h = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
            w = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
            dynamic_shapes = {"images": {0: b, 2: h, 3: w}, "padding_mask": {0: b, 1: h, 2: w}}
        with warnings.catch_warnings(), torch.no_grad(), _quiet_loggers("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_Graph(model), (images, mask), None, input_names=list(INPUTS),
                                        output_names=list(OUTPUTS), dynamic_shapes=dynamic_shapes, dynamo=True,
                                        opset_version=opset, optimize=True, verbose=False)
    except ExportError:
        raise
    except Exception as exc:  # the exporter's errors are long; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{out}: ONNX export failed ({type(exc).__name__}: {first})") from exc
    finally:
        model.set_msda_backend(previous)
    proto = program.model_proto
    _set_metadata(proto, metadata(model, size, max_size, dynamic))
    import onnx

    return atomic_write(out, lambda tmp: onnx.save(proto, tmp))


@contextmanager
def _quiet_loggers(*names: str):
    """The exporter's own progress and optimizer notes (stdout/stderr noise) off."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _set_metadata(proto, meta: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


@dataclass
class VerifyResult:
    max_abs_diff: float  # over pred_logits and pred_boxes
    logits_diff: float
    boxes_diff: float
    shape: tuple[int, ...]  # the checked batch [B, 3, H, W]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


def verify_onnx(model: torch.nn.Module, path: str | Path, imgsz: tuple[int, int], *, dynamic: bool = True) -> VerifyResult:
    """Runs the graph at ``path`` in onnxruntime on a padded batch of two
    different-sized images and compares with ``model`` in PyTorch (the same
    pure-PyTorch attention). A dynamic graph is checked at another size than
    the traced one."""
    from ..runtime.onnx import OnnxRunner

    H, W = imgsz
    if dynamic:  # another size than the traced one, so the check covers the dynamic axes
        H, W = H + 37, max(MIN_SIDE + 8, W - 45)
    images, mask = sample_batch(H, W, seed=1)
    runner = OnnxRunner(path)
    previous = model.config.msda_backend
    model.set_msda_backend("torch")
    try:
        with torch.no_grad():
            ref = model.to("cpu").float().eval()(images, mask)
    finally:
        model.set_msda_backend(previous)
    got = runner(images, mask)
    d_logits = (got["pred_logits"] - ref["pred_logits"]).abs().max().item()
    d_boxes = (got["pred_boxes"] - ref["pred_boxes"]).abs().max().item()
    return VerifyResult(max(d_logits, d_boxes), d_logits, d_boxes, tuple(images.shape))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ddetr metadata of an exported graph, decoded (no onnxruntime needed)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    raw = {p.key: p.value for p in proto.metadata_props}
    return {k: (json.loads(v) if k != "ddetr_version" else v) for k, v in raw.items() if k in META_KEYS or k == "ddetr_version"}

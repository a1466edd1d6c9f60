"""An onnxruntime runner with the PyTorch model's call shape.

``OnnxRunner(path)(images, padding_mask) -> {"pred_logits", "pred_boxes"}``
takes and returns torch tensors, so the predict and eval loops, the
post-processing and the output files are the same as for the PyTorch model. It
also carries what those loops read from a model: ``class_names``,
``category_ids``, ``input_size`` and ``config.num_classes`` (from the metadata
that :func:`ddetr_cli.export.export_onnx` writes), and no-op ``to``/``eval``/
``train``. onnxruntime is an optional dependency (``pip install "ddetr[onnx]"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import CheckpointError, OnnxRuntimeMissing

INSTALL_HINT = 'pip install "ddetr[onnx]" (or pip install onnxruntime)'


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxRuntimeMissing(f"running an .onnx model needs onnxruntime, which is not installed: {INSTALL_HINT}") from None
    return onnxruntime


class OnnxRunner:
    """Runs an exported ddetr graph on the CPU (or CUDA, when the installed
    onnxruntime has that provider and ``device`` asks for it). A
    :class:`~ddetr_cli.engine.loops.runner.ModelRunner`: its inputs go to
    ``device`` = the CPU (onnxruntime copies them itself)."""

    training = False

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", *, threads: int | None = None,
                 denormals_as_zero: bool = False) -> None:
        ort = _onnxruntime()
        self.path = Path(path)
        self.device = torch.device("cpu")  # where the predictor puts the inputs (numpy needs them there)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only
        if threads:
            opts.intra_op_num_threads = int(threads)
        if denormals_as_zero:  # as the PyTorch benchmark does (random weights produce denormals)
            opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.path}: onnxruntime cannot load it ({first})") from None
        names = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        if names != ["images", "padding_mask"] or not {"pred_logits", "pred_boxes"} <= set(outs):
            raise CheckpointError(f"{self.path}: not a ddetr graph (inputs {names}, outputs {outs}; expected "
                                  "images, padding_mask -> pred_logits, pred_boxes; export with `ddetr export`)")
        self.providers = self.session.get_providers()
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k: v for k, v in meta.items()}
        num_classes = int(self.session.get_outputs()[outs.index("pred_logits")].shape[-1])
        self.class_names: list[str] = self._json("class_names") or [str(i) for i in range(num_classes)]
        self.category_ids: list[int] | None = self._json("category_ids")
        pre = self._json("preprocess") or {}
        self.input_size: tuple[int, int] | None = (int(pre["size"]), int(pre["max_size"])) if "size" in pre else None
        self.config = SimpleNamespace(num_classes=num_classes, **{k: v for k, v in (self._json("model_config") or {}).items()
                                                                 if k != "num_classes"})
        self.config.num_classes = num_classes

    def _json(self, key: str):
        value = self.metadata.get(key)
        if value is None:
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise CheckpointError(f"{self.path}: metadata {key!r} is not valid JSON") from None

    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W] float; padding_mask [B, H, W] bool (True = padded) or None
        -> {"pred_logits" [B, Q, C], "pred_boxes" [B, Q, 4]} as float32 tensors on images' device."""
        B, _, H, W = images.shape
        if padding_mask is None:
            padding_mask = torch.zeros((B, H, W), dtype=torch.bool)
        feed = {"images": np.ascontiguousarray(images.detach().float().cpu().numpy()),
                "padding_mask": np.ascontiguousarray(padding_mask.detach().cpu().numpy().astype(bool))}
        fixed = self.session.get_inputs()[0].shape[2:]
        if all(isinstance(d, int) for d in fixed) and tuple(fixed) != (H, W):
            raise ValueError(f"{self.path}: the graph was exported with a static size {fixed[0]}x{fixed[1]}, "
                             f"got a batch of {H}x{W}; export it with `dynamic` (the default), or give `imgsz` "
                             "and `max_size` that resize the images to that size")
        try:
            logits, boxes = self.session.run(["pred_logits", "pred_boxes"], feed)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"{self.path}: onnxruntime failed on a batch of shape {tuple(images.shape)} ({first})") from None
        return {"pred_logits": torch.from_numpy(logits).to(images.device), "pred_boxes": torch.from_numpy(boxes).to(images.device)}

    forward = __call__

    # what the PyTorch loops call on a model
    def to(self, *args, **kwargs) -> OnnxRunner:
        return self

    def eval(self) -> OnnxRunner:
        return self

    def train(self, mode: bool = True) -> OnnxRunner:
        return self

    def __repr__(self) -> str:
        return f"OnnxRunner({str(self.path)!r}, providers={self.providers})"

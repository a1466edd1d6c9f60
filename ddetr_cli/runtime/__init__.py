"""Model runners behind one call shape, ``runner(images, padding_mask) ->
{"pred_logits", "pred_boxes"}``: the PyTorch model itself, or
:class:`.onnx.OnnxRunner` for an exported ``.onnx`` graph.

:func:`load_runner` turns any ``--weights`` value (a path, a hub id, a short
name or an ``.onnx`` file) into one, and records where it came from in
``runner.source`` (for the one line the CLI prints).
"""

from __future__ import annotations

import os

import torch


def load_runner(weights: str | os.PathLike, device: str | torch.device = "cpu", *, msda_backend: str | None = None):
    """The model (eval mode, on ``device``) or onnxruntime runner for ``weights``.
    Raises :class:`~ddetr_cli.checkpoints.CheckpointError` (and its ``HubError``,
    ``OnnxRuntimeMissing`` subclasses) with a one-line message."""
    from ..checkpoints import load_model
    from ..checkpoints.hub import resolve

    resolved = resolve(weights)
    if resolved.path.suffix.lower() == ".onnx":
        from .onnx import OnnxRunner

        runner = OnnxRunner(resolved.path, device)
    else:
        runner = load_model(resolved.path, device, msda_backend=msda_backend)
    runner.source = resolved.describe()
    runner.hub = resolved.hub
    return runner


def is_onnx(runner) -> bool:
    from .onnx import OnnxRunner

    return isinstance(runner, OnnxRunner)


__all__ = ["is_onnx", "load_runner"]

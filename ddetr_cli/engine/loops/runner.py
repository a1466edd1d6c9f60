"""Model runners: what the predictor calls to turn a preprocessed batch into
raw detections. The seam where other runtimes slot in beside PyTorch.

A runner is any object with this shape (:class:`ModelRunner`)::

    runner.device          torch.device the inputs go to (torch.device("cpu") for onnxruntime)
    runner.class_names     list[str], contiguous class index -> name ([] if unknown)
    runner.category_ids    list[int] | None, class index -> dataset category id
    runner.input_size      (shorter side, longer-side cap) it was trained at, or None
    runner(images, mask)   images [B, 3, H, W] float32 (ImageNet-normalised, padded),
                           mask [B, H, W] bool (True = padding), both on ``runner.device``
                           -> {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4] cxcywh in [0, 1]}
                           as float32 tensors; the call returns when the results are ready
                           (a CUDA runner synchronises), so the predictor can time it.

:class:`TorchRunner` wraps a loaded PyTorch model (optionally replayed from a
CUDA graph). :class:`~ddetr_cli.runtime.onnx.OnnxRunner` converts the tensors
to numpy, runs its onnxruntime session and wraps the outputs back with
``torch.from_numpy``. :func:`load_runner` is the one place that chooses a
runner for a ``weights`` value (predict, eval and bench all call it;
``ddetr_cli.engine.run_predict`` re-exports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ...errors import CheckpointError
from ..parts.amp import resolve_amp

WEIGHTS_HELP = (
    "Pass a local file or folder (a ddetr .pt, an official Deformable DETR .pth from the GitHub releases of "
    "fundamentalvision/Deformable-DETR, a Hugging Face model folder, an exported .onnx), a short name "
    "(r50, r50-refine, r50-two-stage) or a Hugging Face hub id such as SenseTime/deformable-detr; "
    "or train your own with `ddetr train`."
)


class ModelRunner(Protocol):
    device: torch.device
    class_names: list[str]
    category_ids: list[int] | None
    input_size: tuple[int, int] | None

    def __call__(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TorchRunner:
    """A PyTorch detector (already on ``device``, eval mode) as a runner;
    ``amp``: an AMP mode (off | auto | bf16 | fp16) for autocast, resolved by
    :func:`~..parts.amp.resolve_amp` (``amp_note``: its warning, e.g. bf16 asked
    on a CPU without native bf16, or None); ``cuda_graph``: on CUDA, replay the
    forward from a CUDA graph captured per input shape
    (:mod:`ddetr_cli.runtime.cuda_graph`); ignored on the CPU. ``fuse``: fold
    batch norm into the convolutions (:func:`~ddetr_cli.models.fuse.fuse_for_inference`),
    in place: for a model that only this runner uses (:func:`load_runner`'s)."""

    def __init__(self, model, device: torch.device | str = "cpu", amp: str = "off", cuda_graph: bool = False,
                 fuse: bool = False) -> None:
        if fuse:
            from ...models.fuse import fuse_for_inference

            model = fuse_for_inference(model.eval())
        self.model = model
        self.device = torch.device(device)
        self.class_names: list[str] = list(getattr(model, "class_names", None) or [])
        self.category_ids: list[int] | None = getattr(model, "category_ids", None)
        self.input_size: tuple[int, int] | None = getattr(model, "input_size", None)
        self.amp_dtype, self.amp_note = resolve_amp(amp, self.device)
        self.graphed = None
        if cuda_graph and self.device.type == "cuda":
            from ...runtime.cuda_graph import CudaGraphRunner

            self.graphed = CudaGraphRunner(model, autocast=self.amp_dtype)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.graphed is not None:
            outputs = self.graphed(images, mask)
        else:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = self.model(images, mask)
        out = {"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out


def load_runner(weights: str | Path | None, device, *, backend: str = "auto", amp: str = "off",
                cuda_graph: bool = False) -> ModelRunner:
    """The model runner for ``weights`` on ``device``. ``weights``: a local
    path, a short name or a hub id (fetched into the Hugging Face cache,
    :func:`ddetr_cli.checkpoints.hub.resolve`). An ``.onnx`` file ->
    :class:`~ddetr_cli.runtime.onnx.OnnxRunner` (``amp``, ``cuda_graph`` and
    ``backend`` do not apply); a PyTorch checkpoint (own ``.pt``, official
    ``.pth``, Hugging Face folder) -> :class:`TorchRunner`, its model fused for
    inference (the runner owns it: nothing saves or trains it). The one place a
    runner is chosen. The runner's ``source`` says what was loaded from where
    (``"r50-two-stage (SenseTime/...) from <snapshot>"``).

    Raises :class:`~ddetr_cli.errors.CheckpointError` (``HubError``,
    ``OnnxRuntimeMissing``) with a one-line message."""
    if weights is None:
        raise CheckpointError(f"no weights given. {WEIGHTS_HELP}", param="weights")
    from ...checkpoints.hub import resolve

    resolved = resolve(weights)
    path = resolved.path
    if not path.exists():
        raise CheckpointError(f"weights {str(weights)!r} not found. {WEIGHTS_HELP}", param="weights")
    if path.suffix.lower() == ".onnx" and path.is_file():
        from ...runtime.onnx import OnnxRunner

        runner = OnnxRunner(path, device)
    else:
        from ...checkpoints import load_model

        try:
            model = load_model(path, device, msda_backend=None if backend == "auto" else backend)
        except CheckpointError:
            raise
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{weights}: cannot load model ({first})", param="weights") from None
        runner = TorchRunner(model, device, amp=amp, cuda_graph=cuda_graph, fuse=True)
    runner.source = resolved.describe()
    runner.hub = resolved.hub
    return runner


def is_onnx(runner) -> bool:
    """Whether ``runner`` runs an ``.onnx`` graph through onnxruntime."""
    from ...runtime.onnx import OnnxRunner

    return isinstance(runner, OnnxRunner)

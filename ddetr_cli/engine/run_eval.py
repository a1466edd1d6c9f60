"""COCO bbox evaluation of a checkpoint on a split of a dataset.

:func:`run_evaluation` is what ``ddetr eval`` calls and what a Python script
calls to do the same: load the dataset config and the checkpoint (own, official
or Hugging Face), choose the image sizes (given, else the training run's
evaluation sizes, else 800 / 1333), map the model's classes to the split's
category ids, run :func:`~.evaluate.evaluate` (sharded under torchrun) and
optionally write the detections as a COCO results JSON::

    from ddetr_cli.engine import run_evaluation

    ev = run_evaluation("coco.yaml", "runs/train/exp/weights/best.pt", device="cuda")
    print(ev.result.as_dict()["AP"])
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError, DdetrError
from .loops.evaluate import EvalResult
from .parts import distributed
from .parts.device import resolve_device
from .report.progress import NullReporter, Reporter

_log = logging.getLogger("ddetr")


@dataclass
class EvalRun:
    result: EvalResult
    split: str
    class_names: dict[int, str]  # category id -> name, for every category of the split
    imgsz: int
    max_size: int
    json_path: Path | None = None  # where the detections were written, if asked
    plots_dir: Path | None = None  # where the plots were written, if asked
    dataset: Any = field(default=None, repr=False)  # the evaluated split (CocoDetection)


def run_evaluation(
    data: str,
    weights: str | Path,
    *,
    split: str = "val",
    batch_size: int = 2,
    imgsz: int | None = None,
    max_size: int | None = None,
    device: str = "auto",
    workers: int = 2,
    amp: str = "off",
    coco_json: str | Path | None = None,
    plots: bool = False,
    conf: float = 0.25,
    project: str | Path = "runs/val",
    name: str = "exp",
    out: str | Path | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> EvalRun | None:
    """Evaluates ``weights`` on ``split`` of ``data`` (a dataset YAML or ``"shapes"``).

    ``weights``: a local path, a short name, a hub id or an exported ``.onnx``
    (onnxruntime). ``imgsz`` / ``max_size``: shorter-side size and longer-side cap (default: the
    sizes recorded by our training checkpoints, else 800 / 1333). ``device``:
    'auto' | 'cpu' | 'cuda' | 'cuda:N'. ``amp``: 'off' | 'auto' | 'bf16' | 'fp16'.
    ``coco_json``: also write the detections (COCO results format) there.
    ``plots``: also draw the PR curve, the confusion matrix (at ``conf``) and
    predictions beside the ground truth into ``out``, else a fresh
    ``project/name`` folder (``exp``, ``exp2``, ...).
    ``reporter``: progress; ``log`` / ``warn``: one-line messages (default: the
    ``ddetr`` logger). A PyTorch model is fused for inference (batch norm folded
    into the convolutions); ``amp`` bf16 on a CPU without native bf16 runs in
    float32 and ``warn`` says so (:func:`~.parts.amp.resolve_amp`).

    Returns an :class:`EvalRun` on rank 0, None on other ranks. Raises
    :class:`~ddetr_cli.errors.DdetrError` subclasses: bad ``batch_size``, data
    (``ConfigError`` / ``DatasetError`` / ``ImageReadError``), ``CheckpointError``,
    ``DeviceError``, ``ClassMismatchError``.
    """
    from ..data import inference_size, load_dataset_config
    from .loops.runner import TorchRunner, load_runner

    if batch_size < 1:
        raise DdetrError(f"must be >= 1, got {batch_size}", param="batch_size")
    if not 0 <= conf <= 1:
        raise DdetrError(f"must be in [0, 1], got {conf}", param="conf")
    log, warn = log or _log.info, warn or _log.warning
    reporter = reporter or NullReporter()
    if coco_json:  # before any inference, not after it
        from ..checkpoints.io import check_writable

        try:
            check_writable(coco_json)
        except DdetrError as exc:
            exc.param = "coco_json"
            raise
    dc = load_dataset_config(data)
    sc = dc.split(split)
    dev = resolve_device(device)
    owns_group = not distributed.is_initialized()  # a process group started by the caller stays up
    info = distributed.init_distributed(dev)
    try:
        dev = distributed.device_for(info, dev)
        runner = load_runner(weights, dev)  # a PyTorch model, or onnxruntime for an .onnx file
        model = runner.model if isinstance(runner, TorchRunner) else runner  # the loop does its own autocast
        imgsz, max_size = inference_size(model.input_size, imgsz, max_size)
        ev = _evaluate(model, weights, sc, dc.names, split, batch_size, imgsz, max_size, dev, info, workers, amp,
                       coco_json, reporter, log, warn)
        if ev is not None and plots:
            ev.plots_dir = _plots(ev, conf, project, name, out)
        return ev
    finally:
        if owns_group:
            distributed.cleanup()


def _evaluate(model, weights, sc, dataset_names, split, batch_size, imgsz, max_size, device, info, workers, amp, coco_json,
              reporter: Reporter, log, warn) -> EvalRun | None:
    import torch

    from ..checkpoints.io import atomic_write_text
    from ..data import collate_eval, make_eval_transforms
    from ..data.split import open_split
    from .loops.evaluate import evaluate
    from .parts.amp import resolve_amp
    from .parts.labelmap import resolve_label_map
    from .parts.sampler import ShardSampler

    num_classes = int(model.config.num_classes)
    model_ids = getattr(model, "category_ids", None)
    dataset = open_split(sc, make_eval_transforms(imgsz, max_size), names=dataset_names, mark_unreadable=True)
    if len(dataset) == 0:
        raise DatasetError(f"{sc.annotations}: the {split} split has no images")
    label_to_cat = resolve_label_map(num_classes, list(model_ids) if model_ids is not None else None,
                                     list(dataset.category_ids), what=f"{weights}",
                                     model_names=getattr(model, "class_names", None), dataset_names=dataset.class_names)
    model = model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info.rank, info.world_size),
        collate_fn=collate_eval, num_workers=workers, pin_memory=device.type == "cuda",
    )
    if info.is_main:
        log(f"evaluating {weights} on {split} ({len(dataset)} images, {imgsz}px, device {device})")
        reporter.eval_start(len(dataset))
    dtype, amp_note = resolve_amp(amp, device)
    if amp_note and info.is_main:
        warn(amp_note)
    result = evaluate(model, loader, dataset.coco, label_to_cat, device, amp_dtype=dtype,
                      on_batch=reporter.eval_step if info.is_main else None)
    reporter.close()
    if not info.is_main or result is None:
        return None
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    path = None
    if coco_json:
        path = Path(coco_json)
        atomic_write_text(path, json.dumps(result.detections))
    return EvalRun(result, split, names, imgsz, max_size, path, dataset=dataset)


def _plots(ev: EvalRun, conf: float, project, name: str, out) -> Path:
    from .report.plots import write_val_plots
    from .runs.folders import allocate_run_dir, release_run_dir

    if out is not None:
        run_dir = Path(out)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_val_plots(run_dir, ev.dataset, ev.result.detections, conf, train_set=ev.dataset)
        return run_dir
    run_dir = allocate_run_dir(project, name)  # claimed, so concurrent evaluations never share a folder
    try:
        write_val_plots(run_dir, ev.dataset, ev.result.detections, conf, train_set=ev.dataset)
    finally:
        release_run_dir(run_dir)
    return run_dir

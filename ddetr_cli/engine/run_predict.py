"""Prediction on images, folders, globs and videos.

:func:`run_prediction` is what ``ddetr predict`` calls and what a Python
script calls to do the same: resolve the device, load the weights into a model
runner, choose the image sizes (given, else the training run's, else 800 /
1333), expand and decode the sources (``data/sources.py``), predict, and
write a fresh run folder (``runs/predict/exp``, ``exp2``, ...)::

    predictions.json       [{file, frame?, image_id, width, height, detections: [...]}, ...]
    results_coco.json      with coco_json: the COCO results format
    <name>.<ext>           with viz: annotated images; <video>.mp4 annotated videos

    from ddetr_cli.engine import PredictOptions, run_prediction

    result = run_prediction("best.pt", ["street.jpg"], PredictOptions(conf=0.3, viz=True))
    print(result.run_dir, result.predictions()[0]["detections"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.io import atomic_write_text
from ..errors import DdetrError, OutputError, RunError
from .loops.predict import PredictResult, Predictor, predict_items
from .loops.runner import ModelRunner, TorchRunner, is_onnx, load_runner  # noqa: F401  (re-exported: the one chooser)
from .parts.device import resolve_device
from .report.annotated import AnnotatedWriter
from .report.progress import NullReporter, Reporter
from .runs.folders import DEFAULT_NAME, allocate_run_dir, release_run_dir, split_out

@dataclass
class PredictOptions:
    conf: float = 0.5  # minimum score of a detection
    top_k: int = 100  # detections kept per image before the conf filter
    imgsz: int | None = None  # shorter side (default: the size the model was trained at, else 800)
    max_size: int | None = None  # longer-side cap (default: the training value, else 1333)
    batch_size: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | auto | bf16 | fp16
    backend: str = "auto"  # deformable-attention op: auto | native | torch
    cuda_graph: bool = False  # on CUDA, replay the forward as a CUDA graph per input shape
    viz: bool = False  # also save annotated images and videos
    coco_json: bool = False  # also write results_coco.json
    project: str = "runs/predict"
    name: str = DEFAULT_NAME
    out: str | Path | None = None  # this folder (if it holds a run: out2, ...) instead of project/name


def run_prediction(weights: str | Path | None, sources: Sequence[str], options: PredictOptions | None = None,
                   reporter: Reporter | None = None) -> PredictResult:
    """Predicts every input of ``sources`` (image files, folders, globs, videos)
    with ``weights``, writes the run folder and returns the
    :class:`~.loops.predict.PredictResult` (``run_dir``, ``records``, ``failed``
    (unreadable inputs, which do not stop the run), ``speed_ms``, ``imgsz``).
    ``reporter`` hears of every record and failure (``predict_*`` hooks).
    Raises :class:`~ddetr_cli.errors.DdetrError` subclasses before predicting:
    bad options or weights, no usable input (nothing is created then), a run
    folder that cannot be written. The folder is claimed before the first
    image; when no input could be read it is removed again (``run_dir`` None)."""
    from ..data import inference_size
    from ..data.sources import expand_sources

    opts = options or PredictOptions()
    reporter = reporter or NullReporter()
    if not 0.0 <= opts.conf <= 1.0:  # also refuses NaN
        raise DdetrError(f"must be a number in [0, 1], got {opts.conf}", param="conf")
    device = resolve_device(opts.device)
    runner = load_runner(weights, device, backend=opts.backend, amp=opts.amp, cuda_graph=opts.cuda_graph)
    reporter.info(f"loaded {runner.source}" + (" (onnxruntime)" if is_onnx(runner) else ""))
    if is_onnx(runner) and opts.amp != "off":
        reporter.warn("amp has no effect on an .onnx model (onnxruntime runs it in float32)")
    elif getattr(runner, "amp_note", None):
        reporter.warn(runner.amp_note)
    imgsz, max_size = inference_size(runner.input_size, opts.imgsz, opts.max_size)
    predictor = Predictor(runner, imgsz=imgsz, max_size=max_size, conf=opts.conf, top_k=opts.top_k,
                          batch_size=opts.batch_size)  # fmt: skip
    notes: list[str] = []
    entries = expand_sources(list(sources), notes=notes)
    for note in notes:
        reporter.warn(note)
    if all(entry.error is not None for entry in entries):
        first = next(iter(entries), None)
        detail = f": {first.path}: {first.error}" if first is not None else ""
        raise RunError(f"nothing to predict{detail}", param="sources")
    project, name = split_out(opts.out) if opts.out is not None else (Path(opts.project), opts.name)
    try:
        run_dir = allocate_run_dir(project, name)
    except OutputError as exc:
        exc.param = "out" if opts.out is not None else "project"
        raise
    try:
        return _predict(predictor, entries, opts, run_dir, imgsz, device, reporter)
    finally:
        release_run_dir(run_dir)  # the claim; the folder too if nothing was written


def _predict(predictor: Predictor, entries, opts: PredictOptions, run_dir: Path, imgsz: int, device,
             reporter: Reporter) -> PredictResult:
    from ..data.sources import count_items, iter_sources

    result = PredictResult(run_dir=run_dir, imgsz=imgsz, device=str(device))
    writer = AnnotatedWriter(run_dir) if opts.viz else None
    reporter.predict_start(count_items(entries))
    try:
        predict_items(predictor, iter_sources(entries), result, writer=writer, reporter=reporter)
    except DdetrError:
        raise
    except ValueError as exc:  # the runner refused a batch, e.g. a static-size .onnx given another size
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"prediction stopped: {first}") from None
    finally:
        reporter.close()
        if writer is not None:
            writer.close()
    if not result.records:  # every input unreadable: nothing to keep
        result.run_dir = None
        return result
    result.predictions_json = atomic_write_text(run_dir / "predictions.json", json.dumps(result.predictions(), indent=1))
    if opts.coco_json:
        result.coco_json = atomic_write_text(run_dir / "results_coco.json", json.dumps(result.coco_results()))
    if writer is not None:
        result.visualizations = writer.written
    return result

"""A training run from a dataset (or a request to continue one).

:func:`run_training` is what ``ddetr train`` calls and what a Python script
calls to do the same: resolve the training config (dataset YAML, ``--config``
file, overrides; or the checkpoint's own config on resume), build and check the
datasets, join the process group under torchrun, build the model (fresh,
fine-tuned from ``weights`` or resumed), create the run folder, write
``config.yaml`` and train. Every check that can fail does so before the first
training step, with a one-line ``ValueError`` subclass naming the file or
option::

    from ddetr_cli.engine import run_training

    result = run_training("shapes", overrides={"max_iters": 100, "out": "runs/mine"})
    print(result.run_dir, result.best_ap)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed
from .checkpointing import load_train_checkpoint, next_run_dir
from .config import TrainConfig, TrainConfigError, merge, resolve
from .device import resolve_device
from .progress import Reporter
from .setup import build_datasets, build_model_config, transfer_weights
from .train import Trainer, TrainResult

if TYPE_CHECKING:
    from ..data import ScanReport

_log = logging.getLogger("ddetr")

# Options that may change when resuming (everything else comes from the checkpoint).
RESUME_OVERRIDABLE = ("epochs", "device", "workers", "time_limit", "save_every_iters", "max_iters", "eval_every", "lr_drop")


class RunError(ValueError):
    """A run request that cannot start: arguments that do not fit together, no
    checkpoint to resume, a finished run, an occupied run folder. One-line
    message. ``usage``: the arguments themselves are wrong (the CLI shows its
    usage); ``param``: the option at fault, when there is one."""

    def __init__(self, message: str, *, usage: bool = False, param: str | None = None) -> None:
        super().__init__(message)
        self.usage = usage
        self.param = param


def run_training(
    data: str | None = None,
    *,
    config_path: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    show_scan: Callable[[ScanReport, ScanReport, list[str]], None] | None = None,
) -> TrainResult | None:
    """Trains on ``data`` (a dataset YAML or ``"shapes"``), or continues the run
    folder (or ``weights/last.pt``) given as ``resume``.

    ``config_path``: YAML with ``train:`` / ``model:`` sections (not with
    ``resume``). ``overrides``: :class:`~.config.TrainConfig` fields that win over
    every other layer (the command-line options; None values are ignored); on
    resume only :data:`RESUME_OVERRIDABLE` may be given. ``reporter``: progress
    (rank 0 only; default none). ``log`` / ``warn``: one-line messages (default:
    the ``ddetr`` logger). ``show_scan(train_report, val_report, class_names)``:
    called on rank 0 with the dataset scan before training.

    Returns the :class:`~.train.TrainResult` (its ``run_dir`` is the run folder)
    on rank 0, None on other ranks. Raises :class:`RunError`,
    :class:`~.config.TrainConfigError`, :class:`~.device.DeviceError`,
    ``ConfigError`` / ``DatasetError`` / ``ImageReadError`` (data),
    ``CheckpointError``, :class:`~.labelmap.ClassMismatchError` before training;
    :class:`~.train.TrainingError` or :class:`~.train.TrainingInterrupted`
    (``last.pt`` saved) during it.
    """
    log = log or _log.info
    warn = warn or _log.warning
    opts = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg, dc, ckpt, run_dir = _resolve_request(data, config_path, resume, opts, log)
    device = resolve_device(cfg.device)
    owns_group = not distributed.is_initialized()  # a process group started by the caller stays up
    info = distributed.init_distributed(device)
    try:
        device = distributed.device_for(info, device)
        return _train(cfg, dc, ckpt, run_dir, device, info, model_explicit="model" in opts,
                      reporter=reporter, log=log, warn=warn, show_scan=show_scan)
    finally:
        if owns_group:
            distributed.cleanup()


def _resolve_request(data: str | None, config_path: str | Path | None, resume: str | Path | None,
                     opts: dict[str, Any], log: Callable[[str], None]):
    """(train config, dataset config, checkpoint or None, run folder or None) of
    a new run (``data``) or of the run to continue (``resume``)."""
    from ..data import load_dataset_config

    ckpt = None
    if resume is not None:
        if data is not None or config_path is not None:
            raise RunError("--resume continues a run with its saved config: drop DATA and --config", usage=True)
        last = Path(resume)
        last = last / "weights" / "last.pt" if last.is_dir() else last
        if not last.exists():
            raise RunError(f"{last}: no such checkpoint (expected RUN_DIR or RUN_DIR/weights/last.pt)", usage=True, param="--resume")
        ckpt = load_train_checkpoint(last)
        cfg = TrainConfig.from_dict(ckpt["train_config"], source=f"{last}: train_config")
        fixed = [k for k in opts if k not in RESUME_OVERRIDABLE]
        if fixed:
            raise RunError(
                f"{_flag(fixed[0])} cannot change when resuming (allowed: "
                + ", ".join(_flag(k) for k in RESUME_OVERRIDABLE) + ")",
                usage=True,
            )
        old_epochs, old_drop = cfg.epochs, cfg.effective_lr_drop()
        cfg = merge(cfg, opts, "command line").validate()
        if int(ckpt["epoch"]) >= cfg.epochs:
            raise RunError(
                f"{last}: the run already finished {ckpt['epoch']} of {cfg.epochs} epochs; pass --epochs N (> {ckpt['epoch']}) to extend it"
            )
        if cfg.epochs != old_epochs:
            log(f"extending the schedule: {old_epochs} -> {cfg.epochs} epochs, lr drop at epoch {old_drop} -> {cfg.effective_lr_drop()}")
        run_dir = last.parent.parent
        data = cfg.data
        if data is None:
            raise TrainConfigError(f"{last}: the checkpoint does not record its dataset")
        dc = load_dataset_config(data)
    else:
        if data is None:
            raise RunError("missing DATA (a dataset YAML or 'shapes'), or --resume RUN_DIR", usage=True)
        dc = load_dataset_config(data)
        cfg = resolve(
            dataset_source="shapes" if _is_shapes(data, dc) else str(dc.source),
            dataset_train=dc.train_options,
            dataset_model=dc.model,
            config_path=config_path,
            cli={**opts, "data": data if data == "shapes" else str(dc.source)},
        )
        run_dir = None
    return cfg, dc, ckpt, run_dir


def _train(cfg: TrainConfig, dc, ckpt: dict | None, run_dir: Path | None, device, info, *, model_explicit: bool,
           reporter, log, warn, show_scan) -> TrainResult | None:
    from ..checkpoints.io import atomic_write_text
    from ..checkpoints.native import model_payload
    from ..data import collate

    main = info.is_main
    ds = build_datasets(cfg, dc)
    train_scan, val_scan = ds.train.scan(), ds.val.scan()
    if main and show_scan is not None:
        show_scan(train_scan, val_scan, list(ds.class_names))
    _check_scan(ds, train_scan, val_scan, warn)

    model, notes = _build_model(cfg, ds, ckpt, model_explicit=model_explicit)
    if main:
        for note in notes:
            log(note) if note.startswith("fine-tuning") else warn(note)

    if run_dir is None:
        if main:
            if cfg.out:
                run_dir = Path(cfg.out)
                if (run_dir / "weights" / "last.pt").exists():
                    raise RunError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
                run_dir.mkdir(parents=True, exist_ok=True)
            else:
                run_dir = next_run_dir(cfg.project, cfg.name)
        run_dir = Path(distributed.broadcast_object(str(run_dir) if run_dir else None))
    if main:
        import yaml

        doc = {"train": cfg.to_dict(), "model": model.config.to_dict()}
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))
        log(f"run folder: {run_dir}  (device {device}, {info.world_size} process(es), "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")

    trainer = Trainer(
        cfg, model, ds.train, ds.val, ds.val.coco, list(ds.category_ids), run_dir, device,
        payload_fn=model_payload, collate_fn=collate, reporter=reporter, resume=ckpt, plot_fn=_plotter(),
    )
    if ckpt is not None and main:
        log(f"resuming from epoch {trainer.epoch}" + (f", iteration {trainer.step_in_epoch}" if trainer.step_in_epoch else ""))
    result = trainer.fit()
    return result if main else None


def _build_model(cfg: TrainConfig, ds, ckpt: dict | None, model_explicit: bool):
    """(model, notes) for a run on the datasets ``ds``: resumed from ``ckpt``,
    fine-tuned from ``cfg.weights`` (the checkpoint's config unless
    ``model_explicit``) or fresh (optionally with ``cfg.pretrained_backbone``).
    ``notes``: what fine-tuning did, one line each."""
    from ..models import ModelConfig, build_model

    notes: list[str] = []
    if ckpt is not None:
        mc = ModelConfig.from_dict(ckpt["model_config"], source="checkpoint model_config")
        model = build_model(mc)
    elif cfg.weights:
        from ..checkpoints import load_model

        src = load_model(cfg.weights)
        mc = build_model_config(cfg, len(ds.category_ids), base=None if model_explicit else src.config)
        model = build_model(mc)
        src_ids = list(src.category_ids) if getattr(src, "category_ids", None) is not None else None
        notes += transfer_weights(model, src.state_dict(), src_ids, int(src.config.num_classes), list(ds.category_ids))
        notes.insert(0, f"fine-tuning from {cfg.weights}")
    else:
        mc = build_model_config(cfg, len(ds.category_ids))
        model = build_model(mc)
        if cfg.pretrained_backbone:
            from ..checkpoints.torchvision import load_backbone_weights

            load_backbone_weights(model, cfg.pretrained_backbone)
    model.class_names = list(ds.class_names)
    model.category_ids = list(ds.category_ids)
    model.input_size = (cfg.eval_size, cfg.eval_max_size)
    return model, notes


def _check_scan(ds, train_scan, val_scan, warn: Callable[[str], None]) -> None:
    from ..data import DatasetError

    for split, d, report in (("train", ds.train, train_scan), ("val", ds.val, val_scan)):
        if report.missing_files and report.missing_files >= len(d):
            raise DatasetError(f"{d.images_dir}: none of the {len(d)} images listed in {d.annotation_file} exist")
        for problem in report.problems:
            warn(f"{split}: {problem}")
    if len(ds.train.coco.getAnnIds()) == 0:
        raise DatasetError(f"{ds.train.annotation_file}: the training split has no annotations")


def _is_shapes(data: str, dc) -> bool:
    """The built-in synthetic dataset: by name, or a YAML written by its generator."""
    if data == "shapes":
        return True
    meta = Path(dc.source).parent / "meta.json" if dc.source else None
    try:
        return meta is not None and "n_train" in json.loads(meta.read_text(encoding="utf-8")).get("spec", {})
    except (OSError, ValueError, AttributeError):
        return False


def _flag(key: str) -> str:
    return {"save_every_iters": "--save-every", "batch_size": "--batch-size"}.get(key, "--" + key.replace("_", "-"))


def _plotter():
    try:
        from ..viz import plot_metrics
    except ImportError:
        return None
    return plot_metrics

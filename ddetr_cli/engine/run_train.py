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

:func:`build_trainer` is the one place a :class:`~.loops.train.Trainer` is put
together (datasets, model, label map); the tests use it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError, RunError, TrainConfigError
from .config import TrainConfig, merge, resolve
from .loops.train import Trainer, TrainResult
from .parts import distributed
from .parts.amp import resolve_amp
from .parts.device import resolve_device
from .report.progress import Reporter
from .runs.assemble import Datasets, build_datasets, build_model, check_scans
from .runs.checkpoint import load_train_checkpoint
from .runs.folders import CLAIM, allocate_run_dir, claim_run_dir, release_run_dir
from .runs.rng import seed_everything

if TYPE_CHECKING:
    from ..data import ScanReport

_log = logging.getLogger("ddetr")

# Options that may change when resuming (everything else comes from the checkpoint).
RESUME_OVERRIDABLE = ("epochs", "device", "workers", "time_limit", "time_lr_drop", "save_every_iters", "max_iters", "eval_every", "lr_drop")


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
    on rank 0, None on other ranks. Raises :class:`~ddetr_cli.errors.DdetrError`
    subclasses (``RunError``, ``TrainConfigError``, ``DeviceError``,
    ``ConfigError``, ``DatasetError``, ``ImageReadError``, ``CheckpointError``,
    ``ClassMismatchError``) before training; ``TrainingError`` or
    :class:`~.loops.train.TrainingInterrupted` (``last.pt`` saved) during it.
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
            raise RunError("`resume` continues a run with its saved config: drop `data` and `config_path`", usage=True)
        last = Path(resume)
        last = last / "weights" / "last.pt" if last.is_dir() else last
        if not last.exists():
            raise RunError(f"{last}: no such checkpoint (expected RUN_DIR or RUN_DIR/weights/last.pt)", usage=True, param="resume")
        ckpt = load_train_checkpoint(last)
        cfg = TrainConfig.from_dict(ckpt["train_config"], source=f"{last}: train_config")
        fixed = [k for k in opts if k not in RESUME_OVERRIDABLE]
        if fixed:
            raise RunError(
                f"`{fixed[0]}` cannot change when resuming (allowed: "
                + ", ".join(f"`{k}`" for k in RESUME_OVERRIDABLE) + ")",
                usage=True,
            )
        old_epochs, old_drop = cfg.epochs, cfg.effective_lr_drop()
        cfg = merge(cfg, opts, "command line").validate()
        if int(ckpt["epoch"]) >= cfg.epochs:
            _tidy_finished(last.parent.parent)
            raise RunError(
                f"{last}: the run already finished {ckpt['epoch']} of {cfg.epochs} epochs; pass `epochs` > {ckpt['epoch']} to extend it"
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
            raise RunError("missing `data` (a dataset YAML or 'shapes'), or `resume` RUN_DIR", usage=True)
        dc = load_dataset_config(data)
        cfg = resolve(
            dataset_source="shapes" if dc.is_shapes else str(dc.source),
            dataset_train=dc.train_options,
            dataset_model=dc.model,
            config_path=config_path,
            cli={**opts, "data": data if data == "shapes" else str(dc.source)},
        )
        run_dir = None
    return cfg, dc, ckpt, run_dir


def _train(cfg: TrainConfig, dc, ckpt: dict | None, run_dir: Path | None, device, info, *, model_explicit: bool,
           reporter, log, warn, show_scan) -> TrainResult | None:
    main = info.is_main
    ds = build_datasets(cfg, dc)
    train_scan, val_scan = ds.train.scan(), ds.val.scan()
    if main and show_scan is not None:
        show_scan(train_scan, val_scan, list(ds.class_names))
    check_scans(ds, train_scan, val_scan, warn)
    trainer = build_trainer(cfg, run_dir, device, datasets=ds, ckpt=ckpt, reporter=reporter, model_explicit=model_explicit,
                            log=log if main else _quiet, warn=warn if main else _quiet)  # fmt: skip
    if run_dir is None:  # a new run: its folder, claimed once everything else is known to work
        run_dir = _new_run_dir(cfg) if main else None
        trainer.run_dir = Path(distributed.broadcast_object(str(run_dir) if run_dir else None))
    elif main:
        _claim(run_dir)
    try:
        return _start(cfg, trainer, ckpt, device, info, log, warn)
    finally:
        if main:
            release_run_dir(trainer.run_dir)


def _start(cfg: TrainConfig, trainer: Trainer, ckpt: dict | None, device, info, log, warn) -> TrainResult | None:
    from ..checkpoints.io import atomic_write_text

    main = info.is_main
    if main:
        import yaml

        doc = {"train": cfg.to_dict(), "model": trainer.model.config.to_dict()}
        atomic_write_text(trainer.run_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))
        log(f"run folder: {trainer.run_dir}  (device {device}, {info.world_size} process(es), "
            f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M parameters)")
        if ckpt is not None:
            log(f"resuming from epoch {trainer.epoch}" + (f", iteration {trainer.step_in_epoch}" if trainer.step_in_epoch else ""))
    result = trainer.fit()
    if main and result.last_eval is not None:
        _write_plots(trainer, result.last_eval, warn)
    return result if main else None


def _tidy_finished(run_dir: Path) -> None:
    """A finished run killed before it let go of its folder (kill -9 during the
    final evaluation) leaves its claim and perhaps temp files: a resume that
    finds nothing to train still clears them, unless a live run owns the folder."""
    from .runs.checkpoint import remove_stale_temps

    if claim_run_dir(run_dir):
        for folder in (run_dir, run_dir / "weights"):
            remove_stale_temps(folder)
        release_run_dir(run_dir)


def _claim(run_dir: Path) -> None:
    if not claim_run_dir(run_dir):
        raise RunError(f"{run_dir}: in use by another run (its {CLAIM} names the process)")


def _write_plots(trainer: Trainer, last_eval, warn) -> None:
    """PR curve, confusion matrix, labels and predictions of the last validation;
    a plot that fails is a warning, never an error."""
    from .report.plots import PLOT_CONF, write_val_plots

    if not trainer.plot:
        return
    try:
        write_val_plots(trainer.run_dir, trainer.val_set, last_eval.detections, PLOT_CONF, train_set=trainer.train_set,
                        class_names=list(trainer.model.class_names))
    except Exception as exc:  # noqa: BLE001 - plots must never fail a finished run
        warn(f"could not draw the validation plots: {exc}")


def _quiet(message: str) -> None:
    pass


def _new_run_dir(cfg: TrainConfig) -> Path:
    """``cfg.out`` exactly (refused when it holds a run), else the next free
    ``project/name`` (:func:`~.runs.folders.allocate_run_dir`)."""
    if not cfg.out:
        return allocate_run_dir(cfg.project, cfg.name)
    run_dir = Path(cfg.out)
    if (run_dir / "weights" / "last.pt").exists():
        raise RunError(f"{run_dir}: already holds a run; continue it with `resume` {run_dir} or choose another `out`",
                       param="out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}", param="out") from None
    _claim(run_dir)
    return run_dir


def build_trainer(cfg: TrainConfig, run_dir: Path | None, device, *, datasets: Datasets | None = None,
                  ckpt: dict | None = None, reporter: Reporter | None = None, model_explicit: bool = False,
                  log: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None) -> Trainer:
    """The one builder of a :class:`~.loops.train.Trainer` for ``cfg`` (its
    ``data`` names the dataset): the datasets (built unless given), the model
    (fresh, fine-tuned from ``cfg.weights`` or resumed from ``ckpt``; what
    fine-tuning did goes to ``log`` / ``warn``) and the label map. ``run_dir``
    may be None and set on the trainer before ``fit``."""
    from ..data import load_dataset_config

    log, warn = log or _log.info, warn or _log.warning
    ds = datasets or build_datasets(cfg, load_dataset_config(cfg.data))
    seed_everything(cfg.seed)  # the model's initialisation follows `seed` (a resume loads its weights instead)
    model, notes = build_model(cfg, ds, ckpt, model_explicit=model_explicit)
    for note in notes:
        log(note) if note.startswith("fine-tuning") else warn(note)
    amp_note = resolve_amp(cfg.amp, device)[1]  # bf16 asked on a CPU without native bf16
    if amp_note:
        warn(amp_note)
    return Trainer(cfg, model, ds.train, ds.val, ds.val.coco, list(ds.category_ids), run_dir, device,
                   reporter=reporter, resume=ckpt)  # fmt: skip

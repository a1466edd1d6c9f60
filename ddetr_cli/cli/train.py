"""`ddetr train`: train Deformable DETR on a COCO-format dataset (or ``shapes``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .app import App, pass_app, resolve_device

# Options that may change when resuming (everything else comes from the checkpoint).
RESUME_OVERRIDABLE = ("epochs", "device", "workers", "time_limit", "save_every_iters", "max_iters", "eval_every", "lr_drop")


@click.command("train")
@click.argument("data", required=False)
@click.option("--model", "model", default=None, help="Model preset (r50, tiny, ...) or a YAML file of model config fields.")
@click.option("--variant", type=click.Choice(["base", "refine", "two-stage"]), default=None, help="Deformable DETR variant (default: the preset's).")
@click.option("--imgsz", type=int, default=None, help="Largest training scale (shorter side, pixels).")
@click.option("--epochs", type=int, default=None, help="Total epochs (on --resume: extend a run).")
@click.option("--batch-size", "batch_size", type=int, default=None, help="Images per process per step.")
@click.option("--lr", type=float, default=None, help="Base learning rate (backbone: --config lr_backbone).")
@click.option("--lr-drop", "lr_drop", type=int, default=None, help="Epoch of the x0.1 lr drop (default: 80% of --epochs).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes.")
@click.option("--project", default=None, help="Parent folder of runs (default runs/train).")
@click.option("--name", default=None, help="Run name under --project (exp, exp2, ... never overwritten).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Exact run folder (instead of --project/--name).")
@click.option("--weights", default=None, type=click.Path(), help="Fine-tune from a checkpoint (own, official or Hugging Face).")
@click.option("--pretrained-backbone", "pretrained_backbone", default=None, type=click.Path(), help="torchvision ResNet weights (.pth) for the backbone.")
@click.option("--amp", type=click.Choice(["off", "auto", "bf16", "fp16"]), default=None, help="Mixed precision.")
@click.option("--ema/--no-ema", default=None, help="Keep an exponential moving average of the weights.")
@click.option("--resume", default=None, type=click.Path(), help="Continue a run folder (or its weights/last.pt).")
@click.option("--config", "config_path", default=None, type=click.Path(), help="YAML with train: / model: sections.")
@click.option("--save-every", "save_every_iters", type=int, default=None, help="Also checkpoint every N iterations.")
@click.option("--eval-every", "eval_every", type=int, default=None, help="Validate every N epochs.")
@click.option("--time-limit", "time_limit", type=float, default=None, help="Stop cleanly after this many minutes (evaluated, checkpointed).")
@click.option("--max-iters", "max_iters", type=int, default=None, help="Stop after this many optimizer steps in total.")
@click.option("--seed", type=int, default=None)
@pass_app
def command(app: App, data: str | None, config_path: str | None, resume: str | None, **options: Any) -> None:
    """Train on DATA: a dataset YAML, or `shapes` for the built-in synthetic set.

    \b
    ddetr train shapes --time-limit 20         # tiny model, CPU friendly
    ddetr train coco.yaml --model r50 --epochs 50 --batch-size 4 --amp bf16
    ddetr train --resume runs/train/exp --epochs 60
    scripts/torchrun_train.sh 8 coco.yaml --batch-size 4    # 8 GPUs, one node
    """
    from ..checkpoints.io import CheckpointError
    from ..data import ConfigError, DatasetError, ImageReadError
    from ..engine.config import TrainConfigError
    from ..engine.labelmap import ClassMismatchError
    from ..engine.train import TrainingError, TrainingInterrupted

    expected = (ConfigError, DatasetError, ImageReadError, TrainConfigError, CheckpointError, ClassMismatchError, TrainingError)
    try:
        _run(app, data, config_path, resume, options)
    except expected as exc:
        raise click.ClickException(str(exc)) from None
    except TrainingInterrupted as exc:
        run_dir = exc.checkpoint.parent.parent
        raise click.ClickException(f"interrupted: saved {exc.checkpoint}; continue with: ddetr train --resume {run_dir}") from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted (nothing saved since the last checkpoint); continue with: ddetr train --resume RUN_DIR") from None
    finally:
        from ..engine import distributed

        distributed.cleanup()


def _run(app: App, data: str | None, config_path: str | None, resume: str | None, options: dict[str, Any]) -> None:
    from ..checkpoints.io import atomic_write_text
    from ..data import load_dataset_config
    from ..engine import distributed
    from ..engine.checkpointing import load_train_checkpoint, next_run_dir
    from ..engine.config import TrainConfig, TrainConfigError, merge, resolve
    from ..engine.progress import RichReporter
    from ..engine.setup import build_datasets
    from ..engine.train import Trainer

    cli_opts = {k: v for k, v in options.items() if v is not None}
    ckpt = None
    if resume is not None:
        if data is not None or config_path is not None:
            raise click.UsageError("--resume continues a run with its saved config: drop DATA and --config")
        last = Path(resume)
        last = last / "weights" / "last.pt" if last.is_dir() else last
        if not last.exists():
            raise click.BadParameter(f"{last}: no such checkpoint (expected RUN_DIR or RUN_DIR/weights/last.pt)", param_hint="--resume")
        ckpt = load_train_checkpoint(last)
        cfg = TrainConfig.from_dict(ckpt["train_config"], source=f"{last}: train_config")
        fixed = [k for k in cli_opts if k not in RESUME_OVERRIDABLE]
        if fixed:
            raise click.UsageError(
                f"{_flag(fixed[0])} cannot change when resuming (allowed: "
                + ", ".join(_flag(k) for k in RESUME_OVERRIDABLE) + ")"
            )
        old_epochs, old_drop = cfg.epochs, cfg.effective_lr_drop()
        cfg = merge(cfg, cli_opts, "command line").validate()
        if int(ckpt["epoch"]) >= cfg.epochs:
            raise click.ClickException(
                f"{last}: the run already finished {ckpt['epoch']} of {cfg.epochs} epochs; pass --epochs N (> {ckpt['epoch']}) to extend it"
            )
        if cfg.epochs != old_epochs:
            app.info(f"extending the schedule: {old_epochs} -> {cfg.epochs} epochs, lr drop at epoch {old_drop} -> {cfg.effective_lr_drop()}")
        run_dir = last.parent.parent
        data = cfg.data
        if data is None:
            raise TrainConfigError(f"{last}: the checkpoint does not record its dataset")
        dc = load_dataset_config(data)
    else:
        if data is None:
            raise click.UsageError("missing DATA (a dataset YAML or 'shapes'), or --resume RUN_DIR")
        dc = load_dataset_config(data)
        cfg = resolve(
            dataset_source="shapes" if _is_shapes(data, dc) else str(dc.source),
            dataset_train=dc.train_options,
            dataset_model=dc.model,
            config_path=config_path,
            cli={**cli_opts, "data": data if data == "shapes" else str(dc.source)},
        )
        run_dir = None

    device = resolve_device(cfg.device)
    info = distributed.init_distributed(device)
    device = distributed.device_for(info, device)
    main = info.is_main
    reporter = RichReporter(app.err, interactive=app.interactive, quiet=app.quiet) if main else None

    ds = build_datasets(cfg, dc)
    if main:
        _print_scan(app, ds)
    _check_scan(ds, app)

    model, notes = _build_model(cfg, ds, ckpt, model_explicit="model" in cli_opts)
    if main:
        for note in notes:
            app.info(note) if note.startswith("fine-tuning") else app.warn(note)

    if run_dir is None:
        if main:
            if cfg.out:
                run_dir = Path(cfg.out)
                if (run_dir / "weights" / "last.pt").exists():
                    raise click.ClickException(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
                run_dir.mkdir(parents=True, exist_ok=True)
            else:
                run_dir = next_run_dir(cfg.project, cfg.name)
        run_dir = Path(distributed.broadcast_object(str(run_dir) if run_dir else None))
    if main:
        import yaml

        doc = {"train": cfg.to_dict(), "model": model.config.to_dict()}
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))
        app.info(f"run folder: {run_dir}  (device {device}, {info.world_size} process(es), "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")

    from ..checkpoints.native import model_payload
    from ..data import collate

    trainer = Trainer(
        cfg, model, ds.train, ds.val, ds.val.coco, list(ds.category_ids), run_dir, device,
        payload_fn=model_payload, collate_fn=collate, reporter=reporter, resume=ckpt, plot_fn=_plotter(),
    )
    if ckpt is not None and main:
        app.info(f"resuming from epoch {trainer.epoch}" + (f", iteration {trainer.step_in_epoch}" if trainer.step_in_epoch else ""))
    result = trainer.fit()
    if not main:
        return
    if result.stopped_early:
        app.info(f"stopped at the {result.stopped_early} after {result.global_step} iterations; continue with: ddetr train --resume {run_dir}")
    if result.last_eval is not None:
        ap = result.last_eval.stats[0]
        app.out.print(f"AP {ap:.4f}  AP50 {result.last_eval.stats[1]:.4f}  best AP {result.best_ap:.4f}  "
                      f"epochs {result.epochs_done}  iterations {result.global_step}  run {run_dir}", highlight=False)
    else:
        app.out.print(f"epochs {result.epochs_done}  iterations {result.global_step}  run {run_dir}", highlight=False)


def _is_shapes(data: str, dc) -> bool:
    """The built-in synthetic dataset: by name, or a YAML written by its generator."""
    if data == "shapes":
        return True
    import json

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


def _print_scan(app: App, ds) -> None:
    from rich.table import Table

    if app.quiet:
        return
    train, val = ds.train.scan(), ds.val.scan()
    table = Table(title="dataset", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("train", justify="right", overflow="fold")
    table.add_column("val", justify="right", overflow="fold")
    for (name, a), (_, b) in zip(train.as_rows(), val.as_rows()):
        if name == "annotation file":
            a, b = Path(a).name, Path(b).name
        table.add_row(name, a, b)
    table.add_row("classes", ", ".join(ds.class_names[:10]) + (" ..." if len(ds.class_names) > 10 else ""), "")
    app.err.print(table)


def _check_scan(ds, app: App) -> None:
    from ..data import DatasetError

    for split, d in (("train", ds.train), ("val", ds.val)):
        report = d.scan()
        if report.missing_files and report.missing_files >= len(d):
            raise DatasetError(f"{d.images_dir}: none of the {len(d)} images listed in {d.annotation_file} exist")
        for problem in report.problems:
            app.warn(f"{split}: {problem}")
    if sum(len(a) for a in (ds.train.coco.getAnnIds(),)) == 0:
        raise DatasetError(f"{ds.train.annotation_file}: the training split has no annotations")


def _build_model(cfg, ds, ckpt: dict | None, model_explicit: bool):
    """(model, notes): resumed, fine-tuned (--weights) or fresh."""
    from ..models import ModelConfig, build_model
    from ..engine.setup import build_model_config, transfer_weights

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
    return model, notes

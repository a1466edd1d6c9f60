"""`ddetr train`: train Deformable DETR on a COCO-format dataset (or ``shapes``)."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path
from typing import Any

import click

from . import options
from .app import App, pass_app
from .errors import user_errors


@click.command("train")
@click.argument("data", required=False)
@click.option("--model", "model", default=None, help="Model preset (r50, tiny, ...) or a YAML file of model config fields.")
@options.variant()
@options.imgsz("Shorter side at inference and largest training scale (default 800); the sizes below follow it.")
@options.max_size("Cap on the longer side, in training and at inference (default: 1333/800 x imgsz).")
@click.option("--multi-scale/--no-multi-scale", "multi_scale", default=None,
              help="Train at sizes from --min-scale up to --imgsz (default on); off: at --imgsz alone.")
@click.option("--min-scale", "min_scale", type=click.IntRange(1), default=None, metavar="PIXELS",
              help="Smallest multi-scale training size (default: imgsz - 10 x scale-step; 480 at 800).")
@click.option("--scale-step", "scale_step", type=click.IntRange(1), default=None, metavar="PIXELS",
              help="Step between training scales (default: 32/800 x imgsz).")
@click.option("--crop/--no-crop", default=None, help="The random resize-crop branch of the augmentation (default on).")
@click.option("--crop-min", "crop_min", type=click.IntRange(1), default=None, metavar="PIXELS",
              help="Smallest random crop side (default: 384/800 x imgsz).")
@click.option("--crop-max", "crop_max", type=click.IntRange(1), default=None, metavar="PIXELS",
              help="Largest random crop side (default: 600/800 x imgsz).")
@click.option("--crop-scales", "crop_scales", default=None, metavar="A,B,C", callback=lambda c, p, v: _int_list(p, v),
              help="Resize sizes before the crop (default: 400,500,600 /800 x imgsz).")
@click.option("--eval-size", "eval_size", type=click.IntRange(16), default=None, metavar="PIXELS",
              help="Shorter side for validation and the recorded inference size (default: imgsz).")
@click.option("--eval-max-size", "eval_max_size", type=click.IntRange(16), default=None, metavar="PIXELS",
              help="Longer-side cap for validation (default: max-size).")
@click.option("--hybrid/--no-hybrid", default=None,
              help="Hybrid matching (H-DETR): an extra one-to-many query group, training only; the saved model is a plain Deformable DETR.")
@click.option("--denoise/--no-denoise", default=None,
              help="Denoising queries (DINO): noised ground-truth boxes the decoder learns to repair, training only, two-stage models; the saved model is a plain Deformable DETR.")
@click.option("--class-loss", "class_loss", type=click.Choice(["focal", "varifocal"]), default=None,
              help="Classification loss: focal (official) or varifocal (IoU-aware scores), training only.")
@click.option("--epochs", type=int, default=None, help="Total epochs (on --resume: extend a run).")
@options.batch_size(None, "Images per process per step.")
@click.option("--lr", type=float, default=None, help="Base learning rate (backbone: --config lr_backbone).")
@click.option("--lr-drop", "lr_drop", type=int, default=None, help="Epoch of the x0.1 lr drop (default: 80% of --epochs).")
@options.device(None)
@options.workers(None)
@click.option("--project", default=None, help="Parent folder of runs (default runs/train).")
@click.option("--name", default=None, help="Run name under --project (exp, exp2, ... never overwritten).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Exact run folder (instead of --project/--name).")
@options.weights("Fine-tune from a checkpoint (own, official or Hugging Face folder).")
@click.option("--pretrained-backbone", "pretrained_backbone", default=None, type=click.Path(), help="torchvision ResNet weights (.pth) for the backbone.")
@options.amp(None)
@click.option("--ema/--no-ema", default=None, help="Keep an exponential moving average of the weights.")
@click.option("--resume", default=None, type=click.Path(), help="Continue a run folder (or its weights/last.pt).")
@click.option("--config", "config_path", default=None, type=click.Path(), help="YAML with train: / model: sections.")
@click.option("--save-every", "save_every_iters", type=int, default=None, help="Also checkpoint every N iterations.")
@click.option("--eval-every", "eval_every", type=int, default=None, help="Validate every N epochs.")
@click.option("--time-limit", "time_limit", type=float, default=None, help="Stop cleanly after this many minutes (evaluated, checkpointed); the lr drops x0.1 at a share of them (train: time_lr_drop; 0.8, the shapes recipe 0.9).")
@click.option("--max-iters", "max_iters", type=int, default=None, help="Stop after this many optimizer steps in total.")
@click.option("--seed", type=int, default=None)
@pass_app
def command(app: App, data: str | None, config_path: str | None, resume: str | None, **overrides: Any) -> None:
    """Train on DATA: a dataset YAML, or `shapes` for the built-in synthetic set.

    \b
    ddetr train shapes --time-limit 20         # tiny model, CPU friendly
    ddetr train coco.yaml --model r50 --epochs 50 --batch-size 4 --amp bf16
    ddetr train --resume runs/train/exp --epochs 60
    scripts/torchrun_train.sh 8 coco.yaml --batch-size 4    # 8 GPUs, one node
    """
    from ..engine.loops.train import TrainingInterrupted
    from ..engine.parts.interrupt import StopSignal, stop_signals_raise
    from ..engine.report.progress import RichReporter
    from ..engine.run_train import run_training

    try:
        with stop_signals_raise(), user_errors():
            result = run_training(
                data, config_path=config_path, resume=resume, overrides=overrides,
                reporter=RichReporter(app.err, interactive=app.interactive, quiet=app.quiet),
                log=app.info, warn=app.warn, show_scan=partial(_print_scan, app),
            )  # fmt: skip
    except TrainingInterrupted as exc:
        run_dir = exc.checkpoint.parent.parent
        stop = click.ClickException(f"interrupted ({exc.signal_name}): saved {exc.checkpoint}; "
                                    f"continue with: ddetr train --resume {run_dir}")
        if exc.signal_name != "SIGINT":  # preempted: 128 + the signal number, as a shell reports a signal
            stop.exit_code = 128 + int(getattr(signal, exc.signal_name, signal.SIGTERM))
        raise stop from None
    except StopSignal as exc:
        stop = click.ClickException(f"stopped by {exc.signal_name} outside the training steps; nothing was lost since the "
                                    f"last checkpoint; continue with: ddetr train --resume {resume or 'RUN_DIR'}")
        stop.exit_code = 128 + int(getattr(signal, exc.signal_name))
        raise stop from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted (nothing saved since the last checkpoint); continue with: ddetr train --resume RUN_DIR") from None
    if result is None:  # not rank 0
        return
    run_dir = result.run_dir
    if result.stopped_early:
        app.info(f"stopped at the {result.stopped_early} after {result.global_step} iterations; continue with: ddetr train --resume {run_dir}")
    if result.last_eval is not None:
        ap = result.last_eval.stats[0]
        app.out.print(f"AP {ap:.4f}  AP50 {result.last_eval.stats[1]:.4f}  best AP {result.best_ap:.4f}  "
                      f"epochs {result.epochs_done}  iterations {result.global_step}  run {run_dir}", highlight=False)
    else:
        app.out.print(f"epochs {result.epochs_done}  iterations {result.global_step}  run {run_dir}", highlight=False)


def _int_list(param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated pixel sizes, got {value!r}", param=param) from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected positive sizes, got {value!r}", param=param)
    return sizes


def _print_scan(app: App, train, val, class_names: list[str]) -> None:
    """The dataset scan (train / val ScanReports) as a table on stderr."""
    from rich.table import Table

    if app.quiet:
        return
    table = Table(title="dataset", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("train", justify="right", overflow="fold")
    table.add_column("val", justify="right", overflow="fold")
    for (name, a), (_, b) in zip(train.as_rows(), val.as_rows()):
        if name == "annotation file":
            a, b = Path(a).name, Path(b).name
        table.add_row(name, a, b)
    table.add_row("classes", ", ".join(class_names[:10]) + (" ..." if len(class_names) > 10 else ""), "")
    app.err.print(table)

"""`ddetr eval`: COCO bbox evaluation of a checkpoint on a dataset split."""

from __future__ import annotations

import click

from .app import App, pass_app


@click.command("eval")
@click.argument("data")
@click.option("--weights", required=True, type=click.Path(), help="Checkpoint: own, official Deformable DETR, Hugging Face folder or hub id (owner/name[@rev]), "
                   "short name (r50, r50-refine, r50-two-stage), or an exported .onnx (onnxruntime).")
@click.option("--split", type=click.Choice(["val", "test", "train"]), default="val", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the detections as COCO results JSON.")
@click.option("--batch-size", "batch_size", type=int, default=2, show_default=True)
@click.option("--imgsz", type=int, default=None, help="Shorter-side size (default: the training eval size, else 800).")
@click.option("--max-size", "max_size", type=int, default=None, help="Longer-side cap (default: training value, else 1333).")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--amp", type=click.Choice(["off", "auto", "bf16", "fp16"]), default="off", show_default=True)
@pass_app
def command(app: App, data: str, weights: str, split: str, json_out: str | None, batch_size: int, imgsz: int | None,
            max_size: int | None, device: str, workers: int, amp: str) -> None:
    """Evaluate WEIGHTS on a split of DATA (a dataset YAML or `shapes`).

    Prints the 12 COCO numbers verbatim, a summary table and per-class AP.
    """
    from rich.table import Table

    from ..checkpoints.io import CheckpointError
    from ..data import ConfigError, DatasetError, ImageReadError
    from ..engine.device import DeviceError
    from ..engine.labelmap import ClassMismatchError
    from ..engine.progress import RichReporter, stats_table
    from ..engine.run_eval import run_evaluation

    if batch_size < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch-size")
    try:
        ev = run_evaluation(
            data, weights, split=split, batch_size=batch_size, imgsz=imgsz, max_size=max_size, device=device,
            workers=workers, amp=amp, json_out=json_out,
            reporter=RichReporter(app.err, interactive=app.interactive, quiet=app.quiet), log=app.info,
        )
    except DeviceError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.option) from None
    except (ConfigError, DatasetError, ImageReadError, CheckpointError, ClassMismatchError) as exc:
        raise click.ClickException(str(exc)) from None
    if ev is None:  # not rank 0
        return
    result = ev.result
    app.out.print(result.summary, markup=False, highlight=False)
    app.err.print(stats_table(result, title=f"COCO bbox — {split}"))
    table = Table(title="per-class AP@[.50:.95]", header_style="bold")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("AP", justify="right")
    for cat, ap in result.per_class.items():
        table.add_row(str(cat), ev.class_names.get(cat, str(cat)), "n/a (no ground truth)" if ap < 0 else f"{ap:.3f}")
    app.out.print(table)
    if ev.json_path is not None:
        app.info(f"wrote {len(result.detections)} detections to {ev.json_path}")

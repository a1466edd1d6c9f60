"""`ddetr eval`: COCO bbox evaluation of a checkpoint on a dataset split."""

from __future__ import annotations

import json

import click

from . import options
from .app import App, pass_app
from .errors import user_errors


@click.command("eval")
@click.argument("data")
@options.weights("Checkpoint: own, official Deformable DETR, Hugging Face folder, or an exported .onnx (onnxruntime).",
                 required=True)
@click.option("--split", type=click.Choice(["val", "test", "train"]), default="val", show_default=True)
@click.option("--coco-json", "coco_json", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Also write the detections to PATH (COCO results format).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout (tables go to stderr).")
@options.batch_size(2)
@options.imgsz()
@options.max_size()
@options.device()
@options.workers(2)
@options.amp()
@click.option("--conf", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Confidence threshold of the confusion matrix and the drawn predictions.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Write PR_curve.png, confusion_matrix.png, labels.png, val_batch_pred.jpg into the run folder.")
@click.option("--project", default="runs/val", show_default=True, help="Parent folder of the plot folders.")
@click.option("--name", default="exp", show_default=True, help="Plot folder name under --project (exp, exp2, ...).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Exact plot folder (instead of --project/--name).")
@pass_app
def command(app: App, data: str, weights: str, split: str, coco_json: str | None, as_json: bool, batch_size: int,
            imgsz: int | None, max_size: int | None, device: str, workers: int, amp: str, conf: float, plots: bool,
            project: str, name: str, out: str | None) -> None:
    """Evaluate WEIGHTS on a split of DATA (a dataset YAML or `shapes`).

    Prints the 12 COCO numbers verbatim, a summary table and per-class AP.

    \b
    ddetr eval coco.yaml -w best.pt
    ddetr eval shapes -w runs/train/shapes/weights/best.pt --coco-json dets.json
    """
    from rich.table import Table

    from ..engine.report.metrics import STAT_NAMES
    from ..engine.report.progress import RichReporter, stats_table
    from ..engine.run_eval import run_evaluation

    with user_errors():
        ev = run_evaluation(
            data, weights, split=split, batch_size=batch_size, imgsz=imgsz, max_size=max_size, device=device,
            workers=workers, amp=amp, coco_json=coco_json, plots=plots, conf=conf, project=project, name=name, out=out,
            reporter=RichReporter(app.err, interactive=app.interactive, quiet=app.quiet), log=app.info, warn=app.warn,
        )  # fmt: skip
    if ev is None:  # not rank 0
        return
    result = ev.result
    tables = app.err if as_json else app.out
    for message in result.unreadable:
        app.warn(f"unreadable image scored with no detections: {message}")
    tables.print(result.coverage, markup=False, highlight=False)
    tables.print(result.summary, markup=False, highlight=False)
    app.err.print(stats_table(result, title=f"COCO bbox — {split}"))
    table = Table(title="per-class AP@[.50:.95]", header_style="bold")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("AP", justify="right")
    for cat, ap in result.per_class.items():
        table.add_row(str(cat), ev.class_names.get(cat, str(cat)), "n/a (no ground truth)" if ap < 0 else f"{ap:.3f}")
    tables.print(table)
    if as_json:
        per_class = {ev.class_names.get(c, str(c)): (None if ap < 0 else ap) for c, ap in result.per_class.items()}
        click.echo(json.dumps({"split": split, "images": result.num_images, "unreadable": len(result.unreadable),
                               **dict(zip(STAT_NAMES, result.stats)), "per_class": per_class}, indent=1))
    if ev.json_path is not None:
        app.info(f"wrote {len(result.detections)} detections to {ev.json_path}")
    if ev.plots_dir is not None:
        app.info(f"plots saved to {ev.plots_dir}")

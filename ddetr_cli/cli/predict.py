"""`ddetr predict`: detections for images, folders, globs and videos.

Parses the options, calls :func:`ddetr_cli.engine.run_prediction` and presents
what it reports: one line per image or frame, a speed summary and where the
results went.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import options
from .app import App, pass_app
from .errors import user_errors


def _info(app: App, message: str) -> None:
    if not app.quiet:
        app.err.print(message, highlight=False, soft_wrap=True)


class _Lines:
    """The predict reporter: one line per image/frame (stdout, or stderr with
    --json), errors on stderr, a progress bar on an interactive stderr."""

    def __init__(self, app: App, lines) -> None:
        self.app, self.lines = app, lines
        self.progress = self.task = None

    def info(self, message: str) -> None:
        from rich.markup import escape

        _info(self.app, escape(message))

    def predict_start(self, num_items: int) -> None:
        if self.app.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("predict"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=self.app.err, transient=True)  # fmt: skip
            self.task = self.progress.add_task("predict", total=num_items)
            self.progress.start()

    def predict_record(self, rec) -> None:
        from rich.markup import escape

        from ..engine.loops.predict import summarize

        self._advance()
        if self.app.quiet:
            return
        name = f"{rec.file} frame {rec.frame}" if rec.frame is not None else rec.file
        n = len(rec.detections)
        summary = f" ({summarize(rec.detections)})" if n else ""
        self.lines.print(f"{escape(name)}: {n} detection{'s' if n != 1 else ''}{escape(summary)} {rec.ms:.1f} ms",
                         highlight=False, soft_wrap=True)  # fmt: skip

    def warn(self, message: str) -> None:
        from rich.markup import escape

        self.app.warn(escape(message))

    def predict_error(self, message: str) -> None:
        from rich.markup import escape

        self._advance()
        self.app.err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@click.command("predict")
@click.argument("sources", nargs=-1, required=True)
@options.weights("Checkpoint: a ddetr .pt, an official .pth, a Hugging Face model folder, or an exported .onnx "
                 "(run by onnxruntime). Default: the COCO model r50-two-stage")
@click.option("--conf", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Minimum score of a detection.")
@options.device()
@click.option("--project", default="runs/predict", show_default=True, help="Parent folder of runs.")
@click.option("--name", default="exp", show_default=True, help="Run name under --project (exp, exp2, ... never overwritten).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder instead of --project/--name (if it holds a run: OUT2, OUT3, ...).")
@click.option("--viz", is_flag=True, help="Also save annotated images (and mp4 videos).")
@click.option("--coco-json", is_flag=True, help="Also write results_coco.json (COCO results format).")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions JSON on stdout.")
@options.batch_size(1)
@options.imgsz()
@options.max_size()
@click.option("--top-k", type=click.IntRange(1), default=100, show_default=True,
              help="Detections kept per image before the --conf filter.")
@click.option("--backend", type=click.Choice(["auto", "native", "torch"]), default="auto", show_default=True,
              help="Deformable-attention implementation.")
@options.amp()
@click.option("--cuda-graph", is_flag=True,
              help="On a GPU, replay the forward as a CUDA graph (one per input size): several times faster at batch 1.")
@pass_app
def command(app: App, sources: tuple[str, ...], weights: str | None, as_json: bool, **opts) -> None:
    """Detect objects in SOURCE... (image files, folders, globs such as
    'imgs/*.jpg', or video files) and save predictions.json in a fresh run
    folder.

    \b
    Examples:
      ddetr predict photo.jpg --viz                 # the default COCO model (r50-two-stage)
      ddetr predict photo.jpg -w runs/train/exp/weights/best.pt --viz
      ddetr predict photo.jpg -w SenseTime/deformable-detr@main
      ddetr predict photo.jpg -w model.onnx         # through onnxruntime
      ddetr predict 'data/*.png' clip.mp4 -w best.pt --conf 0.3 --json > preds.json
    """
    from rich.markup import escape

    from ..engine.run_predict import PredictOptions, run_prediction

    if weights is None:
        from ..checkpoints.hub import DEFAULT_MODEL

        weights = DEFAULT_MODEL
        _info(app, f"no --weights: using the default COCO model {DEFAULT_MODEL}")

    reporter = _Lines(app, app.err if as_json else app.out)  # stdout stays pure JSON with --json
    with user_errors():
        result = run_prediction(weights, list(sources), PredictOptions(**opts), reporter)
    if as_json:
        click.echo(json.dumps(result.predictions(), indent=1))
    n_ok = len(result.records)
    if n_ok:
        s = result.speed_ms
        _info(app, f"Speed: {s['preprocess']:.1f} ms preprocess, {s['inference']:.1f} ms inference, "
                 f"{s['postprocess']:.1f} ms postprocess per image at imgsz {result.imgsz} on {result.device}")  # fmt: skip
    if result.run_dir is None:
        raise click.ClickException(f"none of the {len(result.failed)} input(s) could be read (see above); nothing saved")
    saved = ["predictions.json"]
    if result.coco_json is not None:
        saved.append("results_coco.json")
    if result.visualizations:
        n_viz = len(result.visualizations)
        saved.append(f"{n_viz} annotated file{'s' if n_viz != 1 else ''}")
    _info(app, f"Results saved to [bold]{escape(str(result.run_dir))}[/] ({', '.join(saved)})")
    if result.failed:
        total = n_ok + len(result.failed)
        raise click.ClickException(f"{len(result.failed)} of {total} input(s) could not be read (see above)")

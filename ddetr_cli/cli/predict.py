"""``ddetr predict``: detections for images, folders, globs and videos."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app import App, pass_app, resolve_device

WEIGHTS_HELP = (
    "Checkpoint: a ddetr .pt, an official .pth, a Hugging Face folder, an exported .onnx (run by onnxruntime), "
    "a Hugging Face hub id (owner/name[@revision]) or a short name: r50, r50-refine, r50-two-stage "
    "(the official COCO models, fetched into the Hugging Face cache). Default: r50-two-stage."
)


def _info(app: App, message: str) -> None:
    if not app.quiet:
        app.err.print(message, highlight=False, soft_wrap=True)


@click.command("predict")
@click.argument("sources", nargs=-1, required=True)
@click.option("-w", "--weights", default=None, metavar="W", help=WEIGHTS_HELP)
@click.option("--conf", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Minimum score of a detection.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: runs/predict/N). A non-empty one is never overwritten.")
@click.option("--viz", is_flag=True, help="Also save annotated images (and mp4 videos).")
@click.option("--coco-json", is_flag=True, help="Also write results_coco.json (COCO results format).")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions JSON on stdout.")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--imgsz", type=click.IntRange(16), default=None,
              help="Shortest side the images are resized to (default: the size the model was trained at, else 800).")
@click.option("--max-size", type=click.IntRange(16), default=None,
              help="Upper bound on the longest side after resizing (default: the training value, else 1333).")
@click.option("--top-k", type=click.IntRange(1), default=100, show_default=True,
              help="Detections kept per image before the --conf filter.")
@click.option("--backend", type=click.Choice(["auto", "native", "torch"]), default="auto", show_default=True,
              help="Deformable-attention implementation.")
@click.option("--amp", is_flag=True, help="Mixed precision (bf16/fp16 autocast).")
@pass_app
def command(
    app: App,
    sources: tuple[str, ...],
    weights: str | None,
    conf: float,
    device: str,
    out: Path | None,
    viz: bool,
    coco_json: bool,
    as_json: bool,
    batch_size: int,
    imgsz: int | None,
    max_size: int | None,
    top_k: int,
    backend: str,
    amp: bool,
) -> None:
    """Detect objects in SOURCE... (image files, folders, globs such as
    'imgs/*.jpg', or video files) and save predictions.json in a fresh run
    folder.

    \b
    Examples:
      ddetr predict photo.jpg --viz                 # the default COCO model (r50-two-stage)
      ddetr predict photo.jpg --weights runs/train/1/best.pt --viz
      ddetr predict photo.jpg -w SenseTime/deformable-detr@main
      ddetr predict photo.jpg -w model.onnx         # through onnxruntime
      ddetr predict 'data/*.png' clip.mp4 -w best.pt --conf 0.3 --json > preds.json
    """
    from rich.markup import escape

    dev = resolve_device(device)

    from ..checkpoints import DEFAULT_MODEL, CheckpointError
    from ..engine.predict import Predictor, count_items, expand_sources, fresh_run_dir, run_predict, summarize
    from ..runtime import is_onnx, load_runner

    if weights is None:
        weights = DEFAULT_MODEL
        _info(app, f"no --weights: using the default COCO model {DEFAULT_MODEL}")
    try:
        model = load_runner(weights, dev, msda_backend=None if backend == "auto" else backend)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(f"{weights}: cannot load model ({first})") from None

    _info(app, f"loaded {escape(model.source)}" + (" (onnxruntime)" if is_onnx(model) else ""))
    if amp and is_onnx(model):
        app.warn("--amp has no effect on an .onnx model (onnxruntime runs it in float32)")
        amp = False
    from ..data import inference_size

    imgsz, max_size = inference_size(model.input_size, imgsz, max_size)
    predictor = Predictor(model, dev, imgsz=imgsz, max_size=max_size, conf=conf, top_k=top_k,
                          batch_size=batch_size, amp=amp)  # fmt: skip
    entries = expand_sources(list(sources))
    try:
        run_dir = fresh_run_dir(out)
    except OSError as exc:
        raise click.ClickException(f"cannot create the run folder: {exc}") from None
    lines = app.err if as_json else app.out  # per-image lines; stdout stays pure JSON with --json

    progress = task = None
    if app.interactive and not app.quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("predict"), BarColumn(bar_width=30), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=app.err, transient=True)  # fmt: skip
        task = progress.add_task("predict", total=count_items(entries))
        progress.start()

    def on_record(rec) -> None:
        if progress is not None:
            progress.advance(task)
        if app.quiet:
            return
        name = f"{rec.file} frame {rec.frame}" if rec.frame is not None else rec.file
        n = len(rec.detections)
        summary = f" ({summarize(rec.detections)})" if n else ""
        lines.print(f"{escape(name)}: {n} detection{'s' if n != 1 else ''}{escape(summary)} {rec.ms:.1f} ms",
                    highlight=False, soft_wrap=True)  # fmt: skip

    def on_error(message: str) -> None:
        if progress is not None:
            progress.advance(task)
        app.err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)

    try:
        result = run_predict(predictor, list(sources), run_dir=run_dir, viz=viz, coco_json=coco_json,
                             on_record=on_record, on_error=on_error, entries=entries)  # fmt: skip
    finally:
        if progress is not None:
            progress.stop()

    if as_json:
        click.echo(json.dumps(result.predictions(), indent=1))
    n_ok = len(result.records)
    if n_ok:
        s = result.speed_ms
        _info(app, f"Speed: {s['preprocess']:.1f} ms preprocess, {s['inference']:.1f} ms inference, "
                 f"{s['postprocess']:.1f} ms postprocess per image at imgsz {imgsz} on {dev}")  # fmt: skip
    saved = ["predictions.json"]
    if result.coco_json is not None:
        saved.append("results_coco.json")
    if result.visualizations:
        n_viz = len(result.visualizations)
        saved.append(f"{n_viz} annotated file{'s' if n_viz != 1 else ''}")
    _info(app, f"Results saved to [bold]{escape(str(run_dir))}[/] ({', '.join(saved)})")
    if result.failed:
        total = n_ok + len(result.failed)
        raise click.ClickException(f"{len(result.failed)} of {total} input(s) could not be read (see above)")

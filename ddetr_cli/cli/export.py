"""``ddetr export``: the model as an ONNX graph, checked by onnxruntime after writing."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .app import App, pass_app
from .errors import render, user_errors


def _default_out(weights: str, hub) -> Path:
    if hub is not None:
        return Path((hub.short_name or hub.repo_id.split("/")[-1]) + ".onnx")
    path = Path(weights).expanduser()
    return (path / "model.onnx") if path.is_dir() else path.with_suffix(".onnx")


@click.command("export")
@options.weights("Checkpoint to export: a ddetr .pt, an official .pth or a Hugging Face folder", required=True)
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (default: beside a local checkpoint, else ./<name>.onnx).")
@click.option("--imgsz", type=click.IntRange(16), nargs=2, default=None, metavar="H W",
              help="Traced input size; with --static the only size the graph takes "
                   "(default: the inference size, 4:3, e.g. 800 1066).")
@click.option("--opset", type=click.IntRange(18), default=18, show_default=True, help="ONNX opset.")
@click.option("--dynamic/--static", default=True, show_default=True, help="Dynamic batch and image size.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the file in onnxruntime on a padded batch and compare with PyTorch (fails above 1e-4).")
@pass_app
def command(app: App, weights: str, fmt: str, out: Path | None, imgsz: tuple[int, int] | None, opset: int,
            dynamic: bool, verify: bool) -> None:
    """Export WEIGHTS to ONNX: inputs images [B,3,H,W] float32 (normalised) and
    padding_mask [B,H,W] bool (True = padded); outputs pred_logits [B,Q,C] and
    pred_boxes [B,Q,4] (cxcywh, normalised). Class names, category ids and the
    preprocessing settings go into the metadata.

    \b
    Examples:
      ddetr export -w r50-two-stage                      # -> r50-two-stage.onnx
      ddetr export -w runs/train/exp/weights/best.pt --imgsz 640 640 --static
      ddetr predict photo.jpg -w best.onnx --viz         # run it through onnxruntime
    """
    import time
    from contextlib import nullcontext

    from ..checkpoints.hub import resolve
    from ..errors import DdetrError, ExportError
    from ..export import TOLERANCE, export_onnx, verify_onnx

    with user_errors():
        resolved = resolve(weights)
        if resolved.path.suffix.lower() == ".onnx":
            raise ExportError(f"{weights} is already an ONNX file", param="weights")
        from ..checkpoints import load_model
        from ..data import inference_size

        model = load_model(resolved.path, "cpu", msda_backend="torch")
    app.info(f"loaded {resolved.describe()}")
    size, max_size = inference_size(getattr(model, "input_size", None))
    if imgsz is None:
        imgsz = (size, min(max_size, round(size * 4 / 3)))
    out = out or _default_out(weights, resolved.hub)
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"ONNX export needs {exc.name}, which is not installed: pip install \"ddetr[onnx]\"") from None
    t0 = time.perf_counter()
    with user_errors():
        with app.err.status(f"exporting to {out} (opset {opset}, {'dynamic' if dynamic else 'static'} "
                            f"{imgsz[0]}x{imgsz[1]})", spinner="dots") if app.interactive else nullcontext():
            path = export_onnx(model, out, imgsz=imgsz, opset=opset, dynamic=dynamic)
    mb = path.stat().st_size / 2**20
    app.info(f"wrote {path} ({mb:.1f} MB, opset {opset}, {'dynamic batch and size' if dynamic else f'static {imgsz[0]}x{imgsz[1]}'}) "
             f"in {time.perf_counter() - t0:.1f} s")
    if not verify:
        app.info("skipped the onnxruntime check (--no-verify)")
    else:
        try:
            res = verify_onnx(model, path, imgsz, dynamic=dynamic)
        except DdetrError as exc:
            raise click.ClickException(f"{render(str(exc))} (or skip the check with --no-verify)") from None
        line = (f"onnxruntime check on a padded batch {list(res.shape)}: max abs diff {res.max_abs_diff:.2e} "
                f"(logits {res.logits_diff:.2e}, boxes {res.boxes_diff:.2e}; tolerance {TOLERANCE:.0e})")
        if not res.ok:
            raise click.ClickException(f"{path}: FAILED {line}; the file is kept for inspection")
        app.out.print(line, highlight=False)
    app.out.print(str(path), highlight=False)


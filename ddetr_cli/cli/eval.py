"""`ddetr eval`: COCO bbox evaluation of a checkpoint on a dataset split."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .app import App, pass_app, resolve_device


@click.command("eval")
@click.argument("data")
@click.option("--weights", required=True, type=click.Path(), help="Checkpoint: own, official Deformable DETR or Hugging Face.")
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
    from ..checkpoints.io import CheckpointError
    from ..data import ConfigError, DatasetError, ImageReadError
    from ..engine.labelmap import ClassMismatchError

    if batch_size < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch-size")
    try:
        _run(app, data, weights, split, json_out, batch_size, imgsz, max_size, device, workers, amp)
    except (ConfigError, DatasetError, ImageReadError, CheckpointError, ClassMismatchError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        from ..engine import distributed

        distributed.cleanup()


def _train_sizes(weights: str) -> tuple[int | None, int | None]:
    """(eval_size, eval_max_size) recorded by our own training checkpoints."""
    from ..checkpoints.io import CheckpointError, safe_torch_load

    try:
        ckpt = safe_torch_load(weights)
    except CheckpointError:
        return None, None
    tc = ckpt.get("train_config") if isinstance(ckpt, dict) else None
    if not isinstance(tc, dict):
        return None, None
    return tc.get("eval_size"), tc.get("eval_max_size")


def _run(app, data, weights, split, json_out, batch_size, imgsz, max_size, device_name, workers, amp) -> None:
    import torch

    from ..checkpoints import load_model
    from ..checkpoints.io import atomic_write_text
    from ..data import CocoDetection, DatasetError, collate, load_dataset_config, make_eval_transforms
    from ..engine import distributed
    from ..engine.amp import amp_dtype
    from ..engine.evaluate import ShardSampler, evaluate
    from ..engine.labelmap import resolve_label_map
    from ..engine.progress import RichReporter, stats_table

    dc = load_dataset_config(data)
    sc = dc.split(split)
    device = resolve_device(device_name)
    info = distributed.init_distributed(device)
    device = distributed.device_for(info, device)

    model = load_model(weights)
    num_classes = int(model.config.num_classes)
    model_ids = getattr(model, "category_ids", None)
    if imgsz is None or max_size is None:
        tsize, tmax = _train_sizes(weights)
        imgsz = imgsz or tsize or 800
        max_size = max_size or tmax or 1333
    dataset = CocoDetection(sc.images, sc.annotations, make_eval_transforms(imgsz, max_size))
    if len(dataset) == 0:
        raise DatasetError(f"{sc.annotations}: the {split} split has no images")
    label_to_cat = resolve_label_map(num_classes, list(model_ids) if model_ids is not None else None,
                                     list(dataset.category_ids), what=f"{weights}")
    model = model.to(device).eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info.rank, info.world_size),
        collate_fn=collate, num_workers=workers, pin_memory=device.type == "cuda",
    )
    reporter = RichReporter(app.err, interactive=app.interactive, quiet=app.quiet)
    if info.is_main:
        app.info(f"evaluating {weights} on {split} ({len(dataset)} images, {imgsz}px, device {device})")
        reporter.eval_start(len(dataset))
    result = evaluate(model, loader, dataset.coco, label_to_cat, device, amp_dtype=amp_dtype(amp, device),
                      on_batch=reporter.eval_step if info.is_main else None)
    reporter.close()
    if not info.is_main or result is None:
        return
    app.out.print(result.summary, markup=False, highlight=False)
    app.err.print(stats_table(result, title=f"COCO bbox — {split}"))
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    from rich.table import Table

    table = Table(title="per-class AP@[.50:.95]", header_style="bold")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("AP", justify="right")
    for cat, ap in result.per_class.items():
        table.add_row(str(cat), names.get(cat, str(cat)), "n/a (no ground truth)" if ap < 0 else f"{ap:.3f}")
    app.out.print(table)
    if json_out:
        path = Path(json_out)
        atomic_write_text(path, json.dumps(result.detections))
        app.info(f"wrote {len(result.detections)} detections to {path}")

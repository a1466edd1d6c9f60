"""Validation plots with matplotlib (``Figure`` objects and the Agg canvas: no
display, no pyplot state), written into a run folder after training and by
``ddetr eval``:

``results.png``          the metrics CSV, one panel per group of columns
``PR_curve.png``         precision-recall at IoU 0.5, per class and mean (pycocotools' interpolation)
``confusion_matrix.png`` at a confidence threshold, with a background row and column
``labels.png``           class counts, box centres and box sizes of the training labels
``val_batch_pred.jpg``   a few validation images: ground truth beside the predictions

Every function takes plain data (a pycocotools COCO, COCO-format detections,
a dataset) and returns the path it wrote.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PLOT_CONF = 0.25  # default confidence threshold of the confusion matrix and the drawn predictions
IOU_MATCH = 0.45  # confusion matrix: a prediction matches a ground-truth box at this IoU (as Ultralytics)
_PANELS = (
    ("loss", ("loss", "loss_ce", "loss_bbox", "loss_giou")),
    ("AP", ("AP", "AP50", "AP75")),
    ("AP by size", ("APs", "APm", "APl")),
    ("errors (%)", ("class_error", "cardinality_error")),
    ("learning rate", ("lr",)),
)
_X = ("epoch", "step", "iter", "iteration")


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ results.png
def read_metrics(csv_path: str | os.PathLike) -> tuple[str, dict[str, list[float]]]:
    """CSV with a header row -> (x column, {column: values}); empty or
    non-numeric cells are NaN, and so are AP/AR values of -1 ("n/a")."""
    path = Path(csv_path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ValueError(f"{path}: metrics file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read metrics ({exc})") from None
    if not rows:
        raise ValueError(f"{path}: no metric rows yet")
    columns: dict[str, list[float]] = {name: [] for name in rows[0] if name}
    for row in rows:
        for name in columns:
            try:
                v = float(row.get(name) or "nan")
            except ValueError:
                v = float("nan")
            columns[name].append(float("nan") if name.startswith(("AP", "AR")) and v < 0 else v)
    x_name = next((c for c in _X if c in columns), "")
    if not x_name:
        columns["row"] = [float(i) for i in range(len(rows))]
        x_name = "row"
    return x_name, columns


def plot_results(csv_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """One line chart per group of metrics (loss, AP, AP by size, errors, lr,
    then any other numeric column) of a metrics CSV."""
    x_name, columns = read_metrics(csv_path)
    x = columns[x_name]
    used = {x_name, "time"}
    panels = []
    for title, names in _PANELS:
        series = {n: columns[n] for n in names if n in columns and any(math.isfinite(v) for v in columns[n])}
        used.update(names)
        if series:
            panels.append((title, series))
    panels += [(n, {n: v}) for n, v in columns.items() if n not in used and any(math.isfinite(u) for u in v)]
    if not panels:
        raise ValueError(f"{csv_path}: no numeric metric columns to plot")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 3.0 * rows)
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, ys in series.items():
            last = next((v for v in reversed(ys) if math.isfinite(v)), float("nan"))
            ax.plot(x, ys, marker="o" if len(x) <= 30 else None, markersize=3, label=f"{name} {last:.4g}")
        if title == "learning rate":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_png)


# ------------------------------------------------------------------ PR curve
def _cocoeval(coco_gt, detections: list[dict]):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in detections]), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
    return ev


def plot_pr_curve(coco_gt, detections: list[dict], names: dict[int, str], out_png: str | os.PathLike) -> Path:
    """Precision-recall at IoU 0.5 (all areas, 100 detections), one line per
    class with ground truth and the mean (bold); AP50 in the legend."""
    fig = _figure(7, 5)
    ax = fig.add_subplot(1, 1, 1)
    recall = np.linspace(0, 1, 101)
    curves = []
    if detections:
        ev = _cocoeval(coco_gt, detections)
        precision = ev.eval["precision"][0, :, :, 0, -1]  # [R, K] at IoU 0.5
        for k, cat in enumerate(ev.params.catIds):
            p = precision[:, k]
            if (p > -1).any():
                p = np.where(p < 0, 0.0, p)
                curves.append(p)
                ax.plot(recall, p, linewidth=1, label=f"{names.get(int(cat), cat)} {p.mean():.3f}")
    if curves:
        mean = np.mean(curves, 0)
        ax.plot(recall, mean, linewidth=3, color="blue", label=f"all classes {mean.mean():.3f} AP50")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall (IoU 0.5)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no detections", ha="center", va="center")
    return _save(fig, out_png)


# ------------------------------------------------------------------ confusion matrix
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [N, 4], b [M, 4] xywh -> IoU [N, M]."""
    ax0, ay0, ax1, ay1 = a[:, 0], a[:, 1], a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = (np.minimum(ax1[:, None], bx1[None]) - np.maximum(ax0[:, None], bx0[None])).clip(0)
    ih = (np.minimum(ay1[:, None], by1[None]) - np.maximum(ay0[:, None], by0[None])).clip(0)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return inter / np.maximum(union, 1e-9)


def confusion_matrix(coco_gt, detections: list[dict], conf: float, iou: float = IOU_MATCH) -> tuple[np.ndarray, list[int]]:
    """([K+1, K+1] counts: rows predicted, columns true, index K = background;
    category ids in order). Detections with score >= ``conf`` are matched one to
    one to non-crowd ground truth by IoU >= ``iou`` (best pairs first, any class)."""
    cats = sorted(coco_gt.getCatIds())
    index = {c: i for i, c in enumerate(cats)}
    bg = len(cats)
    m = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        if d["score"] >= conf and d["category_id"] in index:
            by_image.setdefault(int(d["image_id"]), []).append(d)
    for iid in coco_gt.getImgIds():
        gts = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[iid])) if not a.get("iscrowd", 0)]
        dts = by_image.get(int(iid), [])
        matched_g, matched_d = set(), set()
        if gts and dts:
            ious = _iou(np.array([d["bbox"] for d in dts], float), np.array([g["bbox"] for g in gts], float))
            for di, gi in sorted(zip(*np.nonzero(ious >= iou)), key=lambda p: -ious[p]):
                if di not in matched_d and gi not in matched_g:
                    matched_d.add(di)
                    matched_g.add(gi)
                    m[index[dts[di]["category_id"]], index[gts[gi]["category_id"]]] += 1
        for di, d in enumerate(dts):
            if di not in matched_d:
                m[index[d["category_id"]], bg] += 1  # a false positive: predicted on background
        for gi, g in enumerate(gts):
            if gi not in matched_g:
                m[bg, index[g["category_id"]]] += 1  # missed: background predicted
    return m, cats


def plot_confusion_matrix(coco_gt, detections: list[dict], names: dict[int, str], conf: float,
                          out_png: str | os.PathLike) -> Path:
    m, cats = confusion_matrix(coco_gt, detections, conf)
    labels = [str(names.get(c, c)) for c in cats] + ["background"]
    n = len(labels)
    fig = _figure(max(5, 0.5 * n + 3), max(4, 0.5 * n + 2.5))
    ax = fig.add_subplot(1, 1, 1)
    shown = m / np.maximum(m.sum(0, keepdims=True), 1)  # columns normalised: what each true class became
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel="True", ylabel="Predicted", title=f"Confusion matrix (conf >= {conf:g}, IoU >= {IOU_MATCH})")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if shown[i, j] > 0.5 else "black")
    return _save(fig, out_png)


# ------------------------------------------------------------------ labels
def plot_labels(dataset, names: Sequence[str], out_png: str | os.PathLike) -> Path:
    """Class counts, box centres and box sizes (normalised by the image size)
    of a dataset's training targets (``dataset._records``)."""
    counts = np.zeros(len(names), dtype=np.int64)
    xywh = []
    for r in dataset._records:
        np.add.at(counts, r.labels, 1)
        if r.width and r.height and len(r.boxes):
            b = r.boxes / np.array([r.width, r.height, r.width, r.height], np.float32)
            xywh.append(np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1))
    boxes = np.concatenate(xywh) if xywh else np.zeros((0, 4), np.float32)
    fig = _figure(12, 4)
    ax = fig.add_subplot(1, 3, 1)
    ax.bar(range(len(names)), counts, color="tab:blue")
    ax.set_xticks(range(len(names)), [str(n) for n in names], rotation=45 if len(names) > 5 else 0, ha="right", fontsize=8)
    ax.set(title=f"{int(counts.sum())} boxes", ylabel="instances")
    ax = fig.add_subplot(1, 3, 2)
    ax.hist2d(boxes[:, 0], boxes[:, 1], bins=40, range=[[0, 1], [0, 1]], cmap="Blues") if len(boxes) else None
    ax.set(xlabel="x", ylabel="y", title="box centres", xlim=(0, 1), ylim=(1, 0))
    ax = fig.add_subplot(1, 3, 3)
    ax.hist2d(boxes[:, 2], boxes[:, 3], bins=40, range=[[0, 1], [0, 1]], cmap="Blues") if len(boxes) else None
    ax.set(xlabel="width", ylabel="height", title="box sizes", xlim=(0, 1), ylim=(0, 1))
    return _save(fig, out_png)


# ------------------------------------------------------------------ predictions
def plot_val_batch(dataset, detections: list[dict], names: dict[int, str], conf: float,
                   out_jpg: str | os.PathLike, count: int = 4) -> Path:
    """The first ``count`` images of ``dataset``: ground truth (left) beside the
    detections with score >= ``conf`` (right)."""
    from ...data.images import ImageReadError, read_image
    from ...viz import draw_detections

    index = {c: i for i, c in enumerate(sorted(names))}
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        if d["score"] >= conf:
            by_image.setdefault(int(d["image_id"]), []).append(d)

    def boxes(anns: list[dict], score: bool) -> list[dict]:
        return [{"box": (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]),
                 "label": names.get(a["category_id"], str(a["category_id"])), "class_index": index.get(a["category_id"], 0),
                 **({"score": a["score"]} if score else {})} for a in anns]  # fmt: skip

    shown = []
    for i in range(len(dataset)):
        if len(shown) == count:
            break
        try:
            image = read_image(dataset.image_path(i))
        except ImageReadError:
            continue
        iid = dataset._records[i].image_id
        gts = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[iid]))
        shown.append((draw_detections(image, boxes(gts, False), show_score=False),
                      draw_detections(image, boxes(by_image.get(iid, []), True))))
    fig = _figure(8, 4 * max(1, len(shown)))
    for r, (gt, pred) in enumerate(shown):
        for c, (image, title) in enumerate(((gt, "ground truth"), (pred, f"predictions (conf >= {conf:g})"))):
            ax = fig.add_subplot(len(shown), 2, 2 * r + c + 1)
            ax.imshow(image)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    return _save(fig, out_jpg)


def write_val_plots(run_dir: str | os.PathLike, val_set, detections: list[dict], conf: float,
                    train_set=None, class_names: Sequence[str] | None = None) -> list[Path]:
    """PR curve, confusion matrix and predictions on ``val_set`` (and labels.png
    of ``train_set`` when given) into ``run_dir``."""
    run_dir = Path(run_dir)
    coco = val_set.coco
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in coco.loadCats(coco.getCatIds())}
    if class_names is not None:
        names.update({int(c): str(n) for c, n in zip(val_set.category_ids, class_names)})
    out = [plot_pr_curve(coco, detections, names, run_dir / "PR_curve.png"),
           plot_confusion_matrix(coco, detections, names, conf, run_dir / "confusion_matrix.png"),
           plot_val_batch(val_set, detections, names, conf, run_dir / "val_batch_pred.jpg")]
    if train_set is not None:
        out.append(plot_labels(train_set, class_names or train_set.class_names, run_dir / "labels.png"))
    return out

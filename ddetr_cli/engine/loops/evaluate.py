"""COCO bbox evaluation of a model over a dataset split.

Detections are decoded at each image's original size by
:func:`ddetr_cli.models.postprocess` (top-k over queries x classes), mapped from contiguous class indices
to the dataset's category ids, gathered across processes, and scored by
pycocotools' COCOeval. An image the loader could not read (``collate_eval``
batches) is scored with no detections and named in ``EvalResult.unreadable``;
it is never replaced by another image.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...data.coco_results import coco_result
from ..parts import distributed as dist_utils
from ..report.metrics import STAT_NAMES



@dataclass
class EvalResult:
    stats: list[float]  # the 12 COCOeval numbers, in STAT_NAMES order
    per_class: dict[int, float]  # category id -> AP@[.5:.95] (-1: no ground truth)
    summary: str  # COCOeval.summarize() text, verbatim
    detections: list[dict] = field(default_factory=list)  # COCO results format
    num_images: int = 0
    unreadable: list[str] = field(default_factory=list)  # one message per image scored without detections

    def as_dict(self) -> dict[str, float]:
        return dict(zip(STAT_NAMES, self.stats))

    @property
    def coverage(self) -> str:
        """One line: how many images the numbers cover."""
        line = f"COCO bbox over {self.num_images} image(s)"
        if self.unreadable:
            line += f", {len(self.unreadable)} of them unreadable (scored with no detections)"
        return line


def to_coco_results(
    image_id: int, scores: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, label_to_cat: Sequence[int | None]
) -> list[dict]:
    """One image's detections -> COCO results dicts (xywh, original category ids).
    Classes mapped to None are dropped."""
    out = []
    for s, lab, b in zip(scores.tolist(), labels.tolist(), boxes.tolist()):
        cat = label_to_cat[lab] if lab < len(label_to_cat) else None
        if cat is None:
            continue
        out.append(coco_result(image_id, cat, b, s))
    return out


def coco_evaluate(coco_gt, detections: list[dict], image_ids: Sequence[int] | None = None) -> EvalResult:
    """pycocotools COCOeval (bbox) of ``detections`` against ``coco_gt``, restricted
    to ``image_ids`` when given. Returns the 12 stats, per-class AP and the summary."""
    from pycocotools.cocoeval import COCOeval

    img_ids = sorted(set(int(i) for i in (image_ids if image_ids is not None else coco_gt.getImgIds())))
    cat_ids = sorted(coco_gt.getCatIds())
    if not detections:
        stats = [0.0] * 12
        summary = "no detections: every AP/AR is 0"
        return EvalResult(stats, {c: (0.0 if coco_gt.getAnnIds(catIds=[c], imgIds=img_ids) else -1.0) for c in cat_ids}, summary, [], len(img_ids))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
    sbuf = io.StringIO()
    with contextlib.redirect_stdout(sbuf):
        ev.summarize()
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    per_class: dict[int, float] = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[int(cat)] = float(np.mean(p)) if p.size else -1.0
    return EvalResult([float(s) for s in ev.stats], per_class, sbuf.getvalue().rstrip("\n"), list(detections), len(img_ids))


@torch.no_grad()
def run_inference(
    model: torch.nn.Module,
    loader,
    label_to_cat: Sequence[int | None],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    top_k: int = 100,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict], list[int], list[str]]:
    """Runs the model over ``loader`` (batches of (images, padding_mask, targets),
    or of ``collate_eval``'s (images, padding_mask, targets, unreadable targets))
    on this process; returns (COCO results, image ids seen, unreadable-image
    messages). An unreadable image is seen, with no detections."""
    from ...models.postprocess import postprocess

    was_training = model.training
    model.eval()
    results: list[dict] = []
    seen: list[int] = []
    unreadable: list[str] = []
    try:
        for batch in loader:
            images, mask, targets = batch[:3]
            for t in batch[3] if len(batch) > 3 else ():
                seen.append(int(t["image_id"]))
                unreadable.append(f"image id {t['image_id']}: {t['unreadable']}")
            if images is None:  # every image of the batch unreadable
                if on_batch is not None:
                    on_batch(len(batch[3]))
                continue
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(images, mask)
            orig = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)  # [B, 2]
            for t, det in zip(targets, postprocess(outputs, orig, top_k=top_k)):
                iid = int(t["image_id"])
                seen.append(iid)
                results.extend(to_coco_results(iid, det["scores"].cpu(), det["labels"].cpu(), det["boxes"].cpu(), label_to_cat))
            if on_batch is not None:
                on_batch(len(targets) + (len(batch[3]) if len(batch) > 3 else 0))
    finally:
        model.train(was_training)
    return results, seen, unreadable


def evaluate(
    model: torch.nn.Module,
    loader,
    coco_gt,
    label_to_cat: Sequence[int | None],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    top_k: int = 100,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult | None:
    """Inference on every process, gather, COCOeval on rank 0. Returns the result
    on rank 0 and None on other ranks."""
    results, seen, unreadable = run_inference(model, loader, label_to_cat, device, amp_dtype=amp_dtype, top_k=top_k,
                                              on_batch=on_batch)  # fmt: skip
    gathered = dist_utils.all_gather_object((results, seen, unreadable))
    if not dist_utils.is_main_process():
        return None
    all_results = [r for part, _, _ in gathered for r in part]
    all_seen = [i for _, ids, _ in gathered for i in ids]
    result = coco_evaluate(coco_gt, all_results, all_seen)
    result.unreadable = [m for _, _, msgs in gathered for m in msgs]
    return result

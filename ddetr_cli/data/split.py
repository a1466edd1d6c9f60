"""One dataset split as a :class:`~.coco.CocoDetection`, whatever its format:
a COCO annotation file, or YOLO labels turned into the same COCO dict in
memory (so the scan, training targets and pycocotools evaluation are the same
code for both)."""

from __future__ import annotations

from collections.abc import Callable

from .coco import CocoDetection
from .config import SplitConfig
from .yolo import yolo_split_to_coco


def open_split(sc: SplitConfig, transforms: Callable | None = None, category_ids: list[int] | None = None,
               names: list[str] | None = None, mark_unreadable: bool = False) -> CocoDetection:
    """``sc`` as a dataset. ``category_ids``: the training split's mapping (for
    val/test); ``names``: the class names of a YOLO dataset (its categories);
    ``mark_unreadable``: evaluation's rule for unreadable images (see
    :class:`~.coco.CocoDetection`)."""
    data = None if sc.yolo is None else yolo_split_to_coco(sc.yolo, names or [])
    return CocoDetection(sc.images, sc.annotations, transforms, category_ids=category_ids, data=data,
                         mark_unreadable=mark_unreadable)

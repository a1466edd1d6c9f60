"""COCO-format detection datasets.

``CocoDetection`` reads a COCO annotation file, validates it (clear one-line
``DatasetError`` instead of a KeyError deep inside an epoch), maps possibly
non-contiguous category ids (COCO's 1..90, or 3/7/11) to contiguous class
indices, and yields ``(image [3, H, W] float32, target)`` pairs.

Training targets drop crowd boxes and boxes that are empty after clipping to
the image; the pycocotools ``COCO`` object (``dataset.coco``) keeps every
annotation, crowd included, for evaluation. Images without annotations are
kept as negatives. An image file that cannot be read is reported once per
file through the ``ddetr_cli.data.coco`` logger and ``on_skip`` and counted in
``dataset.skipped``. For training the next readable index is returned instead
(a batch keeps its size); with ``mark_unreadable`` (evaluation) the item is
``(None, {"image_id", "file_name", "unreadable": reason})``, never another
image: :func:`~.transforms.collate_eval` keeps it out of the batch, so the
image gets no detections and is named in the result. ``scan()`` counts the
files that are not images by their first bytes, before anything is decoded.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError
from .images import ImageReadError, looks_like_image, read_image
from .transforms import ToTensorNormalize

logger = logging.getLogger(__name__)


@dataclass
class ScanReport:
    """What a pass over the annotations (and the image folder) found."""

    annotation_file: Path
    images: int = 0
    boxes: int = 0
    categories: int = 0
    empty_images: int = 0
    crowd_boxes: int = 0
    degenerate_boxes: int = 0
    missing_files: int = 0
    missing_examples: list[str] = field(default_factory=list)
    duplicate_image_ids: int = 0
    duplicate_annotation_ids: int = 0
    unknown_image_refs: int = 0
    unknown_category_refs: int = 0
    unreadable_skipped: int = 0  # files that are not images by their header (plus any skipped so far)
    unreadable_examples: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.missing_files:
            examples = ", ".join(self.missing_examples[:3])
            out.append(f"{self.missing_files} image file(s) missing (e.g. {examples})")
        if self.duplicate_image_ids:
            out.append(f"{self.duplicate_image_ids} duplicate image id(s)")
        if self.duplicate_annotation_ids:
            out.append(f"{self.duplicate_annotation_ids} duplicate annotation id(s)")
        if self.unknown_image_refs:
            out.append(f"{self.unknown_image_refs} annotation(s) pointing at unknown image ids")
        if self.unknown_category_refs:
            out.append(f"{self.unknown_category_refs} annotation(s) with unknown category ids")
        if self.unreadable_skipped:
            examples = ", ".join(self.unreadable_examples[:3])
            out.append(f"{self.unreadable_skipped} unreadable image file(s) (e.g. {examples})")
        return out

    def as_rows(self) -> list[tuple[str, str]]:
        """(name, value) rows for a table."""
        return [
            ("annotation file", str(self.annotation_file)),
            ("images", str(self.images)),
            ("categories", str(self.categories)),
            ("boxes (training)", str(self.boxes)),
            ("empty images (negatives)", str(self.empty_images)),
            ("crowd boxes (eval only)", str(self.crowd_boxes)),
            ("degenerate boxes dropped", str(self.degenerate_boxes)),
            ("missing image files", str(self.missing_files)),
            ("duplicate image ids", str(self.duplicate_image_ids)),
            ("duplicate annotation ids", str(self.duplicate_annotation_ids)),
            ("unknown image refs", str(self.unknown_image_refs)),
            ("unknown category refs", str(self.unknown_category_refs)),
            ("unreadable image files", str(self.unreadable_skipped)),
        ]


@dataclass
class _Record:
    """One image: file, size from the JSON (0 = unknown) and its training
    boxes (xyxy pixels, clipped, non-crowd, non-degenerate) and labels."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # [K, 4] float32 xyxy
    labels: np.ndarray  # [K] int64 contiguous


def load_json(path: str | os.PathLike, what: str = "annotation file") -> Any:
    """json.load with errors that name the file and the line/column."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}); is this really a JSON {what}?") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class CocoDetection(Dataset):
    """A COCO detection split.

    ``category_ids``: the contiguous index -> dataset category id mapping to
    use (pass the training split's ``category_ids`` to a validation split);
    default: the sorted ids of this file's categories. ``strict``: raise
    ``DatasetError`` on unknown/duplicate ids (default); when False such
    entries are dropped and only counted in ``scan()``. ``data``: the COCO dict
    itself (e.g. built from YOLO labels by :mod:`.yolo`); ``annotation_file``
    then only names the source in messages.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Callable | None = None,
        category_ids: list[int] | None = None,
        *,
        strict: bool = True,
        on_skip: Callable[[Path, str], None] | None = None,
        mark_unreadable: bool = False,
        data: dict | None = None,
    ):
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.on_skip = on_skip
        self.mark_unreadable = mark_unreadable
        self.skipped = 0
        self._warned: set[str] = set()
        if not self.images_dir.is_dir():
            raise DatasetError(f"{self.images_dir}: image folder not found")
        raw = load_json(self.annotation_file) if data is None else data
        self._report = ScanReport(annotation_file=self.annotation_file)
        cleaned = self._validate(raw, category_ids, strict)
        self.coco = _silent_coco(cleaned)

    # ------------------------------------------------------------------ parsing
    def _fail(self, strict: bool, message: str) -> None:
        if strict:
            raise DatasetError(f"{self.annotation_file}: {message}")

    def _validate(self, raw: Any, category_ids: list[int] | None, strict: bool) -> dict:
        f = self.annotation_file
        if not isinstance(raw, dict):
            raise DatasetError(f"{f}: expected a COCO JSON object with 'images', 'annotations', 'categories'")
        for key in ("images", "categories"):
            if key not in raw:
                raise DatasetError(f"{f}: missing required key {key!r}")
        images_raw, anns_raw, cats_raw = raw["images"], raw.get("annotations", []), raw["categories"]
        for key, value in (("images", images_raw), ("annotations", anns_raw), ("categories", cats_raw)):
            if not isinstance(value, list):
                raise DatasetError(f"{f}: {key!r} must be a list, got {type(value).__name__}")
        if not images_raw:
            raise DatasetError(f"{f}: empty dataset (no images)")

        # categories
        categories: dict[int, dict] = {}
        for i, cat in enumerate(cats_raw):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise DatasetError(f"{f}: categories[{i}] needs an integer 'id'")
            if cat["id"] in categories:
                raise DatasetError(f"{f}: duplicate category id {cat['id']} (categories[{i}])")
            name = cat.get("name")
            categories[cat["id"]] = {**cat, "name": str(name) if name is not None else str(cat["id"])}
        if category_ids is None:
            if not categories:
                raise DatasetError(f"{f}: no categories defined")
            category_ids = sorted(categories)
        else:
            category_ids = [int(c) for c in category_ids]
            if len(set(category_ids)) != len(category_ids):
                raise DatasetError(f"{f}: the category_ids mapping given has duplicates: {category_ids}")
        self.category_ids: list[int] = list(category_ids)
        self._cat_to_index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.class_names: list[str] = [categories[c]["name"] if c in categories else str(c) for c in self.category_ids]
        known_cats = set(self._cat_to_index)
        self._report.categories = len(self.category_ids)

        # images
        images: dict[int, dict] = {}
        for i, img in enumerate(images_raw):
            if not isinstance(img, dict) or not _is_int(img.get("id")):
                raise DatasetError(f"{f}: images[{i}] needs an integer 'id'")
            if not isinstance(img.get("file_name"), str) or not img["file_name"]:
                raise DatasetError(f"{f}: images[{i}] (id {img['id']}) needs a 'file_name' string")
            for key in ("width", "height"):
                if key in img and not (_is_int(img[key]) and img[key] > 0):
                    raise DatasetError(f"{f}: images[{i}] (id {img['id']}): {key!r} must be a positive integer")
            if img["id"] in images:
                self._report.duplicate_image_ids += 1
                self._fail(strict, f"duplicate image id {img['id']} (images[{i}])")
                continue
            images[img["id"]] = img

        # annotations
        anns: list[dict] = []
        seen_ann_ids: set[int] = set()
        per_image: dict[int, tuple[list, list]] = {iid: ([], []) for iid in images}
        for i, ann in enumerate(anns_raw):
            if not isinstance(ann, dict):
                raise DatasetError(f"{f}: annotations[{i}] must be an object")
            for key in ("id", "image_id", "category_id"):
                if not _is_int(ann.get(key)):
                    raise DatasetError(f"{f}: annotations[{i}] needs an integer {key!r}")
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise DatasetError(f"{f}: annotations[{i}] (id {ann['id']}): 'bbox' must be [x, y, w, h] numbers")
            if ann["id"] in seen_ann_ids:
                self._report.duplicate_annotation_ids += 1
                self._fail(strict, f"duplicate annotation id {ann['id']} (annotations[{i}])")
                continue
            if ann["image_id"] not in images:
                self._report.unknown_image_refs += 1
                self._fail(strict, f"annotations[{i}] (id {ann['id']}) refers to unknown image id {ann['image_id']}")
                continue
            if ann["category_id"] not in known_cats:
                self._report.unknown_category_refs += 1
                self._fail(
                    strict, f"annotations[{i}] (id {ann['id']}) has unknown category id {ann['category_id']}"
                )
                continue
            seen_ann_ids.add(ann["id"])
            x, y, w, h = (float(v) for v in bbox)
            ann = {**ann, "iscrowd": int(bool(ann.get("iscrowd", 0)))}
            if not _is_number(ann.get("area")):
                ann["area"] = max(w, 0.0) * max(h, 0.0)
            anns.append(ann)
            if ann["iscrowd"]:
                self._report.crowd_boxes += 1
                continue
            img = images[ann["image_id"]]
            x0, y0, x1, y1 = x, y, x + w, y + h
            if "width" in img:
                x0, x1 = min(max(x0, 0.0), img["width"]), min(max(x1, 0.0), img["width"])
                y0, y1 = min(max(y0, 0.0), img["height"]), min(max(y1, 0.0), img["height"])
            if x1 <= x0 or y1 <= y0:
                self._report.degenerate_boxes += 1
                continue
            boxes, labels = per_image[ann["image_id"]]
            boxes.append((x0, y0, x1, y1))
            labels.append(self._cat_to_index[ann["category_id"]])

        self.ids: list[int] = sorted(images)
        self._records: list[_Record] = []
        for iid in self.ids:
            img = images[iid]
            boxes, labels = per_image[iid]
            self._records.append(
                _Record(
                    image_id=iid,
                    file_name=img["file_name"],
                    width=int(img.get("width", 0)),
                    height=int(img.get("height", 0)),
                    boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, dtype=np.int64).reshape(-1),
                )
            )
            self._report.boxes += len(boxes)
            self._report.empty_images += int(not boxes)
        self._report.images = len(self._records)

        cleaned = {k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")}
        cleaned["images"] = [images[i] for i in self.ids]
        cleaned["annotations"] = anns
        cleaned["categories"] = [categories.get(c, {"id": c, "name": str(c)}) for c in self.category_ids]
        return cleaned

    # ------------------------------------------------------------------ mapping
    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def to_contiguous(self, category_id: int) -> int:
        try:
            return self._cat_to_index[int(category_id)]
        except KeyError:
            raise DatasetError(f"{self.annotation_file}: unknown category id {category_id}") from None

    def to_category_id(self, index: int) -> int:
        if not 0 <= int(index) < len(self.category_ids):
            raise DatasetError(f"class index {index} out of range (0..{len(self.category_ids) - 1})")
        return self.category_ids[int(index)]

    def image_path(self, index: int) -> Path:
        return self.images_dir / self._records[index].file_name

    def image_info(self, index: int) -> dict:
        r = self._records[index]
        return {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height}

    # ------------------------------------------------------------------ scanning
    def scan(self) -> ScanReport:
        """Counts (copied) plus a check that every image file exists and starts
        like an image (its first bytes; nothing is decoded)."""
        report = ScanReport(**{k: getattr(self._report, k) for k in self._report.__dataclass_fields__})
        report.missing_examples, report.unreadable_examples = [], []
        report.missing_files = report.unreadable_skipped = 0
        for r in self._records:
            path = self.images_dir / r.file_name
            if not path.is_file():
                report.missing_files += 1
                if len(report.missing_examples) < 10:
                    report.missing_examples.append(r.file_name)
            elif not looks_like_image(path):
                report.unreadable_skipped += 1
                if len(report.unreadable_examples) < 10:
                    report.unreadable_examples.append(r.file_name)
        return report

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, dict]:
        n = len(self._records)
        if self.mark_unreadable:
            path = self.image_path(index)
            try:
                image = read_image(path)  # [H, W, 3] uint8 RGB
            except ImageReadError as exc:
                self._note_skip(path, str(exc))
                r = self._records[index]
                return None, {"image_id": r.image_id, "file_name": r.file_name, "unreadable": str(exc)}
            return self._make_item(index, image)
        for attempt in range(n):
            i = (index + attempt) % n
            path = self.image_path(i)
            try:
                image = read_image(path)  # [H, W, 3] uint8 RGB
            except ImageReadError as exc:
                self._note_skip(path, str(exc))
                continue
            return self._make_item(i, image)
        raise DatasetError(f"{self.images_dir}: none of the {n} images could be read")

    def _note_skip(self, path: Path, reason: str) -> None:
        self.skipped += 1
        key = str(path)
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning("skipping unreadable image: %s", reason)
        if self.on_skip is not None:
            self.on_skip(path, reason)

    def _make_item(self, i: int, image: np.ndarray) -> tuple[torch.Tensor, dict]:
        r = self._records[i]
        h, w = image.shape[:2]
        boxes = r.boxes.copy()  # [K, 4] xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # [K]
        target: dict[str, Any] = {
            "boxes": boxes[keep],
            "labels": r.labels[keep],
            "image_id": r.image_id,
            "orig_size": np.array([h, w], dtype=np.int64),
        }
        out: Any = image
        if self.transforms is not None:
            out, target = self.transforms(out, target)
        if isinstance(out, np.ndarray):
            out, target = ToTensorNormalize()(out, target)
        return out, target

    def __repr__(self) -> str:
        return (
            f"CocoDetection({self.annotation_file}, images={len(self)}, classes={self.num_classes}, "
            f"images_dir={self.images_dir})"
        )


def _silent_coco(dataset: dict):
    """A pycocotools COCO object over an in-memory dict, without its prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco

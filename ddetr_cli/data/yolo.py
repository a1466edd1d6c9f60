"""Ultralytics (YOLO) detection datasets, read into the COCO form the rest of
the data layer uses.

A YOLO ``data.yaml``::

    path: ../datasets/mydata     # root; relative to this file's folder (default: the folder)
    train: images/train          # a folder of images, a .txt list of images, or a list of either
    val: images/val
    test: images/test            # optional
    names: [cat, dog]            # or {0: cat, 1: dog}; `nc` (optional) must agree

Each image ``.../images/.../x.jpg`` has its labels in ``.../labels/.../x.txt``
(the last ``images`` folder of the path becomes ``labels``): one box per line,
``class cx cy w h`` normalised to [0, 1] (a segment line ``class x1 y1 x2 y2
...`` counts as its bounding box). An image without a label file is a
negative. A relative path in a ``.txt`` list is relative to the list's folder.

:func:`yolo_split_to_coco` builds the COCO dict in memory (category id = class
index; box sizes need the image sizes, read from the file headers) and the
counts a :class:`~.coco.ScanReport` holds. A malformed line, a class outside
``names`` or a coordinate outside [0, 1] stops with one line naming the file
and the line number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from .images import IMAGE_SUFFIXES

YOLO_KEYS = ("path", "train", "val", "test", "names", "nc", "download", "model", "train_options")
_TOLERANCE = 1e-3  # normalised coordinates may overshoot [0, 1] by rounding


@dataclass
class YoloSplit:
    """One split: its image files (sorted, de-duplicated), the folder they are
    named relative to, and what the YAML said (for messages)."""

    images: list[Path]
    root: Path
    spec: str
    missing: list[Path] = field(default_factory=list)  # listed in a .txt, not on disk

    @property
    def labels_hint(self) -> Path:
        """Where the labels of the first image are looked for (for messages)."""
        return label_path(self.images[0]).parent if self.images else self.root


def looks_like_yolo(raw: dict) -> bool:
    """A dataset YAML whose splits are paths (or lists of paths), not
    ``{images, annotations}`` mappings: the Ultralytics layout."""
    splits = [raw.get(k) for k in ("train", "val", "test")]
    if any(isinstance(v, dict) for v in splits):
        return False
    return any(isinstance(v, (str, list)) for v in splits) or "nc" in raw


def label_path(image: Path) -> Path:
    """``.../images/a/b.jpg`` -> ``.../labels/a/b.txt`` (the Ultralytics rule)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def resolve_split(value: Any, key: str, root: Path, source: Path) -> YoloSplit:
    """The image files of a split given as a folder, a .txt list, or a list of those."""
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(f"{source}: {key!r} must be an image folder, a .txt list of images, or a list of those")
    images: list[Path] = []
    missing: list[Path] = []
    for entry in entries:
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(f"{source}: {key!r}: folder {p} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            images += found
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                f = Path(line).expanduser()
                f = f if f.is_absolute() else p.parent / f
                (images if f.is_file() else missing).append(f)
        else:
            raise ConfigError(f"{source}: {key!r}: {p} is neither an image folder nor a .txt list of images")
    missing = sorted(set(missing))
    return YoloSplit(sorted(set(images)) + missing, root, str(value), missing)


def yolo_names(value: Any, nc: Any, source: Path) -> list[str]:
    """``names`` as a list or an ``{index: name}`` mapping (indices 0..n-1)."""
    if isinstance(value, dict):
        keys = sorted(value)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or keys != list(range(len(keys))):
            raise ConfigError(f"{source}: 'names' as a mapping needs class indices 0..n-1, got {keys[:5]}")
        names = [value[k] for k in keys]
    elif isinstance(value, list):
        names = value
    else:
        raise ConfigError(f"{source}: a YOLO dataset needs 'names' (a list, or a {{index: name}} mapping)")
    if not names or not all(isinstance(n, (str, int)) and str(n) for n in names):
        raise ConfigError(f"{source}: 'names' must hold non-empty class names")
    if nc is not None and nc != len(names):
        raise ConfigError(f"{source}: 'nc' is {nc} but 'names' lists {len(names)} classes")
    return [str(n) for n in names]


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except (OSError, ValueError, SyntaxError):
        return None


def _parse_line(text: str, label_file: Path, lineno: int, num_classes: int) -> tuple[int, float, float, float, float] | None:
    """(class, cx, cy, w, h) of one label line (a segment line -> its box); None for a blank line."""
    parts = text.split()
    if not parts:
        return None
    where = f"{label_file}:{lineno}"
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise DatasetError(f"{where}: expected 'class cx cy w h' numbers, got {text.strip()!r}") from None
    if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
        raise DatasetError(f"{where}: expected 'class cx cy w h' (5 numbers) or a segment 'class x1 y1 x2 y2 ...', "
                           f"got {len(values)} numbers")
    cls = values[0]
    if not cls.is_integer() or not 0 <= cls < num_classes:
        raise DatasetError(f"{where}: class {parts[0]} is out of range (names has {num_classes} classes: 0..{num_classes - 1})")
    coords = values[1:]
    if not all(math.isfinite(v) and -_TOLERANCE <= v <= 1 + _TOLERANCE for v in coords):
        bad = next(v for v in coords if not (math.isfinite(v) and -_TOLERANCE <= v <= 1 + _TOLERANCE))
        raise DatasetError(f"{where}: coordinate {bad:g} is outside [0, 1] (YOLO labels are normalised to the image size)")
    if len(values) == 5:
        cx, cy, w, h = coords
    else:
        xs, ys = coords[0::2], coords[1::2]
        cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
    return int(cls), cx, cy, w, h


def yolo_split_to_coco(split: YoloSplit, names: Sequence[str]) -> dict:
    """The COCO dict of a split (images with their sizes, one annotation per
    label line, categories ``{id: index, name}``), in image order."""
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id, path in enumerate(split.images, start=1):
        try:
            file_name = str(path.relative_to(split.root))
        except ValueError:
            file_name = str(path)
        info: dict[str, Any] = {"id": image_id, "file_name": file_name}
        size = _image_size(path) if path.is_file() else None
        if size is not None:
            info["width"], info["height"] = size
        images.append(info)
        lf = label_path(path)
        if not lf.is_file():
            continue  # a negative
        try:
            lines = lf.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{lf}: cannot read label file ({exc})") from None
        for lineno, text in enumerate(lines, start=1):
            box = _parse_line(text, lf, lineno, len(names))
            if box is None or size is None:
                continue  # an image that cannot be read keeps no boxes (reported as missing/unreadable)
            cls, cx, cy, w, h = box
            W, H = size
            x0, y0 = (cx - w / 2) * W, (cy - h / 2) * H
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                "bbox": [x0, y0, w * W, h * H], "area": w * W * h * H, "iscrowd": 0,
            })  # fmt: skip
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
    }

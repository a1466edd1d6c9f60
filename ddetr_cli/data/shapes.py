"""The built-in synthetic "shapes" dataset: coloured circles, squares and
triangles on textured backgrounds, in COCO format, so that training,
evaluation and prediction run anywhere without downloads.

Generation is deterministic (one seeded numpy generator per split), takes a
few seconds, and is cached: the dataset is written into a temporary folder and
renamed into place, and regenerated only when missing, incomplete or created
with different parameters. Layout under the root::

    shapes.yaml  meta.json
    train/000000.jpg ...   val/000000.jpg ...
    annotations/train.json annotations/val.json
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import DatasetError

CLASS_NAMES = ("circle", "square", "triangle")
CATEGORY_IDS = (1, 2, 3)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShapesSpec:
    seed: int = 0
    n_train: int = 3000
    n_val: int = 200
    size: int = 128
    min_shape: int = 12
    max_shape: int = 64
    max_per_image: int = 4
    version: int = FORMAT_VERSION


def default_cache_root() -> Path:
    base = os.environ.get("DDETR_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "ddetr") / "shapes-v1"


def ensure_shapes_dataset(
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 200,
    size: int = 128,
) -> Path:
    """Generates the dataset under ``root`` (default ``$DDETR_CACHE/shapes-v1``
    or ``~/.cache/ddetr/shapes-v1``) unless an identical one is already there.
    Returns the path of its ``shapes.yaml``."""
    if n_train < 1 or n_val < 1:
        raise DatasetError(f"shapes dataset needs at least one image per split (n_train={n_train}, n_val={n_val})")
    if size < 32:
        raise DatasetError(f"shapes dataset image size must be >= 32 px, got {size}")
    spec = ShapesSpec(seed=seed, n_train=n_train, n_val=n_val, size=size, max_shape=min(64, size // 2))
    root = Path(root).expanduser() if root is not None else default_cache_root()
    if _is_complete(root, spec):
        return root / "shapes.yaml"
    if root.exists() and any(root.iterdir()) and not (root / "meta.json").is_file():
        raise DatasetError(f"{root}: folder exists and is not a ddetr shapes dataset; choose another location")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _generate(tmp, spec)
        if _is_complete(root, spec):  # another process finished the same data meanwhile: it may be reading it
            return root / "shapes.yaml"
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, old / "data")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not _is_complete(root, spec):  # lost a race against another process with different data
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "shapes.yaml"


def _read_meta(root: Path) -> dict:
    """The generator's ``meta.json`` in ``root`` ({} when absent or unreadable)."""
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def is_shapes_root(root: str | os.PathLike) -> bool:
    """True when ``root`` holds a dataset written by this generator."""
    spec = _read_meta(Path(root)).get("spec")
    return isinstance(spec, dict) and "n_train" in spec


def _is_complete(root: Path, spec: ShapesSpec) -> bool:
    meta = _read_meta(root)
    if meta.get("spec") != asdict(spec) or not meta.get("complete"):
        return False
    if not (root / "shapes.yaml").is_file():
        return False
    for split, n in (("train", spec.n_train), ("val", spec.n_val)):
        if not (root / "annotations" / f"{split}.json").is_file():
            return False
        if not (root / split / f"{n - 1:06d}.jpg").is_file():
            return False
    return True


def _generate(root: Path, spec: ShapesSpec) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, (split, n) in enumerate((("train", spec.n_train), ("val", spec.n_val))):
        rng = np.random.default_rng([spec.seed, split_index])
        (root / split).mkdir()
        images, annotations = [], []
        for i in range(n):
            image, shapes = render_image(rng, spec)
            name = f"{i:06d}.jpg"
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
            if not ok:
                raise DatasetError(f"{root / split / name}: JPEG encoding failed")
            buf.tofile(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": spec.size, "height": spec.size})
            for cls, (x, y, w, h) in shapes:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": CATEGORY_IDS[cls],
                        "bbox": [x, y, w, h],
                        "area": float(w * h),
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {"description": f"ddetr synthetic shapes ({split})", "version": str(spec.version)},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(CATEGORY_IDS, CLASS_NAMES)],
        }
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco), encoding="utf-8")
    yaml_text = (
        "# ddetr built-in synthetic dataset (generated; do not edit)\n"
        "path: .\n"
        "train: {images: train, annotations: annotations/train.json}\n"
        "val: {images: val, annotations: annotations/val.json}\n"
        f"names: [{', '.join(CLASS_NAMES)}]\n"
    )
    (root / "shapes.yaml").write_text(yaml_text, encoding="utf-8")
    (root / "meta.json").write_text(json.dumps({"spec": asdict(spec), "complete": True}, indent=1), encoding="utf-8")


# ---------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """A textured background, uint8 [s, s, 3] RGB."""
    kind = rng.integers(4)
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s  # [s, s]
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:  # stripes
        a = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.3)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period)
        t *= rng.uniform(0.3, 0.7)
    elif kind == 2:  # smooth blobs (upsampled noise)
        g = rng.random((5, 5)).astype(np.float32)
        t = cv2.resize(g, (s, s), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    else:  # flat
        t = np.zeros((s, s), np.float32)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]  # [s, s, 3]
    img += rng.normal(0, rng.uniform(3, 14), (s, s, 3))
    return img.clip(0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[int, int, int]:
    """A saturated colour that stands out from the local background."""
    best, best_d = None, -1.0
    for _ in range(8):
        hsv = np.array([[[rng.integers(0, 180), rng.integers(150, 256), rng.integers(120, 256)]]], np.uint8)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
        d = float(np.abs(rgb - background_mean).sum())
        if d > best_d:
            best, best_d = rgb, d
        if d > 180:
            break
    return tuple(int(v) for v in best)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / float(aw * ah + bw * bh - inter)


def render_image(rng: np.random.Generator, spec: ShapesSpec) -> tuple[np.ndarray, list[tuple[int, tuple]]]:
    """One image (uint8 [S, S, 3] RGB) and its shapes as (class index,
    (x, y, w, h)) with pixel-exact boxes (a shape covering pixels x0..x1 has
    x = x0, w = x1 - x0 + 1)."""
    s = spec.size
    image = _background(rng, s)
    n = int(rng.integers(1, spec.max_per_image + 1))
    placed: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(n):
        for _attempt in range(20):
            cls = int(rng.integers(len(CLASS_NAMES)))
            side = int(round(np.exp(rng.uniform(np.log(spec.min_shape), np.log(spec.max_shape)))))
            side = max(spec.min_shape, min(spec.max_shape, side))
            side -= (side + 1) % 2  # odd: symmetric shapes around an integer centre
            x0 = int(rng.integers(0, s - side + 1))
            y0 = int(rng.integers(0, s - side + 1))
            box = (x0, y0, side, side)
            if cls == 2:  # triangle: base = side, height ~ 0.87 * side
                box = (x0, y0, side, max(3, int(round(side * 0.866))))
            if all(_iou(box, other) < 0.15 for _, other in placed):
                break
        else:
            continue
        x, y, w, h = box
        mean = image[y : y + h, x : x + w].reshape(-1, 3).mean(axis=0)
        colour = _colour(rng, mean)
        if cls == 0:
            r = (w - 1) // 2
            cv2.circle(image, (x + r, y + r), r, colour, thickness=-1, lineType=cv2.LINE_8)
        elif cls == 1:
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, thickness=-1)
        else:
            pts = np.array([[x, y + h - 1], [x + w - 1, y + h - 1], [x + (w - 1) // 2, y]], np.int32)
            cv2.fillPoly(image, [pts], colour, lineType=cv2.LINE_8)
        placed.append((cls, box))
    return image, placed

"""Dataset YAML files: where the images and COCO annotation files of each
split are, class names, and optional raw ``model:`` / ``train:`` sections that
the training layer interprets.

    path: ../datasets/mydata      # root; relative to this file's folder (default: the folder)
    train: {images: images/train, annotations: annotations/train.json}
    val:   {images: images/val,   annotations: annotations/val.json}
    test:  {images: images/test,  annotations: annotations/test.json}   # optional
    names: [cat, dog]             # optional: list, or {category_id: name}
    model: {...}                  # optional, passed through as a dict

Training options (epochs, lr, imgsz, ...) for the training layer may be given
either as extra keys of the ``train:`` mapping next to ``images`` and
``annotations``, or as a top-level ``train_options:`` mapping (which wins on
conflicts); they are returned, uninterpreted, as ``DatasetConfig.train_options``.
The special name ``shapes`` resolves to the built-in synthetic dataset.

A YAML whose splits are paths rather than mappings is an Ultralytics (YOLO)
dataset (``train: images/train``, ``names``, optional ``nc``): see :mod:`.yolo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .shapes import is_shapes_root
from .yaml_file import read_yaml
from .yolo import YOLO_KEYS, YoloSplit, label_path, looks_like_yolo, resolve_split, yolo_names

_SPLIT_KEYS = ("images", "annotations")
_TOP_KEYS = ("path", "train", "val", "test", "names", "model", "train_options")


@dataclass
class SplitConfig:
    """A COCO split (image folder + annotation file), or a YOLO split (``yolo``
    set; ``images`` is the dataset root, ``annotations`` its labels folder)."""

    images: Path
    annotations: Path
    yolo: YoloSplit | None = None


@dataclass
class DatasetConfig:
    root: Path
    train: SplitConfig
    val: SplitConfig
    test: SplitConfig | None = None
    names: list[str] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    train_options: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    is_shapes: bool = False  # the built-in synthetic dataset (gets its own training recipe)
    format: str = "coco"  # coco | yolo

    def split(self, name: str) -> SplitConfig:
        value = getattr(self, name, None) if name in ("train", "val", "test") else None
        if not isinstance(value, SplitConfig):
            raise ConfigError(f"{self.source}: dataset has no {name!r} split")
        return value


def load_dataset_config(path_or_name: str | os.PathLike) -> DatasetConfig:
    """Reads and validates a dataset YAML file (or the built-in name ``shapes``)."""
    text = str(path_or_name)
    if text == "shapes" and not Path(text).exists():
        from .shapes import ensure_shapes_dataset

        return load_dataset_config(ensure_shapes_dataset())
    source = Path(text).expanduser()
    if not source.exists():
        raise ConfigError(f"{source}: dataset config file not found (a YAML file, or 'shapes' for the built-in dataset)")
    raw = read_yaml(source, what="dataset YAML file")
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{source}: expected a mapping with 'train' and 'val' keys, got {kind}")
    return _parse(raw, source)


def _parse(raw: dict, source: Path) -> DatasetConfig:
    if looks_like_yolo(raw):
        return _parse_yolo(raw, source)
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r} (allowed: {', '.join(_TOP_KEYS)})")
    root = _root(raw, source)
    for key in ("train", "val"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key {key!r} (a mapping with 'images' and 'annotations')")
    train = _split(raw["train"], "train", root, source)
    val = _split(raw["val"], "val", root, source)
    test = _split(raw["test"], "test", root, source) if raw.get("test") is not None else None

    options = {k: v for k, v in raw["train"].items() if k not in _SPLIT_KEYS}
    options.update(_section(raw, "train_options", source))
    return DatasetConfig(
        root=root,
        train=train,
        val=val,
        test=test,
        names=_names(raw.get("names"), source),
        model=_section(raw, "model", source),
        train_options=options,
        source=source.resolve(),
        is_shapes=is_shapes_root(source.resolve().parent),
    )


def _root(raw: dict, source: Path) -> Path:
    root_value = raw.get("path", ".")
    if root_value is None:
        root_value = "."
    if not isinstance(root_value, str):
        raise ConfigError(f"{source}: 'path' must be a string (a folder), got {type(root_value).__name__}")
    root = Path(root_value).expanduser()
    root = root if root.is_absolute() else source.resolve().parent / root
    if not root.is_dir():
        raise ConfigError(f"{source}: 'path': dataset root folder {root} does not exist")
    return root


def _parse_yolo(raw: dict, source: Path) -> DatasetConfig:
    """An Ultralytics detection YAML (see :mod:`.yolo`)."""
    for key in raw:
        if key not in YOLO_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r} in a YOLO dataset YAML (allowed: {', '.join(YOLO_KEYS)})")
    root = _root(raw, source)
    for key in ("train", "val"):
        if raw.get(key) is None:
            raise ConfigError(f"{source}: missing required key {key!r} (an image folder or a .txt list of images)")

    def split(key: str) -> SplitConfig:
        ys = resolve_split(raw[key], key, root, source)
        labels = label_path(ys.images[0]).parent if ys.images else root
        return SplitConfig(images=root, annotations=labels, yolo=ys)

    return DatasetConfig(
        root=root,
        train=split("train"),
        val=split("val"),
        test=split("test") if raw.get("test") is not None else None,
        names=yolo_names(raw.get("names"), raw.get("nc"), source),
        model=_section(raw, "model", source),
        train_options=_section(raw, "train_options", source),
        source=source.resolve(),
        format="yolo",
    )


def _split(value: Any, key: str, root: Path, source: Path) -> SplitConfig:
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source}: {key!r} must be a mapping with 'images' and 'annotations', got {type(value).__name__}"
        )
    for sub in value:
        if sub not in _SPLIT_KEYS and key != "train":
            raise ConfigError(f"{source}: unknown key '{key}.{sub}' (allowed: images, annotations)")
    paths: dict[str, Path] = {}
    for sub in _SPLIT_KEYS:
        if sub not in value:
            raise ConfigError(f"{source}: missing required key '{key}.{sub}'")
        if not isinstance(value[sub], str):
            raise ConfigError(f"{source}: '{key}.{sub}' must be a string path, got {type(value[sub]).__name__}")
        p = Path(value[sub]).expanduser()
        paths[sub] = p if p.is_absolute() else root / p
    if not paths["images"].is_dir():
        raise ConfigError(f"{source}: '{key}.images': image folder {paths['images']} does not exist")
    if not paths["annotations"].is_file():
        raise ConfigError(f"{source}: '{key}.annotations': annotation file {paths['annotations']} does not exist")
    return SplitConfig(images=paths["images"], annotations=paths["annotations"])


def _names(value: Any, source: Path) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        if not all(isinstance(n, str) and n for n in value):
            raise ConfigError(f"{source}: 'names' must be a list of non-empty strings")
        return list(value)
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, int) or not isinstance(v, str):
                raise ConfigError(f"{source}: 'names' as a mapping must be {{category_id: name}}, got {k!r}: {v!r}")
            items.append((k, v))
        return [name for _, name in sorted(items)]
    raise ConfigError(f"{source}: 'names' must be a list or a {{id: name}} mapping, got {type(value).__name__}")


def _section(raw: dict, key: str, source: Path) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key!r} must be a mapping, got {type(value).__name__}")
    return dict(value)

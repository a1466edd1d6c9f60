"""Data layer: image decoding, COCO datasets, transforms, dataset configs and
the built-in synthetic shapes dataset."""

from __future__ import annotations

from .coco import CocoDetection, DatasetError, ScanReport, load_json
from .config import ConfigError, DatasetConfig, SplitConfig, load_dataset_config
from .images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ImageReadError, is_image_file, is_video_file, read_image
from .shapes import CLASS_NAMES as SHAPES_CLASS_NAMES
from .shapes import ensure_shapes_dataset
from .transforms import (
    Compose,
    inference_size,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensorNormalize,
    collate,
    collate_eval,
    default_train_scales,
    make_eval_transforms,
    make_train_transforms,
    preprocess,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "SHAPES_CLASS_NAMES",
    "VIDEO_SUFFIXES",
    "inference_size",
    "CocoDetection",
    "Compose",
    "ConfigError",
    "DatasetConfig",
    "DatasetError",
    "ImageReadError",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "ScanReport",
    "SplitConfig",
    "ToTensorNormalize",
    "collate",
    "collate_eval",
    "default_train_scales",
    "ensure_shapes_dataset",
    "is_image_file",
    "is_video_file",
    "load_dataset_config",
    "load_json",
    "make_eval_transforms",
    "make_train_transforms",
    "preprocess",
    "read_image",
]

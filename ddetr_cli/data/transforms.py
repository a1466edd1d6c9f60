"""Detection transforms on (image, target) pairs, batching and inference
preprocessing.

A sample is ``(image, target)``: ``image`` uint8 [H, W, 3] RGB numpy array,
``target["boxes"]`` float32 [K, 4] xyxy in absolute pixels, ``target["labels"]``
int64 [K]; other keys (``image_id``, ``orig_size``, ...) pass through. Per-box
keys (``labels``, ``area``, ``iscrowd``) are filtered together with the boxes.
The last step, ``ToTensorNormalize``, produces the model's input convention
(the official Deformable DETR one): a float32 [3, H, W] ImageNet-normalized
tensor and boxes as cxcywh normalized by the transformed image size.

Randomness comes from Python's ``random`` module, which PyTorch reseeds in
every DataLoader worker.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PER_BOX_KEYS = ("labels", "area", "iscrowd")

Sample = tuple[Any, dict]


def default_train_scales(max_scale: int = 800, min_scale: int = 480, step: int = 32) -> list[int]:
    """Shortest-side sizes for multi-scale training: min_scale, min_scale+step,
    ..., max_scale (480..800 by 32 by default, the official recipe)."""
    if min_scale <= 0 or step <= 0 or max_scale < min_scale:
        raise ValueError(f"invalid train scales: min {min_scale}, max {max_scale}, step {step}")
    return list(range(min_scale, max_scale + 1, step))


def resized_hw(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) after scaling the shortest side to ``size`` while keeping the
    longest side <= ``max_size``."""
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if min(h, w) == size:
        return h, w
    if w < h:
        return max(1, int(size * h / w)), size
    return size, max(1, int(size * w / h))


def _filter_boxes(target: dict, keep: np.ndarray) -> dict:
    for key in ("boxes", *PER_BOX_KEYS):
        if key in target:
            target[key] = target[key][keep]
    return target


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Any, dict], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: dict) -> Sample:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: np.ndarray, target: dict) -> Sample:
        if random.random() >= self.p:
            return image, target
        w = image.shape[1]
        image = np.ascontiguousarray(image[:, ::-1])  # [H, W, 3]
        target = dict(target)
        if "boxes" in target:
            b = target["boxes"]  # [K, 4] xyxy
            target["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Scales the shortest side to a random choice of ``sizes`` (longest side
    <= ``max_size``); boxes and areas follow."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: np.ndarray, target: dict) -> Sample:
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


def resize(image: np.ndarray, target: dict | None, size: int, max_size: int | None = None) -> Sample:
    h, w = image.shape[:2]
    nh, nw = resized_hw(h, w, size, max_size)
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)  # [nh, nw, 3]
    if target is None:
        return image, target
    target = dict(target)
    sx, sy = nw / w, nh / h
    if "boxes" in target:
        target["boxes"] = (target["boxes"] * np.array([sx, sy, sx, sy], dtype=np.float32)).astype(np.float32)
    if "area" in target:
        target["area"] = (target["area"] * (sx * sy)).astype(np.float32)
    return image, target


class RandomSizeCrop:
    """Crops a random window with sides in [min_size, max_size] (capped by the
    image). Boxes are clipped to the window; boxes left empty are removed."""

    def __init__(self, min_size: int, max_size: int):
        if min_size <= 0 or max_size < min_size:
            raise ValueError(f"invalid crop range ({min_size}, {max_size})")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: np.ndarray, target: dict) -> Sample:
        h, w = image.shape[:2]
        cw = random.randint(min(self.min_size, w), min(w, self.max_size))
        ch = random.randint(min(self.min_size, h), min(h, self.max_size))
        top = random.randint(0, h - ch)
        left = random.randint(0, w - cw)
        return crop(image, target, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


def crop(image: np.ndarray, target: dict, top: int, left: int, height: int, width: int) -> Sample:
    image = np.ascontiguousarray(image[top : top + height, left : left + width])  # [h, w, 3]
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"] - np.array([left, top, left, top], dtype=np.float32)  # [K, 4]
        b[:, 0::2] = b[:, 0::2].clip(0, width)
        b[:, 1::2] = b[:, 1::2].clip(0, height)
        target["boxes"] = b.astype(np.float32)
        if "area" in target:
            target["area"] = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float32)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # [K]
        target = _filter_boxes(target, keep)
    return image, target


class RandomSelect:
    """Applies ``a`` with probability ``p``, else ``b``."""

    def __init__(self, a: Callable, b: Callable, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def __call__(self, image: Any, target: dict) -> Sample:
        return self.a(image, target) if random.random() < self.p else self.b(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect({self.a!r}, {self.b!r}, p={self.p})"


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W] ImageNet-normalized."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


class ToTensorNormalize:
    """Final step: image -> float32 [3, H, W] normalized tensor; boxes xyxy
    pixels -> cxcywh normalized by the image size; numpy arrays -> tensors;
    adds ``size`` = tensor [h, w]."""

    def __call__(self, image: np.ndarray, target: dict) -> Sample:
        h, w = image.shape[:2]
        out = normalize_image(image)  # [3, H, W]
        target = dict(target)
        if "boxes" in target:
            b = np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)  # [K, 4] xyxy
            cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
            target["boxes"] = torch.from_numpy((cxcywh / np.array([w, h, w, h], dtype=np.float32)).astype(np.float32))
        if "labels" in target:
            target["labels"] = torch.as_tensor(np.asarray(target["labels"]), dtype=torch.int64)
        for key, value in list(target.items()):
            if isinstance(value, np.ndarray):
                target[key] = torch.from_numpy(np.ascontiguousarray(value))
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
        return out, target

    def __repr__(self) -> str:
        return "ToTensorNormalize()"


def make_train_transforms(
    scales: Sequence[int],
    max_size: int,
    crop: tuple[int, int] | None = (384, 600),
    crop_scales: Sequence[int] = (400, 500, 600),
) -> Compose:
    """The official training augmentation: flip, then either a multi-scale
    resize or resize -> random crop -> multi-scale resize; then normalize.
    ``crop`` None: flip, multi-scale resize, normalize."""
    multi_scale = RandomResize(scales, max_size=max_size)
    if crop is None:
        scaled: Callable = multi_scale
    else:
        scaled = RandomSelect(multi_scale, Compose([RandomResize(crop_scales), RandomSizeCrop(*crop), multi_scale]))
    return Compose([RandomHorizontalFlip(), scaled, ToTensorNormalize()])


def inference_size(trained: tuple[int, int] | None, size: int | None = None,
                   max_size: int | None = None) -> tuple[int, int]:
    """(shorter side, longer-side cap) for inference: what the caller asks for,
    else what the model was trained at (``model.input_size``), else 800 / 1333."""
    base = trained or (800, 1333)
    return (size or base[0], max_size or base[1])


def make_eval_transforms(size: int = 800, max_size: int = 1333) -> Compose:
    return Compose([RandomResize([size], max_size=max_size), ToTensorNormalize()])


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, h_i, w_i] tensors -> (images [B, 3, Hmax, Wmax] zero padded,
    padding_mask [B, Hmax, Wmax] bool, True = padding)."""
    if not images:
        raise ValueError("cannot batch zero images")
    hmax = max(int(im.shape[1]) for im in images)
    wmax = max(int(im.shape[2]) for im in images)
    batch = images[0].new_zeros((len(images), 3, hmax, wmax))  # [B, 3, Hmax, Wmax]
    mask = torch.ones((len(images), hmax, wmax), dtype=torch.bool)  # [B, Hmax, Wmax]
    for i, im in enumerate(images):
        h, w = int(im.shape[1]), int(im.shape[2])
        batch[i, :, :h, :w].copy_(im)
        mask[i, :h, :w] = False
    return batch, mask


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """DataLoader collate_fn -> (images [B, 3, Hmax, Wmax], padding_mask
    [B, Hmax, Wmax] True = padded, targets: list of dicts of tensors)."""
    images, targets = zip(*batch)
    padded, mask = pad_batch(list(images))
    return padded, mask, list(targets)


def collate_eval(batch: Sequence[tuple[torch.Tensor | None, dict]]):
    """Evaluation collate_fn: :func:`collate` over the readable items, plus the
    targets of the unreadable ones (image None, see ``CocoDetection.mark_unreadable``)
    -> (images or None, padding_mask or None, targets, unreadable targets)."""
    readable = [item for item in batch if item[0] is not None]
    unreadable = [target for image, target in batch if image is None]
    if not readable:
        return None, None, [], unreadable
    return (*collate(readable), unreadable)


def preprocess(
    images: Sequence[np.ndarray], size: int = 800, max_size: int = 1333
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference input: RGB uint8 arrays -> (images [B, 3, H, W], padding_mask
    [B, H, W], orig_sizes [B, 2] (h, w) int64)."""
    tensors = []
    sizes = []
    for image in images:
        h, w = image.shape[:2]
        sizes.append((h, w))
        resized, _ = resize(image, None, size, max_size)
        tensors.append(normalize_image(resized))  # [3, h', w']
    batch, mask = pad_batch(tensors)
    return batch, mask, torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)

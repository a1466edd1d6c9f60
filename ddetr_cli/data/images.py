"""Reading image files into uint8 RGB arrays with OpenCV.

Decoding uses ``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR``: OpenCV keeps the bit
depth (so 16-bit files can be rescaled rather than truncated) and the number
of colour channels, *and* applies the EXIF orientation (it skips orientation
only for ``IMREAD_UNCHANGED``). The price is that an alpha channel is dropped
by the decoder: RGBA images become their RGB part, not composited on any
background. Files go through ``np.fromfile`` + ``cv2.imdecode`` so that paths
with non-ASCII characters work on every platform.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ..errors import ImageReadError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff"})
VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})

_DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_video_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


# First bytes of every format in IMAGE_SUFFIXES (TIFF in both byte orders; WebP is RIFF....WEBP).
_SIGNATURES: tuple[bytes, ...] = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def looks_like_image(path: str | os.PathLike) -> bool:
    """True when the file starts like a JPEG, PNG, BMP, TIFF or WebP file (its
    first 12 bytes; nothing is decoded). False for unreadable files."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return False
    if head.startswith(b"RIFF"):
        return head[8:12] == b"WEBP"
    return any(head.startswith(sig) for sig in _SIGNATURES)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes ``path`` -> uint8 [H, W, 3] RGB (EXIF orientation applied).

    Grayscale is replicated to 3 channels, alpha is dropped, 16-bit is scaled
    to 8-bit (v / 257) and float images are taken as [0, 1] when their maximum
    is at most 1, else clipped to [0, 255]. Raises ``ImageReadError``.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # [N] encoded bytes
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    try:
        image = cv2.imdecode(data, _DECODE_FLAGS)
    except cv2.error as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        raise ImageReadError(f"{path}: cannot decode ({first})") from None
    if image is None or image.size == 0:
        raise ImageReadError(f"{path}: not a decodable image (corrupt, truncated or unsupported format)")
    try:
        return to_rgb8(image, bgr=True)
    except ImageReadError as exc:
        raise ImageReadError(f"{path}: {exc}") from None


def to_rgb8(image: np.ndarray, *, bgr: bool = True) -> np.ndarray:
    """Any OpenCV-decoded array (gray/colour/alpha, 8/16-bit/float) -> uint8
    [H, W, 3] RGB. ``bgr``: the colour channels are in OpenCV's BGR order."""
    image = _to_uint8(image)
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))  # [H, W, 3]
    channels = image.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))  # [H, W, 3]
    if channels == 4:
        image = image[:, :, :3]  # alpha dropped
    elif channels != 3:
        raise ImageReadError(f"unsupported number of channels: {channels}")
    if bgr:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # [H, W, 3]
    return np.ascontiguousarray(image)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if image.dtype == np.int8:
        return (image.astype(np.int16) + 128).astype(np.uint8)
    if image.dtype == np.int16:
        return ((image.astype(np.float32) + 32768.0) / 257.0 + 0.5).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        image = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if image.size and float(image.max()) <= 1.0 else 1.0
        return (np.clip(image * scale, 0.0, 255.0) + 0.5).astype(np.uint8)
    raise ImageReadError(f"unsupported pixel type {image.dtype}")

"""Turning user images (files, PIL images, arrays) into model input.

Every failure names the offending item, so one bad file can be reported and
skipped without losing the good ones.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps


class ImageLoadError(ValueError):
    """An image that cannot be read; ``item`` names it, ``reason`` says why."""

    def __init__(self, item, reason: str):
        self.item = item
        self.reason = reason
        super().__init__(f"{item}: {reason}")


def load_image(path) -> Image.Image:
    """Open an image file fully (decoded, EXIF orientation applied)."""
    try:
        with Image.open(os.fspath(path)) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(os.fspath(path), f"cannot read image ({exc})") from exc


def to_model_input(image, preprocessing: dict) -> np.ndarray:
    """One image (PIL image or array H x W [x C]) -> float32 (C, S, S) in [0, 1].

    ``preprocessing`` is a checkpoint's: ``image_size``, ``color_mode`` ("L" or
    "RGB"), ``resample``.
    """
    size, mode = preprocessing["image_size"], preprocessing["color_mode"]
    if not isinstance(image, Image.Image):
        image = _array_to_pil(np.asarray(image))
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image array of shape (H, W) or (H, W, 1|3|4), got {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"unsupported image dtype {array.dtype}")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise ValueError("image array contains NaN or infinity")
            array = np.clip(array, 0.0, 1.0) * 255.0  # floats are taken to be in [0, 1]
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)

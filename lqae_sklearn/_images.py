"""Turning user images (files, PIL images, arrays) into model input.

Every failure names the offending item, so one bad file can be reported and
skipped without losing the good ones. Unusual but readable images are
normalised to 8-bit ``"L"`` or ``"RGB"`` instead of being rejected:

- 16-bit and 32-bit integer images (``"I;16*"``, ``"I"``) are scaled from
  0..65535 to 0..255 (Pillow's own ``convert("L")`` clips them to 255);
- float images (``"F"``) are taken to be in [0, 1] when their maximum is at most 1,
  else in [0, 255];
- images with transparency (``"RGBA"``, ``"LA"``, ``"PA"``, palette images with a
  transparent colour) are composited on black, the background of the datasets
  the packaged model is trained on;
- CMYK, YCbCr, LAB, HSV and palette images are converted to RGB;
- the EXIF orientation tag is honoured (a photo taken sideways comes out upright).

Images whose pixel count exceeds ``PIL.Image.MAX_IMAGE_PIXELS`` are refused
before any pixel is decoded (a decompression bomb would otherwise need gigabytes).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

#: Colour that transparent pixels are composited on (black, like Fashion-MNIST's background).
TRANSPARENT_BACKGROUND = 0

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image that cannot be read; ``item`` names it, ``reason`` says why."""

    def __init__(self, item, reason: str):
        self.item = item
        self.reason = reason
        super().__init__(f"{item}: {reason}")


def load_image(path) -> Image.Image:
    """Open an image file fully: decoded, EXIF orientation applied, as 8-bit "L" or "RGB".

    Raises
    ------
    ImageLoadError
        For anything that stops the file from being decoded (missing, unreadable,
        not an image, truncated, over the decompression-bomb limit); ``reason``
        says which.
    """
    name = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns; we refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(name) as img:
                _check_pixel_count(img)
                img.load()
                image = _upright(img)
                return normalize_mode(image)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(name, f"over the decompression-bomb limit ({exc})") from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(name, "no such file") from exc
    except PermissionError as exc:
        raise ImageLoadError(name, "permission denied") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(name, "is a folder, not an image file") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not an image (unknown or unsupported format)") from exc
    except MemoryError as exc:
        raise ImageLoadError(name, "not enough memory to decode it") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure on a hostile file is that file's error
        raise ImageLoadError(name, f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def _check_pixel_count(img: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageLoadError(
            getattr(img, "filename", "image"),
            f"over the decompression-bomb limit: {width}x{height} = {width * height} pixels, "
            f"limit {limit} (PIL.Image.MAX_IMAGE_PIXELS)",
        )
    if width == 0 or height == 0:
        raise ImageLoadError(getattr(img, "filename", "image"), f"empty image ({width}x{height})")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unparsable EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken metadata must not cost a readable image
        return img.copy()


def normalize_mode(image: Image.Image) -> Image.Image:
    """Any Pillow image -> an 8-bit ``"L"`` or ``"RGB"`` image (see the module notes)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image).astype(np.float64)
        return Image.fromarray(_to_uint8(np.clip(array, 0, 65535) / 257.0))
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
        return Image.fromarray(_to_uint8(np.clip(array * scale, 0, 255)))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode == "PA":
            image = image.convert("RGBA")
        elif mode in ("RGBa", "La"):  # premultiplied alpha
            image = image.convert(mode.replace("a", "A"))
        return _composite(image)
    if mode == "P":
        palette_mode = image.palette.mode if image.palette is not None else "RGB"
        return image.convert("L" if palette_mode == "L" else "RGB")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _composite(image: Image.Image) -> Image.Image:
    base_mode = "L" if image.mode == "LA" else "RGB"
    background = Image.new(base_mode, image.size, TRANSPARENT_BACKGROUND)
    alpha = image.getchannel("A")
    background.paste(image.convert(base_mode), mask=alpha)
    return background


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.rint(array).astype(np.uint8)


def prepare_image(image: Image.Image, preprocessing: dict) -> Image.Image:
    """PIL image -> 8-bit image in the checkpoint's colour mode and size (no scaling to [0, 1])."""
    size, mode = preprocessing["image_size"], preprocessing["color_mode"]
    image = normalize_mode(image)
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


def to_model_input(image, preprocessing: dict) -> np.ndarray:
    """One image (PIL image or array H x W [x C]) -> float32 (C, S, S) in [0, 1].

    ``preprocessing`` is a checkpoint's: ``image_size``, ``color_mode`` ("L" or
    "RGB"), ``resample``.
    """
    if not isinstance(image, Image.Image):
        image = _array_to_pil(np.asarray(image))
    array = np.asarray(prepare_image(image, preprocessing), dtype=np.float32) / 255.0
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

"""Images as a fitted tokenizer's checkpoint reads them, ready to draw.

A token map or a reconstruction is only comparable with the image the model saw:
resized to the checkpoint's size and converted to its colour mode. So every display
draws that view (the tokenizer's own preprocessing), whatever form the user's
images come in.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from sklearn.utils.validation import check_is_fitted

from .._images import image_source
from .._tokenizer import LQAETokenizer

_ONE_IMAGE = "one image: an array (H, W) or (H, W, C) with C in 1, 3, 4, a file path or a PIL image"


def check_tokenizer(tokenizer, name: str = "tokenizer") -> LQAETokenizer:
    """``tokenizer`` if it is a fitted :class:`LQAETokenizer`, else a clear error naming ``name``."""
    if not isinstance(tokenizer, LQAETokenizer):
        raise TypeError(f"{name} must be a fitted LQAETokenizer, got {type(tokenizer).__name__}")
    check_is_fitted(tokenizer)
    return tokenizer


def model_view(tokenizer: LQAETokenizer, X) -> np.ndarray:
    """``X`` (any form ``transform`` takes) as float32 (N, S, S) or (N, S, S, 3) in [0, 1]."""
    source = image_source(X, tokenizer.model_.checkpoint_config["preprocessing"])
    batch = source.batch(0, len(source))  # (N, C, S, S)
    return batch[:, 0] if batch.shape[1] == 1 else batch.transpose(0, 2, 3, 1)


def as_batch_of_one(image, name: str = "image") -> list:
    """One image (array, path, PIL image; also a batch holding exactly one) as a list of one item."""
    if isinstance(image, (str, os.PathLike, Image.Image)):
        return [image]
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    try:
        array = np.asarray(image)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{name} must be {_ONE_IMAGE}; got {type(image).__name__}") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{name} must be {_ONE_IMAGE}; got {type(image).__name__} of dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] == 1:
        array = array[0]  # a batch (1, H, W)
    elif array.ndim == 4 and array.shape[0] == 1:
        array = array[0]  # a batch (1, H, W, C)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        return [array]
    raise ValueError(f"{name} must be {_ONE_IMAGE}; got an array of shape {array.shape} (to draw one image of a "
                     f"batch, pass it alone, e.g. X[0])")


def check_pictures(images, name: str, *, batch: bool) -> np.ndarray:
    """Precomputed pictures as float arrays in [0, 1]: (N, H, W[, 3]) if ``batch``, else (H, W[, 3])."""
    array = np.asarray(images)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    array = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
    offset = 1 if batch else 0
    shape_ok = array.ndim == 2 + offset or (array.ndim == 3 + offset and array.shape[-1] == 3)
    if not shape_ok or (batch and len(array) == 0):
        expected = "(n, H, W) or (n, H, W, 3)" if batch else "(H, W) or (H, W, 3)"
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must hold finite pixel values in [0, 1] (or uint8), got NaN or infinity")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"{name} must hold finite pixel values in [0, 1] (or uint8), got values in "
                         f"[{array.min()}, {array.max()}]")
    return array


def take(X, indices):
    """The items of ``X`` at ``indices``, for arrays, DataFrames / Series and plain sequences."""
    if hasattr(X, "iloc"):
        return X.iloc[list(indices)]
    if isinstance(X, np.ndarray):
        return X[np.asarray(indices, dtype=np.int64)]
    return [X[int(i)] for i in indices]


def draw_picture(ax, picture: np.ndarray, cmap: str):
    """imshow with pixel edges at integer coordinates (so grid lines fall on patch borders)."""
    height, width = picture.shape[:2]
    options = {} if picture.ndim == 3 else {"cmap": cmap, "vmin": 0.0, "vmax": 1.0}
    return ax.imshow(picture, extent=(0, width, height, 0), interpolation="nearest", **options)

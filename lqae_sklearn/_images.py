"""Turning user images (files, PIL images, arrays, batches of them) into model input.

:func:`image_source` wraps whatever a user passes as ``X`` (an array of images,
flat rows, a list of paths / PIL images / arrays, a pandas column) as a sized
source of preprocessed batches; :func:`to_model_input` converts one image;
:func:`domain_gap` says when the images are far from what a checkpoint was
trained on (:class:`DomainWarning`).

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
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageOps

#: Colour that transparent pixels are composited on (black, like Fashion-MNIST's background).
TRANSPARENT_BACKGROUND = 0

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image that cannot be read; ``item`` names it, ``reason`` says why.

    Raised by :class:`LQAETokenizer` (``transform``, ``encode``) for an item of
    ``X`` that is not a readable image, so that one bad file can be reported
    (and skipped, as ``lqae-encode`` does) without losing the others. It is a
    ``ValueError``.

    Parameters
    ----------
    item : str
        The offending item: ``X[i]``, with the file path when there is one.
    reason : str
        Why it cannot be read ("no such file", "not an image ...", ...).

    Examples
    --------
    >>> from lqae_sklearn import ImageLoadError, LQAETokenizer
    >>> try:
    ...     LQAETokenizer().fit().transform(["no/such/file.png"])
    ... except ImageLoadError as error:
    ...     print(error.reason)
    no such file
    """

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
        return Image.fromarray(np.rint(np.clip(array, 0, 65535) / 257.0).astype(np.uint8))
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
        return Image.fromarray(np.rint(np.clip(array * scale, 0, 255)).astype(np.uint8))
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
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinity")
        array = to_uint8(array)
    return Image.fromarray(array)


# -- how far the images are from the checkpoint's training data ------------------------------
#: An image side more than this many times the checkpoint's image size (or less than its fraction) is "far".
SIZE_FACTOR = 4


class DomainWarning(UserWarning):
    """Images far from what the checkpoint was trained on: their tokens describe a converted version.

    Issued once per :meth:`~lqae_sklearn.LQAETokenizer.transform` (or ``encode``) call when
    some of the images are much larger or smaller than the checkpoint's image
    size (more than 4 times, or less than a quarter, on a side), or are colour
    images for a grayscale checkpoint (or the reverse). Each image is still
    converted to the checkpoint's size and colour mode and tokenized, but its
    tokens then describe that small version: for the shipped checkpoint, a
    28 x 28 grayscale Fashion-MNIST-like image. The message names the
    checkpoint's training data and the ``lqae-train`` command that trains a
    checkpoint for such images.

    Examples
    --------
    >>> import warnings
    >>> from lqae_sklearn import DomainWarning
    >>> warnings.simplefilter("error", DomainWarning)  # refuse images the checkpoint was not made for
    """


def image_summary(image) -> tuple[int, int, str]:
    """``(height, width, mode)`` of a PIL image or an array (H, W[, C]), as :func:`domain_gap` reads it.

    ``mode`` is ``"RGB"`` only when the image holds colour: an RGB image whose
    channels are all equal (a grayscale photo saved as RGB) counts as ``"L"``.
    """
    if isinstance(image, Image.Image):
        image = normalize_mode(image)
        if image.mode == "L":
            return image.height, image.width, "L"
        image = np.asarray(image)
    array = np.asarray(image)
    height, width = array.shape[:2]
    colour = array.ndim == 3 and array.shape[-1] >= 3 and bool(_colour_per_image(array[None])[0])
    return height, width, "RGB" if colour else "L"


def _colour_per_image(images: np.ndarray) -> np.ndarray:
    """For images (N, H, W, C>=3): whether each holds colour (its first three channels differ somewhere)."""
    red, green, blue = images[..., 0], images[..., 1], images[..., 2]
    return ((red != green) | (green != blue)).any(axis=(1, 2))


def domain_gap(originals, preprocessing: dict, training_data: dict | None) -> str | None:
    """Why images are far from what a checkpoint was trained on, or None when they are not.

    Parameters
    ----------
    originals : iterable of (int, int, str)
        ``(height, width, mode)`` of each image as given, before conversion
        (:func:`image_summary`); mode ``"L"`` (grayscale) or ``"RGB"`` (colour).
    preprocessing : dict
        The checkpoint's ``preprocessing`` (``image_size``, ``color_mode``).
    training_data : dict or None
        The checkpoint's ``config["training"]["data"]`` (``source``, ``split``
        or ``path``, ``num_images``); None when the checkpoint records none.

    Returns
    -------
    str or None
        One message for all the images: how many are far and how, the
        checkpoint's training data, and how to train a checkpoint for such
        images; None when every image is close.
    """
    size, colour_model = preprocessing["image_size"], preprocessing["color_mode"] == "RGB"
    counts = Counter(originals)
    total = sum(counts.values())
    larger = smaller = other_colour = 0
    example = None
    for (height, width, mode), n in counts.items():
        far_larger = max(height, width) > SIZE_FACTOR * size
        far_smaller = min(height, width) * SIZE_FACTOR < size
        wrong_colour = (mode == "RGB") != colour_model
        larger += n * far_larger
        smaller += n * far_smaller
        other_colour += n * wrong_colour
        if example is None and (far_larger or far_smaller or wrong_colour):
            example = f"{height} x {width} {_kind(mode == 'RGB')}"
    if example is None:
        return None
    found = []
    if larger:
        found.append(f"{larger} of {total} images are much larger than {size} x {size}")
    if smaller:
        found.append(f"{smaller} of {total} images are much smaller than {size} x {size}")
    if other_colour:
        found.append(f"{other_colour} of {total} images are {_kind(not colour_model)}")
    model_kind = f"{size} x {size} {_kind(colour_model)}"
    preset = "small-rgb" if any(mode == "RGB" for _, _, mode in counts) else "small-28"  # the inputs' colour
    return (
        f"{'; '.join(found)} (e.g. {example}), but this checkpoint was trained on {describe_training_data(training_data)}, "
        f"{model_kind}: each image is converted to {model_kind} before it is tokenized, so its tokens describe "
        f"that version. To tokenize images like these, train a checkpoint on them: lqae-train --data FOLDER "
        f"--preset {preset} --image-size SIZE --out RUN (SIZE a multiple of the preset's patch size), then use "
        f"RUN/checkpoint (LQAETokenizer(checkpoint=...), lqae-encode --checkpoint ...)."
    )


def _kind(colour: bool) -> str:
    return "colour" if colour else "grayscale"


def describe_training_data(training_data: dict | None) -> str:
    """A checkpoint's ``config["training"]["data"]`` in words, e.g. ``"fashion-mnist train, 60,000 images"``."""
    if not training_data:
        return "data its config does not record"
    source = training_data.get("source")
    if source == "fashion-mnist":
        what = f"fashion-mnist {training_data.get('split', '')}".rstrip()
    elif source == "folder":
        what = f"the images under {training_data.get('path')}"
    else:
        what = str(training_data.get("path") or source or "unrecorded data")
    count = training_data.get("num_images")
    return f"{what}, {count:,} images" if isinstance(count, int) else what


# -- batches of images ------------------------------------------------------------------
def flat_width(preprocessing: dict) -> int:
    """Pixels in one image of this preprocessing, flattened row-major: H x W x C."""
    channels = 1 if preprocessing["color_mode"] == "L" else 3
    return preprocessing["image_size"] ** 2 * channels


def is_flat_rows(X) -> bool:
    """Whether ``X`` is a 2-D table of pixel values (an array or a DataFrame of several columns).

    Array-likes of rows (lists of lists, object arrays, ``__array__`` objects) count
    once :func:`as_array_input` has made them arrays.
    """
    if hasattr(X, "columns"):
        return X.shape[1] > 1
    return isinstance(X, (np.ndarray, torch.Tensor)) and X.ndim == 2 and X.dtype != object


def as_array_input(X):
    """``X`` with array-likes of numbers made numeric ndarrays; any other ``X`` unchanged.

    What scikit-learn's ``check_array`` takes as a table: a list (or tuple) of rows
    that are themselves lists or tuples, an object ndarray of two or more
    dimensions holding numbers, or any other object with ``__array__``. Integers
    stay integers (0-255 pixels), floats stay floats ([0, 1]), so each gives
    the same images as the equivalent ndarray. Lists of paths, PIL images or
    arrays, 1-D object arrays of them, pandas objects and tensors are left as
    they are.

    Raises
    ------
    ValueError
        If the rows have different lengths.
    TypeError
        If an entry is not a number, naming its position.
    """
    if isinstance(X, (np.ndarray, torch.Tensor, str, bytes, os.PathLike, Image.Image)) or hasattr(X, "iloc"):
        if isinstance(X, np.ndarray) and X.dtype == object and X.ndim >= 2:
            return _numeric_array(X.tolist(), X.shape)
        return X
    if isinstance(X, (list, tuple)):
        if X and all(isinstance(item, (list, tuple)) for item in X):
            return _numeric_array(X, (len(X),))
        return X
    if hasattr(X, "__array__"):
        array = np.asarray(X)
        return _numeric_array(array.tolist(), array.shape) if array.dtype == object else array
    return X


def _numeric_array(nested, shape: tuple) -> np.ndarray:
    """Nested Python lists of numbers -> an int, float or bool ndarray (numpy infers which, as from literals)."""
    try:
        array = np.array(nested)
    except ValueError as exc:  # ragged rows
        raise ValueError(f"X has rows of different lengths (shape starts {shape}): {exc}") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        flat = np.array(nested, dtype=object) if array.dtype != object else array
        for index in np.ndindex(flat.shape):
            value = flat[index]
            if not isinstance(value, (int, float, np.number, np.bool_)):
                raise TypeError(f"X{list(index)} is {value!r:.60} ({type(value).__name__}): pixel rows must "
                                f"hold numbers")
        raise TypeError(f"X holds values of dtype {array.dtype}: pixel rows must hold numbers")
    return array


def image_source(X, preprocessing: dict):
    """Wrap user input as a sized source of preprocessed batches (float32 (B, C, S, S)).

    ``X`` is an array of images (N, H, W[, C]); flat rows (N, H x W x C) of the
    checkpoint's size, row-major (also as a DataFrame of pixel columns); or a list, tuple, object
    array or one-column DataFrame / Series of paths, PIL images or arrays.
    """
    if isinstance(X, (str, bytes, os.PathLike)):
        raise TypeError(f"X must be a collection of images; got a single path {X!r} (wrap it in a list)")
    if isinstance(X, Image.Image):
        raise TypeError("X must be a collection of images; got a single PIL image (wrap it in a list)")
    X = as_array_input(X)
    if hasattr(X, "columns") and hasattr(X, "iloc"):  # pandas DataFrame: pixel columns, or one column of items
        X = X.to_numpy() if X.shape[1] > 1 else X.iloc[:, 0]
    if hasattr(X, "iloc"):  # pandas Series
        X = X.to_list()
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if isinstance(X, np.ndarray) and X.dtype != object:
        source = _ArraySource(X, preprocessing)
    elif isinstance(X, (list, tuple, np.ndarray)):
        source = _ItemSource(list(X), preprocessing)
    else:
        raise TypeError(
            f"X must be an array (N, H, W) or (N, H, W, C), a list of paths / PIL images / arrays, or a "
            f"pandas Series of them; got {type(X).__name__}"
        )
    if len(source) == 0:
        raise ValueError("X holds no images")
    return source


def to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 pixels from uint8, integer (0..255) or float ([0, 1]) ones; out-of-range values are clipped."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(array, 0.0, 1.0) * 255.0
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _check_pixel_range(array: np.ndarray, name: str) -> None:
    """Reject NaN and out-of-range pixels rather than clipping them silently."""
    if array.dtype == np.uint8 or array.dtype == bool:
        return
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError(name, "image array contains NaN or infinity")
        low, high, hint = 0.0, 1.0, "float images must lie in [0, 1] (divide 0-255 data by 255)"
    elif np.issubdtype(array.dtype, np.integer):
        low, high, hint = 0, 255, "integer images must lie in [0, 255]"
    else:
        raise ImageLoadError(name, f"unsupported image dtype {array.dtype}")
    if array.size and (array.min() < low or array.max() > high):
        raise ImageLoadError(name, f"pixel values span [{array.min()}, {array.max()}]; {hint}")


class _ArraySource:
    """A batch array (N, H, W), (N, H, W, C) or flat rows; vectorised when no resize or colour change is needed."""

    def __init__(self, array: np.ndarray, preprocessing: dict):
        if array.ndim == 2:
            size, width = preprocessing["image_size"], flat_width(preprocessing)
            if array.shape[1] != width:
                raise ValueError(
                    f"X has shape {array.shape}: flat rows must hold {size} x {size} x {width // size ** 2} = "
                    f"{width} pixels each for this checkpoint (or pass images (N, H, W[, C]) of any size)"
                )
            array = array.reshape(len(array), size, size, -1)
        if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (1, 3, 4)):
            raise ValueError(
                f"X has shape {array.shape}: expected (N, H, W) or (N, H, W, C) with C in 1, 3, 4 "
                f"(channels-first arrays need X.transpose(0, 2, 3, 1))"
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"X has dtype {array.dtype}; expected uint8 or float images")
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        self.array = array
        self.preprocessing = preprocessing
        if array.dtype != np.uint8:
            self._check_range()
        size, mode = preprocessing["image_size"], preprocessing["color_mode"]
        channels = 1 if array.ndim == 3 else array.shape[-1]
        self.direct = array.shape[1:3] == (size, size) and (channels == 1 if mode == "L" else channels == 3)

    def originals(self) -> list:
        """``(height, width, mode)`` of every image, for :func:`domain_gap`."""
        height, width = self.array.shape[1:3]
        if self.array.ndim == 3 or self.array.shape[-1] == 1:
            return [(height, width, "L")] * len(self.array)
        return [(height, width, "RGB" if colour else "L") for colour in _colour_per_image(self.array)]

    def _check_range(self) -> None:
        try:
            _check_pixel_range(self.array, "X")
        except ImageLoadError:
            for i in range(len(self.array)):  # name the first offending image
                _check_pixel_range(self.array[i], f"X[{i}]")
            raise

    def __len__(self) -> int:
        return len(self.array)

    def batch(self, start: int, stop: int) -> np.ndarray:
        part = self.array[start:stop]
        if self.direct:
            pixels = to_uint8(part).astype(np.float32) / 255.0
            pixels = pixels[..., None] if pixels.ndim == 3 else pixels
            # A fresh C-order copy: with one channel, numpy calls the strided views "contiguous", and torch may
            # then pick a channels-last kernel, whose results differ from the other input forms' by rounding.
            return np.array(pixels.transpose(0, 3, 1, 2), order="C")
        out = []
        for i, image in enumerate(part, start):
            try:
                out.append(to_model_input(image, self.preprocessing))
            except ValueError as exc:
                raise ImageLoadError(f"X[{i}]", str(exc)) from exc
        return np.stack(out)


class _ItemSource:
    """A list of paths, PIL images or arrays, each preprocessed on its own."""

    def __init__(self, items: list, preprocessing: dict):
        self.items = items
        self.preprocessing = preprocessing
        self._originals: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.items)

    def originals(self) -> list:
        """``(height, width, mode)`` of every image read so far, for :func:`domain_gap`."""
        return list(self._originals.values())

    def batch(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self._one(i) for i in range(start, min(stop, len(self.items)))])

    def _one(self, i: int) -> np.ndarray:
        item = self.items[i]
        if isinstance(item, (str, os.PathLike)):
            name = f"X[{i}] ({os.fspath(item)!r})"
            try:
                item = load_image(item)
            except ImageLoadError as exc:
                raise ImageLoadError(name, exc.reason) from exc
        elif isinstance(item, Image.Image):
            name = f"X[{i}]"
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            name = f"X[{i}]"
            item = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item)
            _check_pixel_range(item, name)
            item = to_uint8(item) if item.dtype != bool else item.astype(np.uint8) * 255
        else:
            raise ImageLoadError(
                f"X[{i}]", f"unsupported item of type {type(item).__name__} ({item!r:.60}); expected a path, a PIL "
                f"image or an array"
            )
        try:
            model_input = to_model_input(item, self.preprocessing)
        except (ValueError, OSError) as exc:
            raise ImageLoadError(name, str(exc)) from exc
        self._originals[i] = image_summary(item)
        return model_input

"""The labelled images an evaluation reads: a train split and a test split, at the checkpoint's preprocessing.

Sources: Fashion-MNIST (its own train and test splits, through
:func:`~lqae_sklearn.datasets.fetch_fashion_mnist`), a folder with one subfolder
of images per class (split into train and test by seed, stratified, unless a
second folder gives the test split), or ``(X, y)`` arrays. Every image is decoded
and preprocessed once, up front, so that a bad input fails before any work, and
kept as uint8 ``(N, C, S, S)``: the checkpoint's model input times 255, exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

FASHION_MNIST = "fashion-mnist"


class InputError(ValueError):
    """An input of an evaluation (checkpoint, data, option) that cannot be used; the message names it."""


@dataclass
class LabelledSplits:
    """Train and test images (uint8 ``(N, C, S, S)``) with their labels, and where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    description: dict


def load_splits(data, test_data, preprocessing: dict, *, test_fraction: float, n_train, n_test,
                seed: int) -> LabelledSplits:
    """Read ``data`` (and ``test_data``), split, subsample to ``n_train`` / ``n_test`` by ``seed``, preprocess.

    The subsample is a seeded random choice kept in source order; ``None`` keeps every image.
    """
    rng = np.random.default_rng(seed)
    if isinstance(data, str) and data == FASHION_MNIST:
        if test_data is not None:
            raise InputError(f"test_data={test_data!r} applies to a folder; Fashion-MNIST has its own test split")
        (X_train, y_train), (X_test, y_test) = (_fashion_mnist(subset) for subset in ("train", "test"))
        # Integer labels, as every Fashion-MNIST benchmark here uses: the same seed draws the same episodes.
        description = {"source": FASHION_MNIST, "split": "the data set's train and test splits"}
    else:
        X, y, source = _labelled(data, "data")
        if test_data is None:
            train, test = _stratified_split(y, test_fraction, seed, source)
            X_train, y_train, X_test, y_test = _take(X, train), y[train], _take(X, test), y[test]
            description = {"source": source, "split": f"stratified, {test_fraction:g} of each class to test"}
        else:
            X_train, y_train = X, y
            X_test, y_test, test_source = _labelled(test_data, "test_data")
            unseen = sorted(set(map(str, np.unique(y_test))) - set(map(str, np.unique(y_train))))
            if unseen:
                raise InputError(f"test_data {test_source!r} has classes the training data {source!r} lacks: "
                                 f"{', '.join(unseen)}")
            description = {"source": source, "test_source": test_source, "split": "given"}
    available = (len(y_train), len(y_test))
    train = _subsample(len(y_train), n_train, rng)
    test = _subsample(len(y_test), n_test, rng)
    splits = LabelledSplits(
        train_images=_preprocess(_take(X_train, train), preprocessing, "training"),
        train_labels=np.asarray(y_train)[train],
        test_images=_preprocess(_take(X_test, test), preprocessing, "test"),
        test_labels=np.asarray(y_test)[test],
        description={**description, "train_images": len(train), "test_images": len(test),
                     "train_available": available[0], "test_available": available[1],
                     "classes": [_class_name(c, description) for c in np.unique(y_train)]},
    )
    return splits


def _class_name(label, description: dict) -> str:
    if description["source"] == FASHION_MNIST:
        from lqae_sklearn.datasets import FASHION_MNIST_CLASSES

        return f"{label}: {FASHION_MNIST_CLASSES[label]}"
    return str(label)


def _fashion_mnist(subset: str):
    from lqae_sklearn.datasets import fetch_fashion_mnist

    try:
        return fetch_fashion_mnist(subset=subset, return_X_y=True)
    except OSError as exc:
        raise InputError(f"Fashion-MNIST ({subset} split) cannot be loaded: {exc}") from exc


def _labelled(data, name: str):
    """(images, labels, description) from a folder of class subfolders or an ``(X, y)`` pair."""
    if isinstance(data, (str, os.PathLike)):
        paths, labels = labelled_folder(data, f"{name} folder")
        return paths, labels, os.fspath(data)
    if isinstance(data, tuple) and len(data) == 2:
        X, y = data
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise InputError(f"{name} (X, y): y must be 1-D with one label per image; got {len(X)} images and "
                             f"labels of shape {y.shape}")
        _check_classes(y, f"{name} (X, y)")
        return X, y, f"(X, y) arrays, {len(y)} images"
    raise InputError(f"{name} must be {FASHION_MNIST!r}, a folder of class subfolders or an (X, y) pair; got "
                     f"{type(data).__name__}")


def labelled_folder(root, name: str = "data folder") -> tuple[list[str], np.ndarray]:
    """Image files under ``root`` (sorted, as ``lqae-encode`` finds them) and their classes.

    The class of an image is the name of the folder holding it (``lqae-encode
    --labels-from-dirs``'s rule). Files are those whose extension Pillow knows.
    """
    from PIL import Image

    from lqae_sklearn.encoding._discovery import discover, label_of

    root = os.fspath(root)
    if not os.path.isdir(root):
        what = "does not exist" if not os.path.exists(root) else "is not a folder"
        raise InputError(f"{name} {root!r} {what}; give a folder with one subfolder of images per class")
    extensions = {ext.lstrip(".").lower() for ext in Image.registered_extensions()}
    found = discover([root], extensions=extensions)
    if found.errors:
        listed = "; ".join(f"{item.path}: {reason}" for item, reason in found.errors[:3])
        more = f" (and {len(found.errors) - 3} more)" if len(found.errors) > 3 else ""
        raise InputError(f"{name} {root!r}: cannot read {listed}{more}")
    paths = [item.path for item in found.items]
    if not paths:
        raise InputError(f"{name} {root!r} holds no image files; give a folder with one subfolder of images per "
                         f"class")
    loose = [p for p in paths if os.path.samefile(os.path.dirname(p), root)]
    if loose:
        raise InputError(f"{name} {root!r}: {loose[0]!r} sits directly in the folder, so it has no class; put each "
                         f"image in a subfolder named after its class")
    labels = np.array([label_of(p) for p in paths], dtype=object)
    _check_classes(labels, f"{name} {root!r}")
    return paths, labels


def _check_classes(labels, described: str) -> None:
    classes = np.unique(labels)
    if len(classes) < 2:
        raise InputError(f"{described} has one class ({classes[0]!r}, {len(labels)} images); a probe and a few-shot "
                         f"episode need at least two")


def _stratified_split(y, test_fraction: float, seed: int, source: str):
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        small = [str(c) for c, n in zip(classes, counts) if n < 2]
        raise InputError(f"data folder {source!r}: class {small[0]!r} has 1 image; each class needs at least 2 to "
                         f"appear in both the train and the test split (or give test_data)")
    # Each split needs one image of every class; say which fractions allow that (train_test_split's rounding).
    n_test = math.ceil(test_fraction * len(y))
    if min(n_test, len(y) - n_test) < len(classes):
        low, high = len(classes) / len(y), 1 - len(classes) / len(y)
        allowed = (f"a test_fraction from {low:.2g} to {high:.2g}" if low <= high else
                   "more images (at least two per class)")
        raise InputError(f"data {source!r} cannot be split with test_fraction={test_fraction:g}: its "
                         f"{len(y)} images give {n_test} test and {len(y) - n_test} train images for "
                         f"{len(classes)} classes, and each split needs one image of every class; give {allowed}, "
                         f"or test_data")
    try:
        train, test = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)
    except ValueError as exc:  # too few images for one test image per class
        raise InputError(f"data {source!r} cannot be split with test_fraction={test_fraction:g}: {exc}") from exc
    return np.sort(train), np.sort(test)


def _subsample(n: int, limit, rng) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, limit, replace=False))


def _take(X, indices):
    if isinstance(X, np.ndarray):
        return X[indices]
    return [X[i] for i in indices]


def _preprocess(X, preprocessing: dict, split: str) -> np.ndarray:
    """uint8 (N, C, S, S): the checkpoint's model input x 255 (exact: the input is uint8 / 255)."""
    from lqae_sklearn._images import ImageLoadError, image_source

    try:
        source = image_source(X, preprocessing)
        batches = [source.batch(start, start + 1024) for start in range(0, len(source), 1024)]
    except (ImageLoadError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read a {split} image: {exc}") from exc
    return np.rint(np.concatenate(batches) * 255.0).astype(np.uint8)

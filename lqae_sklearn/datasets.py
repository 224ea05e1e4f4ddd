"""Fashion-MNIST from its idx files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

#: Where Debian's ``dataset-fashion-mnist`` puts the files; override with the
#: ``path`` argument or the ``LQAE_FASHION_MNIST`` environment variable.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported (type code {data[2]:#x})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated: header promises {expected} bytes, file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(split: str = "train", path=None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(path or os.environ.get("LQAE_FASHION_MNIST") or FASHION_MNIST_DIR)
    arrays = []
    for stem in _FILES[split]:
        candidates = [root / (stem + ".gz"), root / stem]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}(.gz) not found under {root}; install Debian's "
                f"'dataset-fashion-mnist' or pass the folder holding the idx files"
            )
        arrays.append(read_idx(found))
    images, labels = arrays
    return images, labels.astype(np.int64)

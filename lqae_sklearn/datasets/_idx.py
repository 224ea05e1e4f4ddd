"""The idx format of MNIST-like data sets: a magic number, the dimensions, then raw bytes."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def read_idx_bytes(path) -> bytes:
    """The idx payload of ``path``, decompressed when the name ends in ``.gz``."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError) as exc:
        raise ValueError(f"{path} is not a complete gzip file: {exc}") from None


def parse_idx(data: bytes, source="idx data") -> np.ndarray:
    """Decode idx bytes into a read-only uint8 array; ``source`` names them in errors."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source} is not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{source}: only unsigned-byte idx files are supported (type code {data[2]:#x})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{source} is truncated inside its header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{source} is truncated: header promises {expected} bytes, file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def read_idx(path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a uint8 numpy array.

    Parameters
    ----------
    path : str or path-like
        An idx file such as ``t10k-images-idx3-ubyte``; a name ending in ``.gz``
        is decompressed.

    Returns
    -------
    array : ndarray of uint8
        Shaped as the file's header says, e.g. ``(10000, 28, 28)`` for images.

    Raises
    ------
    ValueError
        If the file is not an unsigned-byte idx file or is truncated.

    Examples
    --------
    >>> from lqae_sklearn.datasets import read_idx
    >>> read_idx("tests/data/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
    (500,)
    """
    return parse_idx(read_idx_bytes(path), source=str(path))

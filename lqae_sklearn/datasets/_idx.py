"""The idx format of MNIST-like data sets: a magic number, the dimensions, then raw bytes."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

#: Bytes decompressed or read per call while filling an array.
_CHUNK = 1 << 20
#: Deflate cannot expand data by more than about 1032:1 (zlib's technical notes): a header
#: promising more than that of a .gz file is damaged, and no buffer of its size is allocated.
_MAX_DEFLATE_RATIO = 1032


def _promised_size(header: bytes | bytearray) -> int | None:
    """Total bytes (header included) that a complete unsigned-byte idx ``header`` promises, or None."""
    if len(header) < 4 or header[:2] != b"\0\0" or header[2] != 0x08 or len(header) < 4 + 4 * header[3]:
        return None
    ndim = header[3]
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return 4 + 4 * ndim + int(np.prod(dims, dtype=object))


def read_idx_bytes(path) -> bytearray:
    """The idx content of ``path`` (decompressed when the name ends in ``.gz``), in a bytearray.

    The header is read first and the rest straight into one bytearray of the size it
    promises, so the content is held once (no bytes object and copy of it), and the arrays
    :func:`parse_idx` makes of it are writeable, as scikit-learn's fetchers' are. A file
    shorter or longer than its header says comes back as it is, for :func:`parse_idx` to
    name what is wrong.
    """
    path = Path(path)
    compressed = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            header = bytearray(f.read(4))
            if len(header) == 4 and header[:2] == b"\0\0":
                header += f.read(4 * header[3])
            size = _promised_size(header)
            limit = path.stat().st_size * (_MAX_DEFLATE_RATIO if compressed else 1)
            if size is None or size > limit:
                return header + f.read()
            data = bytearray(size)
            data[: len(header)] = header
            filled = len(header)
            with memoryview(data) as view:
                while filled < size and (n := f.readinto(view[filled : filled + _CHUNK])):
                    filled += n
            if filled < size:
                del data[filled:]
            # Read to the end even when full: bytes past the promised size are an error, and
            # only the end of a gzip stream checks its CRC and length.
            data += f.read()
            return data
    except (gzip.BadGzipFile, EOFError) as exc:
        raise ValueError(f"{path} is not a complete gzip file: {exc}") from None


def parse_idx(data, source="idx data") -> np.ndarray:
    """Decode idx content into a uint8 array sharing its memory; ``source`` names it in errors.

    The array is writeable when ``data`` is (a bytearray, as :func:`read_idx_bytes` returns).
    """
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
    held = len(data) - offset
    if held != expected:
        what = "is truncated" if held < expected else "is longer than its header says"
        raise ValueError(f"{source} {what}: header promises {expected} bytes, file holds {held}")
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
        Shaped as the file's header says, e.g. ``(10000, 28, 28)`` for images;
        writeable.

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

"""Fashion-MNIST, found on this machine or downloaded once and cached, as scikit-learn's fetchers do."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import get_data_home
from sklearn.utils import Bunch

from ._idx import parse_idx, read_idx_bytes

#: Where Debian's package ``dataset-fashion-mnist`` installs the four idx files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Base URLs tried in order: the download links of the dataset's README, then the
#: copy in its GitHub repository. Prepend a mirror of your own to use it first.
FASHION_MNIST_MIRRORS = [
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class IdxFile:
    """One of the four files and the two checksums that pin it.

    ``gz_sha256`` pins the official ``.gz`` download byte for byte. ``sha256``
    pins the idx bytes inside it, so a copy that was recompressed (Debian's
    package strips the gzip header's name and time) or stored uncompressed is
    checked too.
    """

    name: str
    gz_sha256: str
    sha256: str
    shape: tuple


_FILES = {
    "train": (
        IdxFile("train-images-idx3-ubyte",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", (60000, 28, 28)),
        IdxFile("train-labels-idx1-ubyte",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", (60000,)),
    ),
    "test": (
        IdxFile("t10k-images-idx3-ubyte",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", (10000, 28, 28)),
        IdxFile("t10k-labels-idx1-ubyte",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", (10000,)),
    ),
}

DESCR = """\
Fashion-MNIST
=============

Zalando's article images: 60,000 training and 10,000 test images, 28 x 28
grayscale (uint8), each labelled with one of 10 classes: T-shirt/top, Trouser,
Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot. Made as a
drop-in replacement for MNIST.

:Samples: 60,000 (train), 10,000 (test)
:Dimensionality: 28 x 28 = 784 pixels
:Classes: 10, balanced
:License: MIT, Copyright 2017 Zalando SE

Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.
https://github.com/zalandoresearch/fashion-mnist
"""


def fetch_fashion_mnist(
    *, subset="train", data_home=None, download_if_missing=True, return_X_y=False, timeout=60.0
):
    """Load one split of Fashion-MNIST, downloading it once if it is not on this machine.

    Each of the split's two idx files is taken from the first place that holds it:

    1. ``data_home``: the cache, ``<data_home>/fashion_mnist/``;
    2. the folder named by the environment variable ``LQAE_FASHION_MNIST``;
    3. Debian's ``/usr/share/datasets/fashion-mnist`` (package
       ``dataset-fashion-mnist``), when present.

    Files may be gzipped (``train-images-idx3-ubyte.gz``) or not. Wherever a file
    comes from, its contents are checked against a pinned SHA-256. Otherwise the
    official ``.gz`` file is downloaded (see :data:`FASHION_MNIST_MIRRORS`),
    checked against its own pinned SHA-256 before it takes its final name in the
    cache, and read from there from then on: an interrupted or damaged download
    never leaves a file that passes for data.

    Parameters
    ----------
    subset : {"train", "test"}, default="train"
        The 60,000 training or the 10,000 test images.
    data_home : str or path-like, default=None
        The scikit-learn data folder; ``None`` means
        :func:`sklearn.datasets.get_data_home` (``$SCIKIT_LEARN_DATA`` or
        ``~/scikit_learn_data``).
    download_if_missing : bool, default=True
        If False, raise an :class:`OSError` instead of downloading.
    return_X_y : bool, default=False
        Return ``(data, target)`` instead of a :class:`~sklearn.utils.Bunch`.
    timeout : float, default=60.0
        Seconds a download may wait for the server (to connect, or between two
        pieces of data) before it gives up on that mirror.

    Returns
    -------
    dataset : :class:`~sklearn.utils.Bunch`
        With ``data``, uint8 images of shape ``(n, 28, 28)`` (images, not flat
        rows: :class:`~lqae_sklearn.LQAETokenizer` takes them as they are; use
        ``data.reshape(len(data), -1)`` for a pixel baseline); ``target``, int64
        labels in 0..9; ``target_names``, the class names; ``DESCR``, a
        description of the data set.
    (data, target) : tuple
        If ``return_X_y`` is True.

    Raises
    ------
    OSError
        If a file is missing and cannot be downloaded (the message names each
        URL tried and why it failed, and the three ways to provide the data), or
        if a file found on this machine does not match its checksum.

    Examples
    --------
    >>> from lqae_sklearn.datasets import fetch_fashion_mnist
    >>> X, y = fetch_fashion_mnist(subset="test", return_X_y=True)  # doctest: +SKIP
    >>> X.shape, X.dtype, y[:5]  # doctest: +SKIP
    ((10000, 28, 28), dtype('uint8'), array([9, 2, 1, 1, 6]))
    """
    if subset not in _FILES:
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
    cache = Path(get_data_home(data_home)) / "fashion_mnist"
    images, labels = (
        _load_file(spec, cache, download_if_missing, timeout) for spec in _FILES[subset]
    )
    target = labels.astype(np.int64)
    if return_X_y:
        return images, target
    return Bunch(data=images, target=target, target_names=list(FASHION_MNIST_CLASSES), DESCR=DESCR)


def load_fashion_mnist(split="train", path=None):
    """Deprecated: use :func:`fetch_fashion_mnist` with ``return_X_y=True``.

    With ``path=None`` this is ``fetch_fashion_mnist(subset=split, return_X_y=True)``
    (which may download). With a folder, it reads and checks that folder's idx
    files only; to use a folder with the fetcher, name it in ``$LQAE_FASHION_MNIST``.

    Parameters
    ----------
    split : {"train", "test"}, default="train"
        Which split.
    path : str, path-like or None, default=None
        A folder holding the split's idx files (checked against their pinned
        SHA-256), or None to fetch.

    Returns
    -------
    images : ndarray of uint8 of shape (n, 28, 28)
        The images.
    labels : ndarray of int64 of shape (n,)
        Their labels, 0..9.

    Examples
    --------
    >>> from lqae_sklearn.datasets import fetch_fashion_mnist
    >>> X, y = fetch_fashion_mnist(subset="test", return_X_y=True)  # doctest: +SKIP
    """
    warnings.warn(
        "load_fashion_mnist is deprecated and will be removed; use "
        "lqae_sklearn.datasets.fetch_fashion_mnist(subset=..., return_X_y=True)",
        FutureWarning,
        stacklevel=2,
    )
    if path is None:
        return fetch_fashion_mnist(subset=split, return_X_y=True)
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    arrays = []
    for spec in _FILES[split]:
        found = _find(Path(path), spec)
        if found is None:
            raise FileNotFoundError(f"Fashion-MNIST file {spec.name}(.gz) not found under {path}")
        arrays.append(_read_verified(found, spec))
    images, labels = arrays
    return images, labels.astype(np.int64)


def _find(folder: Path, spec: IdxFile) -> Path | None:
    """``folder``'s copy of ``spec``, gzipped or not, if it has one."""
    for name in (spec.name + ".gz", spec.name):
        if (folder / name).is_file():
            return folder / name
    return None


def _search_folders(cache: Path) -> list[Path]:
    folders = [cache]
    if os.environ.get("LQAE_FASHION_MNIST"):
        folders.append(Path(os.environ["LQAE_FASHION_MNIST"]))
    folders.append(DEBIAN_FASHION_MNIST_DIR)
    return folders


def _load_file(spec: IdxFile, cache: Path, download_if_missing: bool, timeout: float) -> np.ndarray:
    folders = _search_folders(cache)
    for folder in folders:
        found = _find(folder, spec)
        if found is not None:
            return _read_verified(found, spec)
    if not download_if_missing:
        raise OSError(
            f"Fashion-MNIST file {spec.name}(.gz) is in none of {', '.join(map(str, folders))}, "
            f"and download_if_missing=False. {_HOW_TO_PROVIDE.format(cache=cache)}"
        )
    return _read_verified(_download(spec, cache, timeout), spec)


_HOW_TO_PROVIDE = (
    "Provide it in one of three ways: (1) let fetch_fashion_mnist download it once into {cache} "
    "(needs the network; data_home= or $SCIKIT_LEARN_DATA moves that cache); (2) put the four idx "
    "files (.gz or not) in a folder and name it in $LQAE_FASHION_MNIST; (3) install Debian's package "
    "dataset-fashion-mnist, which puts them in /usr/share/datasets/fashion-mnist."
)


def _read_verified(path: Path, spec: IdxFile) -> np.ndarray:
    try:
        data = read_idx_bytes(path)
    except ValueError as exc:  # a damaged gzip stream
        raise OSError(f"{exc}. Delete or replace it.") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise OSError(
            f"{path} is not the Fashion-MNIST file {spec.name}: its contents have SHA-256 {digest}, "
            f"expected {spec.sha256}. Delete or replace it."
        )
    array = parse_idx(data, source=str(path))
    if array.shape != spec.shape:  # unreachable with the pinned digest unless a pin is edited
        raise OSError(f"{path} holds an array of shape {array.shape}, expected {spec.shape}")
    return array


def _download(spec: IdxFile, cache: Path, timeout: float) -> Path:
    """Fetch ``spec``'s ``.gz`` into ``cache`` from the first mirror that serves the pinned bytes."""
    import pooch  # imported here: only a download needs it (and requests)

    failures = []
    for mirror in FASHION_MNIST_MIRRORS:
        url = mirror + spec.name + ".gz"
        try:
            # pooch streams to a temporary file beside the target and moves it into
            # place only after the SHA-256 matches; on any failure it deletes it.
            return Path(pooch.retrieve(
                url, known_hash=f"sha256:{spec.gz_sha256}", fname=spec.name + ".gz", path=cache,
                downloader=pooch.HTTPDownloader(timeout=timeout, progressbar=False),
            ))
        except Exception as exc:  # noqa: BLE001 - each kind is named by _why; the rest re-raise
            reason = _why(exc, timeout)
            if reason is None:
                raise
            failures.append(f"{url}: {reason}")
    raise OSError(
        f"Fashion-MNIST file {spec.name}.gz is not on this machine and could not be downloaded:\n  "
        + "\n  ".join(failures)
        + "\n" + _HOW_TO_PROVIDE.format(cache=cache)
    )


def _why(exc: Exception, timeout: float) -> str | None:
    """One line saying why a download failed, or None for an error that is not a download's."""
    import requests
    from urllib3.exceptions import ReadTimeoutError

    if isinstance(exc, ValueError) and "hash" in str(exc):
        return f"checksum mismatch, the server sent other bytes than the pinned file ({exc})"
    if isinstance(exc, requests.HTTPError):
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    cause = exc.args[0] if exc.args else None
    if isinstance(exc, requests.Timeout) or isinstance(cause, ReadTimeoutError):
        return f"timed out: the server sent nothing for {timeout:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"truncated: the connection closed before the whole file arrived ({cause})"
    if isinstance(exc, requests.ConnectionError):
        return f"could not connect ({cause})"
    return None

"""Training images: where they come from and in which order they are seen.

Every source yields uint8 tensors (C, S, S) already at the model's size, so the
training loop converts to float and augments on the device, in batches. The
order is a pure function of (seed, epoch), which is what makes resuming exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lqae_sklearn._images import ImageLoadError, load_image, to_model_input
from lqae_sklearn.datasets import fetch_fashion_mnist

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class TrainingDataError(OSError):
    """Images named by ``source`` that cannot be had: Fashion-MNIST neither on this machine nor downloadable.

    An :class:`OSError`, as :func:`~lqae_sklearn.datasets.fetch_fashion_mnist`'s; its own class
    lets ``lqae-train`` tell it from any other ``OSError`` and name the option at fault.
    """

    def __init__(self, source: str, message: str):
        super().__init__(message)
        self.source = source


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, S, S)."""

    def __init__(self, images: torch.Tensor, description: dict):
        self.images = images
        self.description = description

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index]


class ImageFolder(Dataset):
    """Every image file below a folder (recursive, sorted), decoded on access."""

    def __init__(self, root, preprocessing: dict):
        self.root = Path(root)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {self.root}")
        self.preprocessing = preprocessing
        self.description = {"source": "folder", "path": str(self.root), "num_images": len(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        try:
            array = to_model_input(load_image(self.paths[index]), self.preprocessing)
        except (ImageLoadError, ValueError) as exc:
            raise ImageLoadError(self.paths[index], str(exc)) from exc
        return torch.from_numpy(np.rint(array * 255).astype(np.uint8))


def _to_uint8_nchw(array: np.ndarray, preprocessing: dict, name: str) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8/float array -> uint8 (N, C, S, S) at the model's size."""
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"{name}: expected images of shape (N, H, W) or (N, H, W, C), got {array.shape}")
    size = preprocessing["image_size"]
    channels = 1 if preprocessing["color_mode"] == "L" else 3
    if array.dtype == np.uint8 and array.shape[1:3] == (size, size):
        x = array if array.ndim == 4 else array[..., None]
        if x.shape[-1] == channels:
            return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    out = np.stack([to_model_input(img, preprocessing) for img in array])
    return torch.from_numpy(np.rint(out * 255).astype(np.uint8))


def open_training_data(source: str, preprocessing: dict, data_home=None) -> Dataset:
    """``"fashion-mnist"`` (train split), a ``.npy`` file of images, or a folder of image files.

    Fashion-MNIST comes from :func:`~lqae_sklearn.datasets.fetch_fashion_mnist`
    (``data_home`` is its cache folder).

    Parameters
    ----------
    source : str
        ``"fashion-mnist"``, a ``.npy`` path or a folder (searched recursively).
    preprocessing : dict
        The model's preprocessing (:func:`~lqae_sklearn.model.preprocessing_of`):
        every image is converted to its colour mode and size.
    data_home : str, path-like or None, default=None
        Cache folder of :func:`~lqae_sklearn.datasets.fetch_fashion_mnist`.

    Returns
    -------
    torch.utils.data.Dataset
        Items are uint8 tensors (C, S, S).

    Raises
    ------
    OSError
        If Fashion-MNIST is neither on this machine nor downloadable (the message
        says where it looked, what failed and how to provide it).

    Examples
    --------
    >>> from lqae_sklearn.model import preprocessing_of, preset_config
    >>> from lqae_sklearn.training import open_training_data
    >>> data = open_training_data("examples/fashion-mnist", preprocessing_of(preset_config("small-28")))
    >>> len(data), tuple(data[0].shape)  # doctest: +SKIP
    (20, (1, 28, 28))
    """
    if source in ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test"):
        split = "test" if source.endswith(":test") else "train"
        try:
            images, _ = fetch_fashion_mnist(subset=split, data_home=data_home, return_X_y=True)
        except OSError as exc:
            raise TrainingDataError(source, str(exc)) from exc
        desc = {"source": "fashion-mnist", "split": split, "num_images": len(images)}
        return TensorImages(_to_uint8_nchw(images, preprocessing, source), desc)
    path = Path(source)
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        return TensorImages(_to_uint8_nchw(array, preprocessing, str(path)), {"source": "npy", "path": str(path), "num_images": len(array)})
    if path.is_dir():
        return ImageFolder(path, preprocessing)
    raise ValueError(f"training data {source!r} is neither 'fashion-mnist', a .npy file, nor a folder")


class EpochOrder:
    """Which images make up micro-batch ``micro`` of step ``step`` on ``rank``.

    Each epoch is a fresh permutation drawn from ``seed + epoch``; a step takes
    ``global_batch`` consecutive images of it (the tail that does not fill a step
    is dropped), split into ``accumulation`` micro-batches per rank.

    Parameters
    ----------
    num_images : int
        Size of the data set.
    global_batch : int
        Images per optimizer step, over all processes and micro-batches.
    world_size : int
        Number of processes.
    accumulation : int
        Micro-batches per step and process.
    seed : int
        Seed of the per-epoch permutations.

    Examples
    --------
    >>> from lqae_sklearn.training import EpochOrder
    >>> order = EpochOrder(num_images=10, global_batch=4, world_size=1, accumulation=2, seed=0)
    >>> len(order.indices(step=0, micro=0, rank=0))
    2
    """

    def __init__(self, num_images: int, global_batch: int, world_size: int, accumulation: int, seed: int):
        if global_batch > num_images:
            raise ValueError(f"global batch {global_batch} is larger than the data set ({num_images} images)")
        self.num_images = num_images
        self.global_batch = global_batch
        self.world_size = world_size
        self.accumulation = accumulation
        self.micro_batch = global_batch // (world_size * accumulation)
        self.steps_per_epoch = num_images // global_batch
        self.seed = seed
        self._epoch, self._perm = None, None

    def indices(self, step: int, micro: int, rank: int) -> torch.Tensor:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_images, generator=g)
        start = offset * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        return self._perm[start : start + self.micro_batch]


class _StepBatches:
    """Index lists in (step, micro-batch) order, as a DataLoader batch sampler."""

    def __init__(self, order: EpochOrder, rank: int, start_step: int, end_step: int):
        self.order, self.rank, self.start, self.end = order, rank, start_step, end_step

    def __iter__(self):
        for step in range(self.start, self.end):
            for micro in range(self.order.accumulation):
                yield self.order.indices(step, micro, self.rank).tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * self.order.accumulation


def iterate_batches(dataset: Dataset, order: EpochOrder, rank: int, start_step: int, end_step: int, num_workers: int = 0):
    """uint8 batches (B, C, S, S) for steps ``start_step .. end_step - 1``, micro-batches in order."""
    sampler = _StepBatches(order, rank, start_step, end_step)
    if isinstance(dataset, TensorImages):
        # In-memory images: plain indexing beats any loader.
        return (dataset.images[torch.as_tensor(idx)] for idx in sampler)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0))

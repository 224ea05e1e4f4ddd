"""Shared fixtures: the embedded MiniLM (loaded once), real Fashion-MNIST images, tiny model configs.

Images come only from the subset shipped in ``tests/data/fashion-mnist`` (1,000
train and 500 test images): no test may depend on data that a fresh machine lacks.

Fixture names are specific on purpose: other test modules define their own
``checkpoint``/``images`` fixtures, which must keep winning in their modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lqae_sklearn import FrozenLanguageModel, preset_config
from lqae_sklearn.datasets import _fashion_mnist, read_idx

#: The shipped Fashion-MNIST subset: gzipped idx files with the official names.
FASHION_MNIST_SUBSET = Path(__file__).parent / "data" / "fashion-mnist"


def fashion_mnist_subset(subset: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) uint8 and labels (n,) int64 of the shipped subset ("train": 1,000; "test": 500)."""
    stem = "train" if subset == "train" else "t10k"
    images = read_idx(FASHION_MNIST_SUBSET / f"{stem}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_SUBSET / f"{stem}-labels-idx1-ubyte.gz")
    return images, labels.astype(np.int64)


@pytest.fixture(scope="session", autouse=True)
def no_machine_datasets(tmp_path_factory):
    """Hide every Fashion-MNIST copy this machine may hold, so that a test that reaches for one fails here
    as it would on a fresh machine: empty cache and $LQAE_FASHION_MNIST, no Debian folder, no mirrors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCIKIT_LEARN_DATA", str(tmp_path_factory.mktemp("scikit_learn_data")))
        mp.setenv("LQAE_FASHION_MNIST", str(tmp_path_factory.mktemp("lqae_fashion_mnist")))
        mp.setattr(_fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path_factory.mktemp("no_debian_dataset"))
        mp.setattr(_fashion_mnist, "FASHION_MNIST_MIRRORS", [])
        yield

#: Encoder/decoder small enough for CPU tests; patch 7 gives 4 x 4 = 16 tokens per 28 px image.
TINY_OVERRIDES = dict(
    encoder_dim=64, encoder_depth=1, encoder_heads=2,
    decoder_dim=64, decoder_depth=1, decoder_heads=2,
    patch_size=7,
)


def tiny_config(**overrides):
    """The small-28 preset shrunk to :data:`TINY_OVERRIDES` (plus ``overrides``)."""
    return preset_config("small-28", **{**TINY_OVERRIDES, **overrides})


@pytest.fixture(scope="session")
def minilm() -> FrozenLanguageModel:
    """The embedded all-MiniLM-L6-v2, shared by every test that needs the real LM (it is frozen)."""
    return FrozenLanguageModel.from_pretrained()


@pytest.fixture(scope="session")
def fmnist_uint8() -> np.ndarray:
    """The first 256 Fashion-MNIST training images, uint8 (256, 28, 28)."""
    images, _ = fashion_mnist_subset("train")
    return np.ascontiguousarray(images[:256])


@pytest.fixture(scope="session")
def fmnist_batch(fmnist_uint8) -> torch.Tensor:
    """Sixteen real images as model input: float32 (16, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(fmnist_uint8[:16].astype(np.float32) / 255.0).unsqueeze(1)

"""Shared fixtures: the embedded MiniLM (loaded once), real Fashion-MNIST images, tiny model configs.

Fixture names are specific on purpose: other test modules define their own
``checkpoint``/``images`` fixtures, which must keep winning in their modules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lqae_sklearn import FrozenLanguageModel, preset_config
from lqae_sklearn.datasets import load_fashion_mnist

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
    images, _ = load_fashion_mnist("train")
    return np.ascontiguousarray(images[:256])


@pytest.fixture(scope="session")
def fmnist_batch(fmnist_uint8) -> torch.Tensor:
    """Sixteen real images as model input: float32 (16, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(fmnist_uint8[:16].astype(np.float32) / 255.0).unsqueeze(1)

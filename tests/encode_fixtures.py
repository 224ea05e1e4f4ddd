"""Fixtures the encoding test modules share (``pytest_plugins = ("encode_fixtures",)``).

A plugin rather than imports of fixture functions from another test module, which
would redefine their names (F811) in every module that takes them as arguments.
"""

import pytest
from PIL import Image

from conftest import fashion_mnist_subset
from lqae_sklearn.model import DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The packaged checkpoint, or (until it ships) an untrained one of the same shape."""
    if DEFAULT_CHECKPOINT.exists():
        return str(DEFAULT_CHECKPOINT)
    path = tmp_path_factory.getbasetemp() / "lqae-random-small-28"
    if not path.exists():
        import torch

        from lqae_sklearn import LQAE, preset_config, save_checkpoint

        torch.manual_seed(0)
        save_checkpoint(LQAE(preset_config("small-28")).eval(), path)
    return str(path)


@pytest.fixture(scope="session")
def fashion():
    images, labels = fashion_mnist_subset("test")
    return images[:300], labels[:300]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, fashion):
    images, labels = fashion
    root = tmp_path_factory.mktemp("corpus") / "images"
    for i in range(120):
        folder = root / f"class{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    return root

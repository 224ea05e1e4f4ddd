"""Data sets, fetched as scikit-learn's are: :func:`fetch_fashion_mnist` and the idx reader."""

from ._fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MIRRORS,
    fetch_fashion_mnist,
    load_fashion_mnist,
)
from ._idx import read_idx

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MIRRORS",
    "fetch_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

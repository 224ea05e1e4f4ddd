"""Training of the Language Quantized AutoEncoder (console script ``lqae-train``).

>>> from lqae_sklearn.training import TrainConfig, train
>>> train(TrainConfig(out_dir="runs/fmnist", steps=300))  # doctest: +SKIP
"""

from ._augment import random_resized_crop
from ._data import EpochOrder, open_training_data
from ._trainer import ResumeError, TrainConfig, evaluate, train

__all__ = ["EpochOrder", "ResumeError", "TrainConfig", "evaluate", "open_training_data", "random_resized_crop", "train"]

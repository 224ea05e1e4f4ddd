"""The figures of an evaluation: reconstruction PSNR (two definitions), codebook use, converged linear probes.

PSNR is for pixels in [0, 1], and it is averaged in one of two ways that differ by
about half a dB on Fashion-MNIST, so each figure names its definition:

- ``psnr_mean_per_image_db``: the mean over images of ``10 log10(1 / MSE_i)``;
- ``psnr_dataset_db``: ``10 log10(1 / mean MSE)``, the PSNR of all pixels at once
  (what ``lqae-train`` logs).

Codebook usage and perplexity use ``lqae-train``'s definitions (its ``metrics.jsonl``).
"""

from __future__ import annotations

import time
import warnings

import numpy as np


def reconstruction_figures(per_image_mse: np.ndarray) -> dict:
    """Both PSNRs from the per-image mean squared errors (pixels in [0, 1])."""
    from lqae_sklearn.training._report import psnr

    per_image_mse = np.asarray(per_image_mse, dtype=np.float64)
    return {"psnr_mean_per_image_db": float(np.mean([psnr(m) for m in per_image_mse])),
            "psnr_dataset_db": psnr(float(per_image_mse.mean()))}


def per_image_mse(reconstructions: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Mean squared error of each image, in float64."""
    difference = reconstructions.astype(np.float64) - pixels.astype(np.float64)
    return (difference ** 2).reshape(len(pixels), -1).mean(axis=1)


def code_figures(ids: np.ndarray, codebook_size: int) -> dict:
    """Distinct ids, usage (distinct / codebook size) and perplexity (exp of the ids' entropy)."""
    import torch

    from lqae_sklearn.training._report import code_statistics

    counts = torch.from_numpy(np.bincount(np.asarray(ids).ravel(), minlength=codebook_size))
    return {"codebook_size": int(codebook_size), "distinct_tokens": int((counts > 0).sum()),
            **code_statistics(counts, codebook_size)}


def fit_probe(train, y_train, test, y_test, *, C: float, max_iter: int, scale: bool = True) -> dict:
    """LogisticRegression (lbfgs, to convergence or ``max_iter``), after a StandardScaler if ``scale``.

    Returns the test accuracy, the feature width, lbfgs's iterations, whether the
    fit converged (no ConvergenceWarning and the cap not reached) and whether it
    stopped at the cap.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = LogisticRegression(C=C, max_iter=max_iter)
    model = make_pipeline(StandardScaler(), classifier) if scale else classifier
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(train, y_train)
    iterations = int(np.max(classifier.n_iter_))
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"accuracy": float(model.score(test, y_test)), "width": int(train.shape[1]),
            "scaler": "StandardScaler" if scale else "none", "iterations": iterations,
            "converged": not warned and iterations < max_iter, "hit_cap": iterations >= max_iter,
            "fit_seconds": round(time.perf_counter() - start, 1)}


def one_hot_tokens(ids: np.ndarray, codebook_size: int):
    """Sparse one-hot of (position, token): column ``position * codebook_size + token`` (N, T * K)."""
    from scipy.sparse import csr_matrix

    n, t = ids.shape
    columns = (np.arange(t)[None, :] * codebook_size + ids).ravel()
    return csr_matrix((np.ones(n * t, dtype=np.float64), columns, np.arange(0, n * t + 1, t)),
                      shape=(n, t * codebook_size))

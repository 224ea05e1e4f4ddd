"""Training-free tokenizers at a checkpoint's grid: what a learned tokenizer must beat.

- **k-means patch tokens**: cut every image into the checkpoint's patches (the
  same ``patch x patch`` squares its encoder reads), fit ``MiniBatchKMeans`` on a
  seeded random sample of training patches, and write each patch as the index of
  its nearest centre: ``grid x grid`` tokens from a codebook of K patches, decoded
  by pasting the centres back.
- **PCA**: as many continuous coefficients as the checkpoint has tokens, fitted on
  the training images; reconstructions are clipped to [0, 1], as the checkpoint's
  decoder output is.

Pixels are floats in [0, 1] of shape ``(N, C, S, S)`` throughout.
"""

from __future__ import annotations

import numpy as np


def to_patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(N, C, S, S) -> (N, grid * grid, C * patch * patch), patches row-major over the grid."""
    n, c, s, _ = pixels.shape
    g = s // patch
    blocks = pixels.reshape(n, c, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5)
    return blocks.reshape(n, g * g, c * patch * patch)


def from_patches(patches: np.ndarray, channels: int, patch: int) -> np.ndarray:
    """Inverse of :func:`to_patches`."""
    n, t, _ = patches.shape
    g = int(round(t ** 0.5))
    blocks = patches.reshape(n, g, g, channels, patch, patch).transpose(0, 3, 1, 4, 2, 5)
    return blocks.reshape(n, channels, g * patch, g * patch)


def sample_patches(pixels: np.ndarray, patch: int, limit: int, seed: int) -> tuple[np.ndarray, int]:
    """Up to ``limit`` training patches (rows), and how many there were.

    All of them, in order, when there are no more than ``limit``; else a seeded
    random choice without replacement, in order.
    """
    patches = to_patches(pixels, patch)
    patches = patches.reshape(-1, patches.shape[-1])
    available = len(patches)
    if available > limit:
        patches = patches[np.sort(np.random.default_rng(seed).choice(available, limit, replace=False))]
    return np.ascontiguousarray(patches, dtype=np.float32), available


class PatchKMeans:
    """k-means over patches: ``fit`` on sampled patch rows, then ``tokens`` and ``reconstruct`` whole images.

    ``MiniBatchKMeans(K, batch_size=16384, n_init=1, max_iter=20, random_state=seed)``;
    K is capped at the number of training patches (recorded as ``n_clusters``).
    """

    def __init__(self, n_clusters: int, patch: int, seed: int):
        self.requested = n_clusters
        self.patch = patch
        self.seed = seed

    def fit(self, patches: np.ndarray) -> PatchKMeans:
        from sklearn.cluster import MiniBatchKMeans

        self.n_clusters = min(self.requested, len(patches))
        self.kmeans = MiniBatchKMeans(self.n_clusters, batch_size=16384, n_init=1, max_iter=20,
                                      random_state=self.seed).fit(patches)
        self.centers = self.kmeans.cluster_centers_.astype(np.float32)
        return self

    def tokens(self, pixels: np.ndarray) -> np.ndarray:
        """(N, C, S, S) -> int64 (N, grid * grid): the nearest centre of each patch."""
        patches = to_patches(pixels, self.patch)
        flat = patches.reshape(-1, patches.shape[-1]).astype(np.float32)
        return self.kmeans.predict(flat).astype(np.int64).reshape(len(pixels), -1)

    def reconstruct(self, tokens: np.ndarray, channels: int) -> np.ndarray:
        return from_patches(self.centers[tokens], channels, self.patch)


def pca_baseline(train_pixels: np.ndarray, n_components: int, seed: int):
    """A fitted ``PCA(n_components)`` of the flattened training images (capped at what the data allows)."""
    from sklearn.decomposition import PCA

    flat = train_pixels.reshape(len(train_pixels), -1)
    n_components = min(n_components, *flat.shape)
    return PCA(n_components, random_state=seed).fit(flat)


def pca_reconstruct(pca, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients (N, n_components), reconstructions (N, C, S, S) clipped to [0, 1])."""
    flat = pixels.reshape(len(pixels), -1)
    coefficients = pca.transform(flat)
    return coefficients, np.clip(pca.inverse_transform(coefficients), 0.0, 1.0).reshape(pixels.shape)

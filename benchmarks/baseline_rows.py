"""lqae-eval's training-free baseline rows on all of Fashion-MNIST, without encoding through a checkpoint.

A full ``lqae-eval`` spends most of its hour encoding 70,000 images through the
checkpoint and its LM; the baseline rows (PCA, k-means patch tokens, the pixel and
one-hot probes) need none of it. This script computes them with the functions
``evaluate_checkpoint`` calls, in the same order and with the same seeds, at the
full size (60,000 train / 10,000 test images, 1,000,000 k-means patches), at the
shipped checkpoint's grid (patch 4, 7 x 7 tokens). ``--kmeans-seeds`` adds the
K = 1,024 reconstruction refitted with other seeds (sample and fit), to show how
much that row moves from seed to seed.

    OMP_NUM_THREADS=1 python benchmarks/baseline_rows.py --kmeans-seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lqae_sklearn._loading import resolve_checkpoint
from lqae_sklearn.evaluation._baselines import PatchKMeans, pca_baseline, pca_reconstruct, sample_patches
from lqae_sklearn.evaluation._data import load_splits
from lqae_sklearn.evaluation._metrics import (
    code_figures,
    fit_probe,
    one_hot_tokens,
    per_image_mse,
    reconstruction_figures,
)
from lqae_sklearn.model import read_checkpoint_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kmeans-seeds", type=int, nargs="*", default=[], help="other seeds for K = 1,024")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    config = read_checkpoint_config(resolve_checkpoint("fashion-mnist-small-28"))
    patch = config["model"]["patch_size"]
    tokens_per_image = (config["model"]["image_size"] // patch) ** 2
    splits = load_splits("fashion-mnist", None, config["preprocessing"], test_fraction=0.2, n_train=None,
                         n_test=None, seed=args.seed)
    train, test = (x.astype(np.float32) / 255.0 for x in (splits.train_images, splits.test_images))
    y_train, y_test = splits.train_labels, splits.test_labels
    flat = lambda pixels: pixels.reshape(len(pixels), -1)  # noqa: E731
    rows = {"train_images": len(train), "test_images": len(test)}

    pca = pca_baseline(train, tokens_per_image, args.seed)
    pca_train, _ = pca_reconstruct(pca, train)
    pca_test, reconstructions = pca_reconstruct(pca, test)
    rows["pca"] = reconstruction_figures(per_image_mse(reconstructions, test))
    unclipped = pca.inverse_transform(pca_test).reshape(test.shape)
    rows["pca_unclipped"] = reconstruction_figures(per_image_mse(unclipped, test))

    patches, _ = sample_patches(train, patch, 1_000_000, args.seed)
    for k in (1024, 4096):
        kmeans = PatchKMeans(k, patch, args.seed).fit(patches)
        test_tokens = kmeans.tokens(test)
        rows[f"kmeans_{k}"] = {**reconstruction_figures(per_image_mse(kmeans.reconstruct(test_tokens, 1), test)),
                               **code_figures(test_tokens, k), "minibatch_steps": int(kmeans.kmeans.n_steps_)}
        if k == 1024:
            rows["probe_kmeans_1024_one_hot"] = fit_probe(
                one_hot_tokens(kmeans.tokens(train), k), y_train, one_hot_tokens(test_tokens, k), y_test, C=0.1,
                max_iter=5000, scale=False)
    rows["probe_raw_pixels"] = fit_probe(flat(train), y_train, flat(test), y_test, C=0.1, max_iter=5000)
    rows["probe_pca"] = fit_probe(pca_train, y_train, pca_test, y_test, C=0.1, max_iter=5000)
    for seed in args.kmeans_seeds:
        kmeans = PatchKMeans(1024, patch, seed).fit(sample_patches(train, patch, 1_000_000, seed)[0])
        rows[f"kmeans_1024_seed{seed}"] = {
            **reconstruction_figures(per_image_mse(kmeans.reconstruct(kmeans.tokens(test), 1), test)),
            "minibatch_steps": int(kmeans.kmeans.n_steps_)}
    rows["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Reconstruction quality of a checkpoint on the Fashion-MNIST test split.

Reports PSNR over all pixels (pixels in [0, 1], no masking, as at inference),
codebook usage and perplexity of the token ids, and writes a PNG of originals
(top row) over reconstructions (bottom row).

    python benchmarks/reconstruction.py --out docs/img/reconstructions.png
"""

from __future__ import annotations

import argparse
import json

import torch

from lqae_sklearn import load_checkpoint
from lqae_sklearn.model import DEFAULT_CHECKPOINT
from lqae_sklearn.datasets import fetch_fashion_mnist
from lqae_sklearn.training._report import code_statistics, psnr, save_grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", default=None, help="PNG grid of the first 16 test images")
    args = parser.parse_args(argv)

    model = load_checkpoint(args.checkpoint)
    images, _ = fetch_fashion_mnist(subset="test", return_X_y=True)
    images = torch.from_numpy(images[: args.limit]).float().div(255).unsqueeze(1)
    squared_error = 0.0
    counts = torch.zeros(model.language_model.vocab_size)
    first = None
    with torch.inference_mode():
        for start in range(0, len(images), args.batch_size):
            x = images[start : start + args.batch_size]
            ids = model.encode(x)
            recon = model.decode(ids)
            squared_error += float(((recon - x) ** 2).sum())
            counts += torch.bincount(ids.flatten(), minlength=counts.numel())
            if first is None:
                first = recon[:16]
    result = {"test_images": len(images), "psnr_db": psnr(squared_error / images.numel()),
              **code_statistics(counts, model.quantizer.codebook_size),
              "distinct_tokens": int((counts > 0).sum()), "codebook_size": model.quantizer.codebook_size}
    print(json.dumps(result))
    if args.out:
        from pathlib import Path

        save_grid(images[:16], first, Path(args.out))


if __name__ == "__main__":
    main()

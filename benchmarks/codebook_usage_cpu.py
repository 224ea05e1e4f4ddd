"""Codebook usage after a short CPU training of tiny models: a hint of what each usage option does.

Trains each named run on the 1,000 Fashion-MNIST training images shipped in tests/data (tiny model: width 64,
depth 1, patch 7 = 16 tokens), then reads the held-out figures on the 500 test images there from its metrics.jsonl.

    python benchmarks/codebook_usage_cpu.py --steps 300 --batch-size 32 --out /tmp/usage \\
        vq=small-28-vqvae vqr=small-28-vqvae-restarts lqae=small-28 proj32=small-28:search_dim=32 \\
        simvq=small-28:codebook_map=true

A run is NAME=PRESET[:FIELD=VALUE,...]; one JSON line per run on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import TINY_OVERRIDES, fashion_mnist_subset  # noqa: E402

from lqae_sklearn.training import TrainConfig, train  # noqa: E402
from lqae_sklearn.training.cli import _parse_settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="NAME=PRESET[:FIELD=VALUE,...]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/codebook-usage"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        np.save(args.out / f"{split}.npy", fashion_mnist_subset(split)[0])
    for run in args.runs:
        name, _, spec = run.partition("=")
        preset, _, fields = spec.partition(":")
        overrides = {**TINY_OVERRIDES, **_parse_settings([f for f in fields.split(",") if f])}
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        train(TrainConfig(
            out_dir=str(out), preset=preset, model_overrides=overrides, data=str(args.out / "train.npy"),
            eval_data=str(args.out / "test.npy"), eval_images=500, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, crop_scale=(0.5, 1.0), save_every=args.steps, log_every=max(1, args.steps // 4),
            device="cpu", progress=False,
        ))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in records if "eval_psnr" in r][-1]
        print(json.dumps({
            "run": name, "spec": spec, "seconds": round(time.perf_counter() - start, 1),
            "train_usage": [round(r["codebook_usage"], 4) for r in records if "loss" in r],
            "test_psnr": round(final["eval_psnr"], 2), "test_usage": round(final["eval_codebook_usage"], 4),
            "test_perplexity": round(final["eval_perplexity"], 1),
        }), flush=True)


if __name__ == "__main__":
    main()

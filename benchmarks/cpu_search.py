"""CPU encoding to ids: the exact float32 nearest-word search against bf16 + float32 rescoring.

Measured in one run, on ``--threads`` CPU threads (2 by default, the target machine), with the
shipped checkpoint on every Fashion-MNIST test image (10,000; uint8 in, int64 ids out, batch 256):

- the bf16 and float32 matmul rates of this CPU (512 x 384 x 8192, the search's shape);
- images/s of ``LQAETokenizer.transform`` with each search (``LQAE_CPU_SEARCH=float32``: the search
  every CPU used before; ``=bf16``), in alternating rounds so drift hits both alike;
- how many of the 490,000 ids the two searches agree on (the rescored search is not exact by
  construction; see ``lqae_sklearn/model/_quantizer.py``);
- which one ``LQAE_CPU_SEARCH=auto`` picks here (``cpu_bf16_is_faster``); the default is float32.

    python benchmarks/cpu_search.py --out docs/results/cpu_search.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.datasets import fetch_fashion_mnist
from lqae_sklearn.model import _quantizer


def matmul_rate(dtype, repeats: int = 5) -> float:
    a, b = torch.randn(512, 384).to(dtype), torch.randn(384, 8192).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 512 * 384 * 8192 / statistics.median(times)


def encode(tok: LQAETokenizer, images: np.ndarray, search: str) -> tuple[np.ndarray, float]:
    os.environ["LQAE_CPU_SEARCH"] = search
    _quantizer.cpu_bf16_search.cache_clear()
    start = time.perf_counter()
    ids = tok.transform(images)
    return ids, len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, _ = fetch_fashion_mnist(subset="test", return_X_y=True)
    images = images[: args.images]
    tok = LQAETokenizer(output="ids", batch_size=256, device="cpu").fit(images)
    encode(tok, images[:512], "float32")  # warm up both paths
    encode(tok, images[:512], "bf16")

    rates = {"float32": [], "bf16": []}
    ids = {}
    for _ in range(args.rounds):
        for search in ("float32", "bf16"):
            ids[search], rate = encode(tok, images, search)
            rates[search].append(rate)
    os.environ.pop("LQAE_CPU_SEARCH")
    _quantizer.cpu_bf16_search.cache_clear()
    chosen = "bf16" if _quantizer.cpu_bf16_is_faster() else "float32"  # what LQAE_CPU_SEARCH=auto picks here

    median = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "command": "python benchmarks/cpu_search.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                    "torch": torch.__version__},
        "matmul_gflops": {"float32": matmul_rate(torch.float32) / 1e9, "bf16": matmul_rate(torch.bfloat16) / 1e9},
        "images": len(images),
        "images_per_s": median,
        "rounds": rates,
        "speedup_bf16_over_float32": median["bf16"] / median["float32"],
        "ids_equal": int((ids["float32"] == ids["bf16"]).sum()),
        "ids_total": int(ids["float32"].size),
        "auto_choice_here": chosen,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

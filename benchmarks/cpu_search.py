"""CPU nearest-word search: the float32 search against the int8 one, both exact (``model/_search.py``).

One command, one run, on ``--threads`` CPU threads (2 by default, the target machine), with the
shipped checkpoint:

1. **lqae-encode throughput.** ``lqae-encode -o ids`` on ``--images`` Fashion-MNIST test images
   written as PNG files, with ``LQAE_CPU_SEARCH=float32`` (the float32 search, the only one a CPU
   used before) and with the default ``auto`` (int8 where this CPU's measurement says so), in
   alternating rounds so that drift hits both alike. *Steady* images/s: each round also encodes
   256 images, and the rate is ``(images - 256) / (t(images) - t(256))``, so start-up (imports,
   model load, the one-off int8 measurement and codebook) is left out. The CLI runs with its
   defaults otherwise (batch 64, one decoding worker).
2. **Identical ids** on all 70,000 Fashion-MNIST images (train + test; ``--ids-images`` fewer):
   ``LQAETokenizer.transform`` with the search ``auto`` picks, and on the very same encoder outputs
   the float32 search; every id is compared. Also counted: how many ids the float32 argmax used
   before this search (reproduced here) would have given differently, each being a float32
   near-tie that the exact search settles.
3. **The search alone** on 4,096 encoder outputs: seconds of the pre-change float32 argmax, the
   exact float32 search and the exact int8 search, and the int8 and float32 product rates
   (256 x 384 x 29,523) with the int8 kernel's exactness check.

    python benchmarks/cpu_search.py --out docs/results/cpu_search_int8.json
    python benchmarks/cpu_search.py --rounds 1 --images 1024 --ids-images 2000   # a short look
    python benchmarks/cpu_search.py --ids-only                                  # part 2 alone, all 70,000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.datasets import fetch_fashion_mnist
from lqae_sklearn.model import _quantizer, _search

WARM_IMAGES = 256


def write_pngs(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def run_encode(folder: Path, out: Path, search: str, threads: int) -> float:
    """Seconds of one ``lqae-encode`` process, from start to exit."""
    env = {**os.environ, "LQAE_CPU_SEARCH": search, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [str(Path(sys.executable).with_name("lqae-encode")), str(folder), str(out), "-o", "ids",
               "--device", "cpu", "--overwrite", "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def encode_throughput(images: np.ndarray, rounds: int, threads: int) -> dict:
    seconds = {"float32": {"warm": [], "full": []}, "auto": {"warm": [], "full": []}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_pngs(images[:WARM_IMAGES], tmp / "warm")
        write_pngs(images, tmp / "full")
        for _ in range(rounds):
            for search in ("float32", "auto"):
                for size in ("warm", "full"):
                    seconds[search][size].append(run_encode(tmp / size, tmp / f"{search}-{size}.jsonl", search, threads))
    steady = {search: [(len(images) - WARM_IMAGES) / (full - warm) for warm, full in zip(s["warm"], s["full"])]
              for search, s in seconds.items()}
    median = {search: statistics.median(rates) for search, rates in steady.items()}
    return {"images": len(images), "warm_images": WARM_IMAGES, "seconds": seconds, "steady_images_per_s": steady,
            "median_steady_images_per_s": median, "speedup_auto_over_float32": median["auto"] / median["float32"]}


def float32_argmax(flat: torch.Tensor, rows: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """The CPU search before the exact one: float32 scores, argmax (lowest row on float32 ties)."""
    best = torch.full((flat.shape[0],), -torch.inf)
    best_row = torch.zeros(flat.shape[0], dtype=torch.long)
    for start in range(0, rows.shape[0], chunk):
        value, row = (flat @ rows[start : start + chunk].T).max(dim=1)
        better = value > best
        best, best_row = torch.where(better, value, best), torch.where(better, row + start, best_row)
    return best_row


def identical_ids(images: np.ndarray, threads: int) -> dict:
    """ids of the ``auto`` search against the float32 search on the same encoder outputs."""
    os.environ.pop("LQAE_CPU_SEARCH", None)
    _quantizer.cpu_search.cache_clear()
    tok = LQAETokenizer(output="ids", batch_size=256, device="cpu").fit()
    quantizer = tok.model_.quantizer
    search = quantizer._exact_search()
    real_nearest = quantizer.nearest
    counts = {"float32_search": 0, "pre_change_argmax": 0}

    def both(x):
        ids = real_nearest(x)
        flat = F.normalize(x.reshape(-1, x.shape[-1]).float(), dim=-1)
        exact = quantizer.allowed_ids[search.nearest(flat, "float32")]
        argmax = quantizer.allowed_ids[float32_argmax(flat, quantizer.normed)]
        counts["float32_search"] += int((exact != ids.reshape(-1)).sum())
        counts["pre_change_argmax"] += int((argmax != ids.reshape(-1)).sum())
        return ids

    quantizer.nearest = both
    start = time.perf_counter()
    ids = tok.transform(images)
    del quantizer.nearest
    return {"images": len(images), "ids": int(ids.size), "search_auto_picks": _quantizer.cpu_search(),
            "ids_differing_float32_search_vs_auto": counts["float32_search"],
            "ids_differing_pre_change_float32_argmax_vs_auto": counts["pre_change_argmax"],
            "seconds": time.perf_counter() - start}


def timed(run, repeats: int = 3) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def search_alone(images: np.ndarray) -> dict:
    tok = LQAETokenizer(output="ids", batch_size=256, device="cpu").fit()
    quantizer = tok.model_.quantizer
    latents = []
    real_nearest = quantizer.nearest
    quantizer.nearest = lambda x: latents.append(x) or real_nearest(x)
    tok.transform(images)
    del quantizer.nearest
    flat = F.normalize(torch.cat([z.reshape(-1, z.shape[-1]) for z in latents])[:4096].float(), dim=-1)
    rows, search = quantizer.normed, quantizer._exact_search()
    seconds = {"pre_change_float32_argmax": timed(lambda: float32_argmax(flat, rows)),
               "float32_search": timed(lambda: search.nearest(flat, "float32")),
               "int8_search": timed(lambda: search.nearest(flat, "int8"))}
    codebook = search._int8
    queries = flat[:256]
    product = 2 * 256 * rows.shape[1] * rows.shape[0]
    return {"queries": flat.shape[0], "seconds": seconds,
            "speedup_int8_over_pre_change": seconds["pre_change_float32_argmax"] / seconds["int8_search"],
            "product_gops": {"float32": product / timed(lambda: queries @ rows.T) / 1e9,
                             "int8": product / timed(lambda: codebook.scores(queries)) / 1e9}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=4096, help="test images per lqae-encode run")
    parser.add_argument("--ids-images", type=int, default=70_000, help="images whose ids are compared (70,000: all)")
    parser.add_argument("--ids-only", action="store_true", help="only part 2, the ids (for all 70,000: ~32 min)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    test, _ = fetch_fashion_mnist(subset="test", return_X_y=True)
    train, _ = fetch_fashion_mnist(subset="train", return_X_y=True)
    test, train = test.reshape(-1, 28, 28), train.reshape(-1, 28, 28)
    result = {
        "command": "python benchmarks/cpu_search.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                 for k, v in vars(args).items() if v),
        "machine": {"cpu": torch.cpu.get_capabilities().get("cpu_name") or platform.machine(),
                    "capability": torch.backends.cpu.get_cpu_capability(), "vnni": torch.cpu._is_vnni_supported(),
                    "threads": args.threads, "torch": torch.__version__,
                    "load_average_at_start": os.getloadavg()},
        "int8_kernel_is_exact": _search.int8_kernel_is_exact(),
        "auto_picks_int8_here": _search.cpu_int8_is_faster(),
    }
    if not args.ids_only:
        result["lqae_encode"] = encode_throughput(test[: args.images], args.rounds, args.threads)
        result["search_alone"] = search_alone(test[:100])
    result["identical_ids"] = identical_ids(np.concatenate([train, test])[: args.ids_images], args.threads)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

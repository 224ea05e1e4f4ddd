"""lqae-encode's engines on one machine: local vs Ray with 1 and 2 CPU actors, in one run.

For each engine the same corpus of Fashion-MNIST PNGs is encoded to Parquet by a
separate ``lqae-encode`` process, and this script records:

- wall time of the whole command (start-up, model loading and Ray's actor start-up
  included) and images/s over it;
- steady-state images/s: rows committed after the first part divided by the time
  between the first and the last part's commit (from the parts' modification times);
- peak resident memory of each encoder process (the ``lqae-encode`` process for the
  local engine, each ``PartEncoder`` actor for Ray), sampled every 50 ms.

Ray runs against one cluster started here (``ray.init(num_cpus=--ray-cpus)``), so its
start-up is not charged to the engine; logical CPUs above the physical count are
oversubscription, which the report states.

A decode microbenchmark rounds it off, for the multi-GPU plan in docs/benchmarks.md:
``decode_file`` on RGB JPEGs of ImageNet's typical size (500 x 375) to 256 x 256,
images/s on one core.

    python benchmarks/encode_engines.py --images 4000 --out docs/results/encode_engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENCODE = [sys.executable, "-m", "lqae_sklearn.cli.encode"]


def write_corpus(folder: Path, count: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import fashion_mnist_subset  # the shipped 1,500-image subset; no download

    images = np.concatenate([fashion_mnist_subset("train")[0], fashion_mnist_subset("test")[0]])
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(sub / f"{i:06d}.png")


def rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def encoder_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"PartEncoder" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def run_engine(name: str, args: list[str], corpus: Path, out: Path, count: int) -> dict:
    peaks: dict[int, int] = {}
    earlier = set(encoder_pids())  # a previous run's actors may take a moment to exit
    done = threading.Event()
    start = time.monotonic()
    process = subprocess.Popen(ENCODE + [str(corpus), f"{out}/", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)

    def sample():
        while not done.is_set():
            pids = [p for p in encoder_pids() if p not in earlier] if "ray" in name else [process.pid]
            for pid in pids:
                peaks[pid] = max(peaks.get(pid, 0), rss_of(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{name} failed: {stderr.decode()}")
    parts = sorted(out.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    import pyarrow.parquet as pq

    rows = [pq.read_metadata(p).num_rows for p in parts]
    assert sum(rows) == count, (name, sum(rows))
    span = parts[-1].stat().st_mtime - parts[0].stat().st_mtime
    return {
        "engine": name, "args": args, "wall_s": round(wall, 2), "images_per_s_wall": round(count / wall, 1),
        "images_per_s_steady": round(sum(rows[1:]) / span, 1) if span > 0 else None,
        "parts": len(parts), "peak_rss_mib_per_encoder": sorted(round(v / 2**20) for v in peaks.values() if v),
    }


def decode_rate(seconds: float = 5.0) -> dict:
    from lqae_sklearn.encoding._decode import decode_file

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(16):  # smooth content with noise, so the JPEGs have realistic entropy
            base = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((500, 375))
            noisy = np.clip(np.asarray(base, np.int16) + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
            path = os.path.join(tmp, f"{i}.jpg")
            Image.fromarray(noisy).save(path, quality=90)
            paths.append(path)
        preprocessing = {"image_size": 256, "color_mode": "RGB", "resample": "bilinear"}
        count, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            array, reason = decode_file(paths[count % len(paths)], preprocessing)
            assert reason is None
            count += 1
        elapsed = time.monotonic() - start
        sizes = [os.path.getsize(p) for p in paths]
    return {"jpeg": "500x375 RGB, quality 90", "mean_bytes": int(np.mean(sizes)), "to": "256x256 RGB uint8",
            "images_per_s_one_core": round(count / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--part-size", type=int, default=256)
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import ray

    load_before = os.getloadavg()  # other work on the machine skews the ratios: it is reported
    work = Path(tempfile.mkdtemp(prefix="encode-engines-"))
    try:
        corpus = work / "images"
        write_corpus(corpus, args.images)
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        common = ["--part-size", str(args.part_size), "--batch-size", "64"]
        engines = [
            ("local (-j 1)", common + ["-j", "1"]),
            ("ray, 1 actor", common + ["--engine", "ray", "--ray-address", address, "--actors", "1"]),
            ("ray, 2 actors", common + ["--engine", "ray", "--ray-address", address, "--actors", "2"]),
        ]
        results = [run_engine(name, extra, corpus, work / f"out{i}", args.images)
                   for i, (name, extra) in enumerate(engines)]
        ray.shutdown()
        local = results[0]
        for result in results:
            result["wall_ratio_to_local"] = round(result["images_per_s_wall"] / local["images_per_s_wall"], 2)
            if result["images_per_s_steady"] and local["images_per_s_steady"]:
                result["steady_ratio_to_local"] = round(
                    result["images_per_s_steady"] / local["images_per_s_steady"], 2)
        report = {"load_average_before": load_before, "load_average_after": os.getloadavg(), "images": args.images, "part_size": args.part_size, "cpu_cores": os.cpu_count(),
                  "ray_logical_cpus": args.ray_cpus, "engines": results, "decode": decode_rate()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

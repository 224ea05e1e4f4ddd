"""Peak memory of ``lqae-encode`` on 10k vs 100k small images: it should stay flat.

Writes a synthetic corpus of 28x28 grayscale PNGs (Fashion-MNIST training images
with a per-file pixel shift, so files differ) in folders of 1,000, then runs
``lqae-encode`` as a subprocess on the first ``n // 1000`` folders for each
``--images n``, polling ``/proc`` for the resident memory of the process tree
(the main process plus its decoding workers). Results go to stdout as JSON.

``--resume-scale N`` adds one more run over a corpus of N files of which all but
the last 1,000 are already in OUT (synthetic records, as a resumed run would
find them): it measures, at full scale, everything that grows with the number
of files (path list, sorting, the set of done paths) while encoding only 1,000
images, for machines where encoding N images on the CPU would take hours.

Usage::

    python benchmarks/encode_memory.py --checkpoint PATH --images 1000 10000 \\
        --resume-scale 100000 --workdir /tmp/lqae-mem --out /tmp/encode_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PER_FOLDER = 1000


def make_corpus(root: Path, n_images: int) -> list[Path]:
    """Folders ``root/000``, ``root/001``, ... of 1,000 PNGs each (reused if already complete)."""
    from PIL import Image

    from lqae_sklearn.datasets import fetch_fashion_mnist

    images, _ = fetch_fashion_mnist(subset="train", return_X_y=True)
    folders = []
    for f in range((n_images + PER_FOLDER - 1) // PER_FOLDER):
        folder = root / f"{f:03d}"
        folders.append(folder)
        done = folder / ".complete"
        if done.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(PER_FOLDER):
            i = f * PER_FOLDER + j
            pixels = np.roll(images[i % len(images)], i // len(images), axis=1)
            Image.fromarray(pixels).save(folder / f"{i:06d}.png")
        done.touch()
    return folders


def tree_rss_kib(pid: int) -> tuple[int, int]:
    """(RSS of ``pid``, RSS of ``pid`` and all its descendants) in KiB, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, own, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        own = rss if p == pid else own
        total += rss
        stack.extend(children.get(p, []))
    return own, total


def prefill(folders, out: Path, leave: int) -> int:
    """Write records for all but the last ``leave`` files, as an interrupted run would have."""
    paths = sorted(os.fsencode(p) for folder in folders for p in map(str, folder.glob("*.png")))
    fake = {"ids": [1000] * 49, "text": " ".join(["the"] * 49)}
    with open(out, "w") as f:
        for path in paths[:-leave]:
            f.write(json.dumps({"path": os.fsdecode(path), **fake}, separators=(",", ":")) + "\n")
    for sidecar in (out.with_suffix(".meta.json"), out.with_name(out.stem + ".errors.jsonl")):
        sidecar.unlink(missing_ok=True)
    return len(paths) - leave


def run(folders, out: Path, args, resume: bool = False) -> dict:
    command = [sys.executable, "-m", "lqae_sklearn.cli.encode", *map(str, folders), str(out),
               "-c", args.checkpoint, "-b", str(args.batch_size), "-j", str(args.workers), "--ext", "png"]
    if not resume:
        command.append("--overwrite")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_main = peak_tree = 0
    while process.poll() is None:
        main, tree = tree_rss_kib(process.pid)
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.25)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"lqae-encode failed ({process.returncode}): {stderr}")
    lines = sum(1 for _ in open(out, "rb"))
    return {
        "files": lines,
        "seconds": round(seconds, 1),

        "peak_rss_main_mib": round(peak_main / 1024, 1),
        "peak_rss_tree_mib": round(peak_tree / 1024, 1),
        "summary": stderr.strip().splitlines()[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", default="/tmp/lqae-encode-memory")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--resume-scale", type=int, default=None, help="files in the resumed full-scale run")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    t = time.perf_counter()
    folders = make_corpus(workdir / "corpus", max(args.images + [args.resume_scale or 0]))
    generation_s = time.perf_counter() - t
    results = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "corpus_generation_s": round(generation_s, 1),
        "runs": [],
    }
    for n in sorted(args.images):
        result = run(folders[: n // PER_FOLDER], workdir / f"out-{n}.jsonl", args)
        results["runs"].append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    if args.resume_scale:
        out = workdir / f"out-resume-{args.resume_scale}.jsonl"
        already = prefill(folders[: args.resume_scale // PER_FOLDER], out, leave=1000)
        result = {"resumed_with_already_done": already, **run(folders[: args.resume_scale // PER_FOLDER], out, args, True)}
        results["runs"].append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    results["max_rss_any_child_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

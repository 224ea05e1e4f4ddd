"""The Ray Data engine: decoding in CPU tasks, encoding in an actor pool, parts committed by the actors.

The pending images are cut into *parts* of ``part_size`` images. A part is the unit
of everything here - one decode task, one actor call, one Parquet file - so that
each file is committed whole or not at all, by whichever worker finishes it:

1. ``map(decode_part)``: CPU tasks run the same hardened decoder as the local engine
   (``decode_file``), so a bad file becomes an error record, never a failed task.
2. ``map_batches(PartEncoder)``: actors hold the model once each (``num_gpus=1``
   when the cluster has GPUs), encode a part's good images and commit its rows as
   ``OUT/part-RRRRR-SSSSSS.parquet`` (write to a hidden name, fsync, rename).
3. The driver only counts: each actor call returns the part's paths and errors.

Exactly once: a part's name is fixed before it is scheduled, so a task or actor that
Ray retries after a worker died rewrites the same file with the same rows. A rerun
after the driver was killed reads the paths already in committed parts and cuts the
rest into parts under a new run number, so names never collide.
"""

from __future__ import annotations

import json
import logging
import os
import signal

import numpy as np

from ._decode import decode_file
from ._outputs import RUN_FILE, commit_part
from ._records import EncodedBatch
from ._run import EncodeError, load_tokenizer


def decode_part(row: dict, preprocessing: dict) -> dict:
    """Decode one part's images (a Ray ``map`` task); bad files get a reason instead of an image."""
    paths = [bytes(p) for p in row["paths"]]
    images, reasons = [], []
    for raw in paths:
        array, reason = decode_file(os.fsdecode(raw), preprocessing)
        reasons.append(reason or "")
        if array is not None:
            images.append(array)
    size = preprocessing["image_size"]
    empty = np.zeros((0, size, size) if preprocessing["color_mode"] == "L" else (0, size, size, 3), np.uint8)
    return {"part": row["part"], "run": row["run"], "paths": paths, "reasons": reasons,
            "images": np.stack(images) if images else empty}


class PartEncoder:
    """A Ray Data actor: the model, loaded once, encoding whole parts and committing them."""

    def __init__(self, tokenizer_params: dict, outputs, with_labels: bool, folder: str):
        self.tokenizer = load_tokenizer(tokenizer_params)
        _ = self.tokenizer.model_  # load the weights now, not inside the first part's time
        self.outputs = tuple(outputs)
        self.with_labels = with_labels
        self.folder = folder

    def __call__(self, batch: dict) -> dict:
        summaries = {"part": [], "encoded": [], "errors": []}
        for i in range(len(batch["part"])):
            paths = [bytes(p) for p in batch["paths"][i]]
            reasons = [str(r) for r in batch["reasons"][i]]
            good = [os.fsdecode(p) for p, r in zip(paths, reasons) if not r]
            if good:
                encoded = self.tokenizer.encode(np.asarray(batch["images"][i]), outputs=self.outputs)
                if not self._still_current(int(batch["run"][i])):
                    raise RuntimeError(f"{self.folder}: a newer run has started; this part is not committed")
                commit_part(EncodedBatch(good, encoded, self.with_labels).table(),
                            os.path.join(self.folder, str(batch["part"][i])))
            summaries["part"].append(str(batch["part"][i]) if good else "")
            summaries["encoded"].append([os.fsencode(p) for p in good])
            summaries["errors"].append(json.dumps([[p.hex(), r] for p, r in zip(paths, reasons) if r]))
        return summaries

    def _still_current(self, run: int) -> bool:
        # A worker of a killed driver that is still finishing a part must not commit
        # it after a new run has read which images are done.
        try:
            with open(os.path.join(self.folder, RUN_FILE)) as f:
                return int(f.read()) == run
        except (OSError, ValueError):
            return False


def _decode_memory(preprocessing: dict, part_size: int) -> int:
    """Bytes a decode task holds: the part's images twice (list and stacked copy), plus the
    worker process itself (about 300 MB with its imports, as Ray's memory report showed).

    Asking for it also keeps the stage apart: Ray Data fuses a task stage into the
    next actor stage when their resource requests are equal, and decoding would then
    run inside the encoder actors instead of in parallel CPU tasks.
    """
    channels = 1 if preprocessing["color_mode"] == "L" else 3
    return 2 * part_size * preprocessing["image_size"] ** 2 * channels + 384 * 2**20


def _check_tokenizer_params(params: dict) -> None:
    """Fit the tokenizer once here, on the CPU, so that a bad --layers or checkpoint is a usage error
    on the driver instead of a traceback from every actor."""
    from lqae_sklearn._loading import clear_model_cache

    load_tokenizer({**params, "device": "cpu"})
    clear_model_cache()


def _join_cluster(address: str | None) -> None:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise EncodeError(f"the ray engine needs Ray Data ({exc}): pip install 'lqae-sklearn[distributed]'",
                          "--engine") from exc

    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EncodeError(f"cannot connect to the Ray cluster at {address!r} ({exc})", "--ray-address") from exc


def encode_on_ray(run, pending) -> None:
    """Encode ``pending`` items of ``run`` (an :class:`EncodeRun`) on a Ray cluster."""
    _check_tokenizer_params(run.tokenizer_params())
    _join_cluster(run.opts.ray_address)
    import ray
    import ray.data

    output, opts = run.output, run.opts
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 0))
    actors = opts.actors or (gpus if gpus else max(1, cpus // 2))
    if not gpus and actors >= cpus:  # each CPU actor holds a CPU for good: decode tasks would never run
        fix = f"use --actors {cpus - 1} or fewer" if cpus >= 2 else "give the cluster at least 2 CPUs"
        raise EncodeError(f"{actors} encoder actor(s) would take all {cpus} CPUs of the Ray cluster and leave "
                          f"none for decoding; {fix}", "--actors")
    part_run = output.run
    parts = [
        {"part": output.part_path(part_run, number).name, "run": part_run,
         "paths": [os.fsencode(item.path) for item in pending[start : start + opts.part_size]]}
        for number, start in enumerate(range(0, len(pending), opts.part_size))
    ]
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    dataset = (
        ray.data.from_items(parts, override_num_blocks=len(parts))
        .map(decode_part, fn_kwargs={"preprocessing": run.preprocessing}, num_cpus=1,
             memory=_decode_memory(run.preprocessing, opts.part_size))
        .map_batches(
            PartEncoder, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0, num_cpus=1 if not gpus else None,
            fn_constructor_kwargs={"tokenizer_params": run.tokenizer_params(), "outputs": opts.outputs,
                                   "with_labels": opts.labels_from_dirs, "folder": os.fspath(output.out)},
        )
    )
    bar = run.progress_bar(len(pending))
    previous = {s: signal.signal(s, run.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for summary in dataset.iter_rows():
            encoded = [bytes(p) for p in summary["encoded"]]
            failures = [(os.fsdecode(bytes.fromhex(p)), reason) for p, reason in json.loads(summary["errors"])]
            run.encoded(encoded)
            run.failed(failures)
            if summary["part"]:  # "" for a part with no good image: it wrote no file
                output.part_committed(summary["part"], len(encoded))
            bar.update(len(encoded) + len(failures))
            if run.stop_signal is not None:
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()

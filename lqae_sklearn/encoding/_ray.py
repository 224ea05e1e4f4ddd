"""The Ray Data engine: decoding in CPU tasks, encoding in an actor pool that stages parts for the driver.

The pending images are cut into *parts* of ``part_size`` images. A part is the unit
of everything here - one decode task, one actor call, one Parquet file:

1. ``map(decode_part)``: CPU tasks run the same hardened decoder as the local engine
   (``decode_file``), so a bad file becomes an error record, never a failed task.
2. ``map_batches(PartEncoder)``: actors hold the model once each (``num_gpus=1``
   when the cluster has GPUs), encode a part's good images and stage its rows in
   the run's staging folder (:func:`~._parquet.stage_part`); they never make
   anything visible.
3. The driver receives each part's paths and errors and commits the part (a
   rename, after the run fence), as it does for the local engine.

Exactly once: a part's name is fixed before it is scheduled, so a task or actor that
Ray retries after a worker died stages the same file with the same rows. A worker of
a killed driver can only write into its own run's staging folder, which the rerun
removes and never reads (see :mod:`._parquet`).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from ._decode import decode_file
from ._encoder import encode_images, load_tokenizer
from ._errors import EncodeError
from ._parquet import stage_part
from ._records import EncodedPart


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
    return {"part": row["part"], "paths": paths, "reasons": reasons,
            "images": np.stack(images) if images else empty}


class PartEncoder:
    """A Ray Data actor: the model, loaded once, encoding whole parts and staging them for the driver."""

    def __init__(self, tokenizer_params: dict, outputs, with_labels: bool, staging_dir: str):
        self.tokenizer = load_tokenizer(tokenizer_params)
        _ = self.tokenizer.model_  # load the weights now, not inside the first part's time
        self.outputs = tuple(outputs)
        self.with_labels = with_labels
        self.staging_dir = staging_dir

    def __call__(self, batch: dict) -> dict:
        summaries = {"part": [], "encoded": [], "errors": []}
        for i in range(len(batch["part"])):
            name = str(batch["part"][i])
            paths = [bytes(p) for p in batch["paths"][i]]
            reasons = [str(r) for r in batch["reasons"][i]]
            good = [os.fsdecode(p) for p, r in zip(paths, reasons) if not r]
            if good:
                rows = encode_images(self.tokenizer, good, batch["images"][i], self.outputs, self.with_labels)
                stage_part(self.staging_dir, name, rows.table())
            summaries["part"].append(name if good else "")  # "" for a part with no good image: no file
            summaries["encoded"].append([os.fsencode(p) for p in good])
            summaries["errors"].append(json.dumps([[p.hex(), r] for p, r in zip(paths, reasons) if r]))
        return summaries


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


def encode_on_ray(pending, *, part_names, staging_dir, preprocessing: dict, tokenizer_params: dict, outputs,
                  with_labels: bool, part_size: int, ray_address: str | None, actors: int | None):
    """Join the cluster and plan the parts of ``pending``; returns an iterator of :class:`EncodedPart`, one
    per part as the cluster stages it, for the caller to commit.

    ``part_names`` gives the next part's name (called once per part, before anything is scheduled). The
    cluster is joined here, before the caller installs its signal handlers (``ray.init`` installs its own).
    """
    _check_tokenizer_params(tokenizer_params)
    _join_cluster(ray_address)
    import ray
    import ray.data

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 0))
    actors = actors or (gpus if gpus else max(1, cpus // 2))
    if not gpus and actors >= cpus:  # each CPU actor holds a CPU for good: decode tasks would never run
        fix = f"use --actors {cpus - 1} or fewer" if cpus >= 2 else "give the cluster at least 2 CPUs"
        raise EncodeError(f"{actors} encoder actor(s) would take all {cpus} CPUs of the Ray cluster and leave "
                          f"none for decoding; {fix}", "--actors")
    parts = [{"part": part_names(), "paths": [os.fsencode(item.path) for item in pending[start : start + part_size]]}
             for start in range(0, len(pending), part_size)]
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    dataset = (
        ray.data.from_items(parts, override_num_blocks=len(parts))
        .map(decode_part, fn_kwargs={"preprocessing": preprocessing}, num_cpus=1,
             memory=_decode_memory(preprocessing, part_size))
        .map_batches(
            PartEncoder, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0, num_cpus=1 if not gpus else None,
            fn_constructor_kwargs={"tokenizer_params": tokenizer_params, "outputs": outputs,
                                   "with_labels": with_labels, "staging_dir": os.fspath(staging_dir)},
        )
    )
    return _staged_parts(dataset)


def _staged_parts(dataset):
    for summary in dataset.iter_rows():
        yield EncodedPart(
            keys=[bytes(p) for p in summary["encoded"]],
            failures=[(os.fsdecode(bytes.fromhex(p)), reason) for p, reason in json.loads(summary["errors"])],
            staged=summary["part"] or None,
        )

"""``encode_dataset``: what ``lqae-encode`` does, called from Python."""

from __future__ import annotations

import logging
import os

from ._run import EncodeOptions, EncodeRun

logger = logging.getLogger("lqae_sklearn.encoding")


def encode_dataset(images, out, *, checkpoint=None, outputs=("ids", "text"), layers=None, token_grid="auto",
                   labels_from_dirs=False, batch_size=64, device="auto", workers=0, shard=(0, 1),
                   overwrite=False, extensions=(), format=None, engine="local", part_size=4096,
                   ray_address=None, actors=None, progress=False) -> dict:
    """Encode image files into a JSONL file or a Parquet folder, resumably, on this machine or on Ray.

    The same run as the ``lqae-encode`` command (see ``lqae-encode --help`` for the
    output format, the error records and the resume rules): rerunning a call that was
    interrupted skips the images already written, so each image ends up in ``out``
    exactly once.

    Parameters
    ----------
    images : path-like or sequence of path-like
        Folders (walked recursively) and image files.
    out : path-like
        A ``.jsonl`` file, or a folder (``"out/"``, ``"x.parquet"`` or an existing
        folder) for Parquet parts.
    checkpoint : path-like, default=None
        Checkpoint folder or file; None is the packaged Fashion-MNIST model.
    outputs : sequence of {"ids", "text", "embeddings"}, default=("ids", "text")
        What each row holds.
    layers : str, default=None
        Comma-separated layer names (or a shortcut) for the embeddings.
    token_grid : "auto", int or None, default="auto"
        Side of the token grid, for every field of a row. ``"auto"`` follows
        ``LQAETokenizer``'s rule for the row's tokens: the grid the checkpoint
        recommends for text (3 x 3 for the packaged one) when ``outputs`` holds
        ``"text"``, as ``LQAETokenizer(output="text")`` writes it, else one token
        per patch; None is one token per patch; an int ``G``, G x G tokens.
    labels_from_dirs : bool, default=False
        Add ``label``, the name of the folder holding each image.
    batch_size : int, default=64
        Images per model call.
    device : str, default="auto"
        Torch device for the local engine (Ray actors use ``"auto"`` on their own GPU).
    workers : int, default=0
        Decoder processes for the local engine.
    shard : (int, int), default=(0, 1)
        Encode only shard ``I`` of ``N``.
    overwrite : bool, default=False
        Start afresh instead of resuming.
    extensions : sequence of str, default=()
        Walk only files with these extensions.
    format : {"jsonl", "parquet"}, default=None
        Inferred from ``out`` when None.
    engine : {"local", "ray"}, default="local"
        Where to decode and encode.
    part_size : int, default=4096
        Images per Parquet part file.
    ray_address : str, default=None
        Address of a running Ray cluster; None joins the one this process has
        initialised or starts a local one.
    actors : int, default=None
        Encoder actors; None is one per GPU, or half the CPUs on a cluster without GPUs.
    progress : bool, default=False
        Show a progress bar on stderr.

    Returns
    -------
    dict
        ``encoded``, ``already`` (in ``out`` before this call), ``failed`` (error
        records now in the errors file) and ``interrupted``.

    Raises
    ------
    ValueError
        An unusable input, option, checkpoint or output (the message names it).

    Examples
    --------
    >>> from lqae_sklearn.encoding import encode_dataset
    >>> encode_dataset("images/", "tokens/", engine="ray")  # doctest: +SKIP
    {'encoded': 1000, 'already': 0, 'failed': 0, 'interrupted': False}
    """
    if isinstance(images, (str, os.PathLike)):
        images = (images,)
    run = EncodeRun(EncodeOptions(
        images=tuple(os.fspath(p) for p in images), out=os.fspath(out),
        checkpoint=None if checkpoint is None else os.fspath(checkpoint), outputs=tuple(outputs), layers=layers,
        token_grid=token_grid, labels_from_dirs=labels_from_dirs, batch_size=batch_size, device=device,
        workers=workers, shard=tuple(shard), overwrite=overwrite, extensions=tuple(extensions), progress=progress,
        format=format, engine=engine, part_size=part_size, ray_address=ray_address, actors=actors,
    ), echo=logger.info)
    run.main()
    return run.summary()

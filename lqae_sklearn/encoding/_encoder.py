"""The model side of a run: which ``LQAETokenizer`` encodes, and decoded images -> rows.

Every engine (this process, Ray actors) builds its tokenizer from the same
parameters, so that all of them write the same tokens for the same image.
"""

from __future__ import annotations

import numpy as np

from lqae_sklearn.model import CheckpointError

from ._errors import EncodeError
from ._records import EncodedBatch


def record_output(outputs) -> str:
    """The ``LQAETokenizer(output=...)`` whose tokens a record holds: text when the record has text.

    A record is one pass over the model at one token grid, so its ``ids`` and its
    ``text`` are the same tokens; ``token_grid="auto"`` then gives the grid
    ``LQAETokenizer(output="text")`` uses, as :class:`BatchEncoder` does with a
    text tokenizer.
    """
    return "text" if "text" in outputs else outputs[0]


def resolve_token_grid(config: dict, token_grid, outputs) -> int:
    """``token_grid`` ("auto", None or an int) as the side of the grid the run writes, by the tokenizer's rule."""
    from lqae_sklearn._tokenizer import LQAETokenizer

    grid = config["model"]["image_size"] // config["model"]["patch_size"]
    tokenizer = LQAETokenizer(output=record_output(outputs), token_grid=token_grid)
    try:
        return tokenizer._resolve_token_grid(config, grid)  # the one place the "auto" rule lives
    except (CheckpointError, ValueError) as exc:
        raise EncodeError(str(exc), "--token-grid") from exc


def tokenizer_params(checkpoint, outputs, token_grid: int, layers, batch_size: int, device: str) -> dict:
    """``LQAETokenizer`` parameters for a run (``token_grid`` already resolved)."""
    params = {"checkpoint": checkpoint, "output": record_output(outputs), "token_grid": token_grid,
              "batch_size": batch_size, "device": device}
    if layers:
        names = [name.strip() for name in layers.split(",") if name.strip()]
        params["layers"] = names[0] if len(names) == 1 else names  # one name may be a shortcut ("all")
    return params


def load_tokenizer(params: dict):
    """A fitted ``LQAETokenizer``; a parameter it refuses becomes an :class:`EncodeError`."""
    from lqae_sklearn._tokenizer import LQAETokenizer

    try:
        return LQAETokenizer(**params).fit()
    except (CheckpointError, ValueError) as exc:
        raise EncodeError(str(exc), "--checkpoint/--layers/--token-grid/--device") from exc


def encode_images(tokenizer, paths, images, outputs, with_labels: bool) -> EncodedBatch:
    """Rows for ``paths`` from their decoded ``images`` (a stacked array or a list; may be empty)."""
    encoded = tokenizer.encode(np.asarray(images), outputs=tuple(outputs)) if len(paths) else {}
    return EncodedBatch(paths, encoded, with_labels)

"""From names to loaded models: devices, checkpoints, and the per-process model caches.

The estimators, the LLM backends and the trainer all resolve devices here, and
every model held in memory lives in a :class:`~lqae_sklearn._model_cache.ModelCache`:
least recently used first out, a fixed number of entries, thread-safe. Refits and
clones (a grid search) therefore reuse weights already loaded instead of reading
them again.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ._model_cache import ModelCache, clear_all
from .model import DEFAULT_CHECKPOINT, CheckpointError, FrozenLanguageModel, load_checkpoint


# -- devices ---------------------------------------------------------------------------------------
def resolve_device(device) -> torch.device:
    """``"auto"`` (or None) -> CUDA when present, else the CPU; anything else must be a device this machine has.

    Raises
    ------
    ValueError
        If ``device`` is not a torch device, or names one this machine lacks.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    missing = unavailable_device(resolved)
    if missing:
        raise ValueError(f"device={device!r} is not available on this machine ({missing})")
    return resolved


def unavailable_device(device) -> str:
    """Why ``device`` cannot be used here, or "" when it can (or is "auto", or is no device at all)."""
    if device is None or device == "auto":
        return ""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        return ""  # not a device at all: resolve_device reports it
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"only {torch.cuda.device_count()} CUDA device(s)"
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return "no MPS device"
    return ""


class DeviceWarning(UserWarning):
    """A pickled estimator asked for a device this machine lacks; it runs on the CPU instead.

    Issued when an estimator fitted on a GPU (``device="cuda"``) is unpickled on a
    machine without one: the estimator then reloads its model on the CPU, and its
    results are the same up to floating-point rounding.

    Examples
    --------
    >>> import warnings
    >>> from lqae_sklearn import DeviceWarning
    >>> warnings.simplefilter("error", DeviceWarning)  # make a silent CPU fallback an error
    """


def device_here(pickled_device: str, requested, owner: str) -> str:
    """The device a pickled estimator runs on here: ``requested`` re-resolved, or the CPU with a warning."""
    missing = unavailable_device(requested)
    if missing:
        warnings.warn(
            f"{owner} was pickled with device={requested!r} (running on {pickled_device!r}), which this machine "
            f"does not have ({missing}); it runs on the CPU instead (its device parameter is unchanged)",
            DeviceWarning,
            stacklevel=4,
        )
        return "cpu"
    return str(resolve_device(requested))  # "auto" pickled on a GPU machine means the CPU here


# -- checkpoints -----------------------------------------------------------------------------------
def resolve_checkpoint(checkpoint) -> Path:
    """A checkpoint argument (None, the name of a shipped one, or a path) -> an existing path."""
    if checkpoint is None:
        if not DEFAULT_CHECKPOINT.exists():
            raise FileNotFoundError(
                f"the default checkpoint is not installed at {DEFAULT_CHECKPOINT}; pass checkpoint= with the "
                f"path of a checkpoint written by save_checkpoint"
            )
        return DEFAULT_CHECKPOINT
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be None, a checkpoint name or a path, got {checkpoint!r}")
    path = Path(checkpoint).expanduser()
    if not path.exists():
        shipped = DEFAULT_CHECKPOINT.parent / str(checkpoint)
        if os.sep not in str(checkpoint) and shipped.exists():
            return shipped
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint)!r} does not exist (neither a path nor a shipped checkpoint)"
        )
    return path.resolve()


# -- caches ----------------------------------------------------------------------------------------
#: Autoencoders by (path, weights checksum, device, LM override); frozen LMs by (name, device): one LM per
#: device, because moving a model moves its LM in place.
LQAE_MODELS = ModelCache(max_items=4)
LANGUAGE_MODELS = ModelCache(max_items=4)


def cached_lqae(path: Path, config: dict, device: torch.device, language_model=None):
    """The LQAE at ``path`` on ``device``, loaded once per (path, weights checksum, device, LM).

    ``config`` is the checkpoint's config as the caller read it; its weights checksum
    picks the cache entry. A model is filed under the checksum of the weights it was
    actually built from (``load_checkpoint`` verifies them against the config it reads
    itself), so a checkpoint replaced between the caller's read and the load (a
    training run saving to the same folder) can never be cached, or handed out, under
    the old checksum.

    Raises
    ------
    CheckpointError
        If the checkpoint was replaced between the caller's read of ``config`` and
        the load: the model loaded is not the one ``config`` describes.
    """
    path = str(Path(path).resolve())
    wanted = config["weights_sha256"]

    def key(checksum: str) -> tuple:
        return (path, checksum, str(device), language_model)

    def load():
        if config.get("language_model") is None:  # a VQ-VAE: no LM to load or share
            return load_checkpoint(path, device=device)
        lm_name = str(language_model or config["model"]["language_model"])
        lm = LANGUAGE_MODELS.get((lm_name, str(device)), lambda: FrozenLanguageModel.from_pretrained(lm_name))
        return load_checkpoint(path, language_model=lm, device=device)

    model = LQAE_MODELS.get(key(wanted), load, key_of=lambda m: key(m.checkpoint_config["weights_sha256"]))
    loaded = model.checkpoint_config["weights_sha256"]
    if loaded != wanted:
        raise CheckpointError(
            f"checkpoint {path!r} was replaced while it was being loaded (its config named weights "
            f"{wanted[:12]}..., the folder now holds {loaded[:12]}...); load it again to use the new one"
        )
    return model


def clear_model_cache() -> None:
    """Forget every cached model: autoencoders, their frozen LMs and the LLMs (freed once unused).

    Estimators that load the same checkpoint or LLM on the same device share one
    copy per process; this drops the cache's references, so the memory is freed
    once no fitted estimator holds the models. Estimators that still hold one
    keep working; the next ``fit`` loads afresh.

    Examples
    --------
    >>> from lqae_sklearn import clear_model_cache
    >>> clear_model_cache()
    """
    clear_all()  # every registered ModelCache, the LLMs' included once lqae_sklearn.llm is imported

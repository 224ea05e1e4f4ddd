"""Checkpoint format: JSON config + safetensors weights, nothing pickled.

A checkpoint is either a folder::

    config.json        format version, LQAEConfig, LM identity (null for a
                       VQVAE: it has no LM), preprocessing, training data and
                       metrics, checksum of the weights
    model.safetensors  encoder and decoder weights (and a VQVAE's learned
                       codebook); the LM is referenced, never copied

or one ``.safetensors`` file whose metadata holds the same JSON under
``"lqae_config"``. Writes never leave half a checkpoint: the files are written
and flushed under a temporary name, then take the checkpoint's place in one
rename (a folder is swapped in one step on Linux; see :mod:`lqae_sklearn._atomic`
for the guarantee elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._atomic import atomic_path, make_temp_dir, replace_dir
from ._config import LQAEConfig
from ._language_model import FrozenLanguageModel

FORMAT = "lqae-sklearn"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_METADATA_KEY = "lqae_config"

#: The checkpoint shipped inside the package, trained on Fashion-MNIST (see docs/model-card.md).
DEFAULT_CHECKPOINT = Path(__file__).parents[1] / "checkpoints" / "fashion-mnist-small-28"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, from a newer format, or for another LM.

    It is a ``ValueError``; the message says what is wrong and how to fix it.

    Examples
    --------
    >>> from lqae_sklearn import CheckpointError, load_checkpoint
    >>> try:
    ...     load_checkpoint("no/such/checkpoint")
    ... except (CheckpointError, FileNotFoundError) as error:
    ...     print(type(error).__name__)  # doctest: +SKIP
    CheckpointError
    """


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Checksum over names and raw bytes, independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def preprocessing_of(config: LQAEConfig) -> dict:
    """How raw images must be turned into model input for this checkpoint.

    Parameters
    ----------
    config : LQAEConfig
        The model's configuration.

    Returns
    -------
    preprocessing : dict
        ``image_size``, ``color_mode`` (``"L"`` or ``"RGB"``), ``resample`` and
        ``pixel_range``, as stored in a checkpoint's ``config.json``.

    Examples
    --------
    >>> from lqae_sklearn.model import preprocessing_of, preset_config
    >>> preprocessing_of(preset_config("small-28"))["color_mode"]
    'L'
    """
    return {
        "image_size": config.image_size,
        "color_mode": "L" if config.in_channels == 1 else "RGB",
        "resample": "bilinear",
        "pixel_range": [0.0, 1.0],
    }


def save_checkpoint(model, path, *, training: dict | None = None, metrics: dict | None = None) -> Path:
    """Write ``model``'s trained weights and config to ``path``.

    The encoder and decoder weights (and a VQVAE's learned codebook) go to
    safetensors, everything else to JSON; the frozen language model is referenced
    by name and fingerprint, not copied (a VQVAE records none).

    Parameters
    ----------
    model : LQAE or VQVAE
        The model to save.
    path : str or path-like
        A name ending in ``.safetensors`` writes one file (the JSON in its
        metadata); anything else a folder with ``config.json`` and
        ``model.safetensors``. The write is atomic: a crash leaves no half-written
        checkpoint.
    training : dict or None, default=None
        Training metadata to record (data, steps, settings).
    metrics : dict or None, default=None
        Evaluation figures to record (PSNR, codebook usage).

    Returns
    -------
    path : pathlib.Path
        The path written.

    Examples
    --------
    >>> from lqae_sklearn import LQAE, preset_config, save_checkpoint
    >>> model = LQAE(preset_config("small-28", patch_size=7, encoder_depth=1, decoder_depth=1))
    >>> save_checkpoint(model, "untrained.safetensors")  # doctest: +SKIP
    PosixPath('untrained.safetensors')
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "language_model": model.language_model.identity() if model.language_model is not None else None,
        "preprocessing": preprocessing_of(model.config),
        "training": training or {},
        "metrics": metrics or {},
        "weights_sha256": tensors_sha256(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(config)})
        return path
    tmp_dir = make_temp_dir(path)
    try:
        save_file(tensors, tmp_dir / WEIGHTS_NAME)
        (tmp_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        replace_dir(tmp_dir, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def read_checkpoint_config(path) -> dict:
    """The checkpoint's JSON config, validated for format and version (no weights loaded).

    Parameters
    ----------
    path : str or path-like
        A checkpoint folder or ``.safetensors`` file.

    Returns
    -------
    config : dict
        ``model`` (the :class:`LQAEConfig` fields), ``language_model`` (identity
        and fingerprint; None for a learned codebook), ``preprocessing``,
        ``training``, ``metrics`` and ``weights_sha256``.

    Examples
    --------
    >>> from lqae_sklearn.model import DEFAULT_CHECKPOINT, read_checkpoint_config
    >>> read_checkpoint_config(DEFAULT_CHECKPOINT)["model"]["patch_size"]
    4
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise CheckpointError(f"checkpoint folder {str(path)!r} has no {CONFIG_NAME}")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_file} is not valid JSON (truncated or corrupt): {exc}") from exc
    else:
        config = _single_file_config(path)
    _check_format(config, path)
    return config


def load_checkpoint(path, language_model: FrozenLanguageModel | None = None, device="cpu"):
    """Rebuild the :class:`LQAE` (or :class:`VQVAE`) stored at ``path``, in eval mode.

    Parameters
    ----------
    path : str or path-like
        A checkpoint folder or ``.safetensors`` file.
    language_model : FrozenLanguageModel or None, default=None
        An already loaded LM to share; it must be the one the checkpoint was
        trained with (same vocabulary and embedding matrix, checked). None loads
        the LM the checkpoint names. A VQVAE checkpoint (``codebook="learned"``)
        loads no LM and ignores this.
    device : str, default="cpu"
        Torch device to load onto.

    Returns
    -------
    model : LQAE or VQVAE
        The model (:func:`build_model` of the stored config), in eval mode.

    Examples
    --------
    >>> from lqae_sklearn import load_checkpoint
    >>> from lqae_sklearn.model import DEFAULT_CHECKPOINT
    >>> load_checkpoint(DEFAULT_CHECKPOINT).config.num_tokens
    49
    """
    from ._build import build_model

    path = Path(path)
    config = read_checkpoint_config(path)
    weights_file = path / WEIGHTS_NAME if path.is_dir() else path
    try:
        tensors = load_file(weights_file)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {WEIGHTS_NAME}") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_file} is truncated or corrupt: {exc}") from exc
    if tensors_sha256(tensors) != config.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_file} does not match the checksum recorded in its config: the file is corrupt "
            f"or belongs to another checkpoint"
        )
    model_config = LQAEConfig.from_dict(config["model"])
    if model_config.codebook == "learned":
        language_model = None  # a VQVAE has no LM: never load one
    else:
        if not isinstance(config.get("language_model"), dict):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has a language codebook but records no language model to check it against"
            )
        if language_model is None:
            language_model = FrozenLanguageModel.from_pretrained(model_config.language_model)
        check_language_model(config["language_model"], language_model, path)
    model = build_model(model_config, language_model)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith("language_model.")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit its config: missing {missing}, unexpected {unexpected}")
    model.checkpoint_config = config
    return model.to(device).eval()


def check_language_model(expected: dict, language_model: FrozenLanguageModel, path) -> None:
    """Fail unless ``language_model`` is the LM the checkpoint was trained with."""
    actual = language_model.identity()
    for key in ("vocab_size", "hidden_size", "embedding_sha256"):
        if expected.get(key) != actual[key]:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was trained with language model {expected.get('name')!r} "
                f"(vocab {expected.get('vocab_size')}, width {expected.get('hidden_size')}, embeddings "
                f"{expected.get('embedding_sha256')}) but the loaded one, {actual['name']!r}, has vocab "
                f"{actual['vocab_size']}, width {actual['hidden_size']}, embeddings {actual['embedding_sha256']}"
            )


def _single_file_config(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): {exc}") from exc
    if _METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not an lqae-sklearn checkpoint (no {_METADATA_KEY!r} metadata)")
    try:
        return json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its {_METADATA_KEY!r} metadata is not valid JSON: {exc}") from exc


def _check_format(config: dict, path: Path) -> None:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an lqae-sklearn checkpoint (format field missing or wrong)")
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{str(path)!r} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} was written by a newer lqae-sklearn (format_version {version}); this version "
            f"reads up to {FORMAT_VERSION}: upgrade lqae-sklearn"
        )

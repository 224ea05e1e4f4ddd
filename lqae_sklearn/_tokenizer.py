"""`LQAETokenizer`: images -> language-model tokens, as a scikit-learn transformer.

The estimator is a thin, picklable shell around a trained :class:`LQAE`
checkpoint. Nothing is loaded in ``__init__``; ``fit`` loads (or reuses, from a
module-level cache) the checkpoint; a pickle holds the parameters and the few
facts that pin the checkpoint down, never weights, and reloads them lazily from
the checkpoint path on the machine that unpickles it.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ._checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, read_checkpoint_config
from ._images import ImageLoadError, load_image, to_model_input
from ._language_model import FrozenLanguageModel

OUTPUTS = ("ids", "text", "embeddings")
LAYER_SHORTCUTS = ("default", "all", "encoder", "lm", "last")
_FEATURE_PREFIX = "lqaetokenizer"


class DeviceWarning(UserWarning):
    """A pickled tokenizer asked for a device this machine lacks; it runs on the CPU instead."""


class LQAETokenizer(TransformerMixin, BaseEstimator):
    """Turn images into tokens of a frozen language model's vocabulary (LQAE).

    A trained Language Quantized AutoEncoder maps each image patch to the
    nearest word embedding of a frozen language model (all-MiniLM-L6-v2 for
    the shipped checkpoint), so an image becomes a short "sentence" of
    vocabulary tokens: one token per patch, row-major over the patch grid
    (49 tokens for 28x28 images with 4x4 patches).

    Parameters
    ----------
    checkpoint : str or path-like, default=None
        Folder or ``.safetensors`` file written by :func:`save_checkpoint`, or
        the name of a checkpoint shipped in ``lqae_sklearn/checkpoints``. None
        uses the shipped default, ``fashion-mnist-small-28``.
    output : {"ids", "text", "embeddings"}, default="ids"
        What :meth:`transform` returns:

        - ``"ids"``: int64 array (n_images, n_tokens) of vocabulary ids;
        - ``"text"``: list of one string per image (format below);
        - ``"embeddings"``: float32 array (n_images, n_features): the unmasked
          token sequence through the frozen LM, each chosen layer's hidden
          states averaged over tokens, the layers concatenated (the paper's
          linear-probe features).
    layers : str or list of str, default="default"
        Layers concatenated by ``output="embeddings"``. Names come from
        ``model_.feature_layer_names()``: ``"encoder.1"`` ... (ViT encoder
        blocks) and ``"lm.0"`` (LM embedding output) ... ``"lm.6"`` (last LM
        layer). Shortcuts: ``"all"``, ``"encoder"`` (every encoder block),
        ``"lm"`` (every LM hidden state), ``"last"`` (last encoder block and
        last LM layer), ``"default"`` (every encoder block: the best set in
        the Fashion-MNIST linear probe, 0.852 on 60k -> 10k against 0.831 for
        the last block alone; ``benchmarks/linear_probe.py`` compares the sets,
        see ``docs/benchmarks.md``).
    batch_size : int, default=256
        Images per forward pass.
    device : str, default="auto"
        ``"auto"`` uses CUDA when present, else the CPU; or any torch device
        string (``"cpu"``, ``"cuda:1"``).
    language_model : str, default=None
        Name or local folder of the frozen LM, overriding the one the
        checkpoint records (it must be the same model: its embeddings are
        checked). None uses the checkpoint's.
    progress : bool, default=False
        Show a progress bar over batches.
    token_grid : int or None, default=None
        Side of the token grid. None writes one token per patch (7 x 7 = 49 for
        the shipped checkpoint). An int ``g`` below the patch grid averages the
        encoder's output over ``g x g`` regions before the nearest-word search:
        ``g * g`` coarser tokens per image, for LLM prompts, which are cheaper
        the shorter they are (with the embedded Gemma 3 270M, 3 x 3 tokens
        classified Fashion-MNIST episodes as accurately as 49, within the
        confidence intervals, in a fifth to a third of the LLM time; see
        ``docs/benchmarks.md``). :meth:`inverse_transform` spreads each coarse
        token back over its patches, so its reconstructions are blockier. With
        ``output="embeddings"``, LM layers read these tokens; encoder layers are
        unchanged.

    Attributes
    ----------
    model_ : LQAE
        The loaded autoencoder in eval mode (shared, read-only, between
        estimators that use the same checkpoint on the same device).
    checkpoint_ : str
        Resolved path of the checkpoint.
    checkpoint_config_ : dict
        The checkpoint's JSON config (architecture, LM identity, preprocessing,
        training metadata).
    device_ : str
        Device the model runs on.
    layers_ : list of str
        The resolved ``layers``.
    n_tokens_ : int
        Tokens per image (``token_grid ** 2``, or the patch count).
    image_shape_ : tuple of int
        Shape of one reconstructed image: (H, W) or (H, W, 3).

    Notes
    -----
    **Text format.** Each image's tokens are written as the language model's
    own WordPiece pieces, in patch order, joined by single spaces, e.g.
    ``"shirt ##ing the ..."``. Pieces are exactly what
    ``tokenizer.convert_ids_to_tokens`` gives (a ``##`` prefix marks a word
    continuation); the codebook holds no special or ``[unused]`` tokens and no
    piece contains whitespace, so :meth:`text_to_ids` maps the text back to the
    exact ids by splitting on whitespace. Any LLM can read the string as
    ordinary text.

    **Inputs.** ``X`` may be an array (N, H, W) or (N, H, W, C) with C in
    1, 3, 4, uint8 in [0, 255] or float in [0, 1]; a list of file paths, PIL
    images or arrays (sizes may differ); or a pandas Series (or one-column
    DataFrame) of such items. Images are converted to the checkpoint's colour
    mode and resized (bilinear) to its image size. A bad item raises
    :class:`ImageLoadError` naming its index (and path).

    Results are deterministic; on the CPU the ids are exact nearest
    neighbours. ``fit`` ignores ``X``: the checkpoint is already trained.

    Examples
    --------
    >>> from lqae_sklearn import LQAETokenizer
    >>> from lqae_sklearn.datasets import fetch_fashion_mnist
    >>> images, labels = fetch_fashion_mnist(subset="test", return_X_y=True)
    >>> tok = LQAETokenizer(output="text").fit()
    >>> texts = tok.transform(images[:2])
    >>> len(texts), len(texts[0].split())
    (2, 49)
    """

    def __init__(
        self,
        checkpoint=None,
        output="ids",
        layers="default",
        batch_size=256,
        device="auto",
        language_model=None,
        progress=False,
        token_grid=None,
    ):
        self.checkpoint = checkpoint
        self.output = output
        self.layers = layers
        self.batch_size = batch_size
        self.device = device
        self.language_model = language_model
        self.progress = progress
        self.token_grid = token_grid

    # -- fitting ---------------------------------------------------------------------
    def fit(self, X=None, y=None):
        """Load and validate the checkpoint; ``X`` and ``y`` are ignored.

        Returns
        -------
        self : LQAETokenizer
        """
        self._check_params()
        for name in list(vars(self)):
            if name.endswith("_") and not name.startswith("__"):
                delattr(self, name)  # refit forgets the previous checkpoint
        for name in ("_model", "_vocabulary", "_weights_sha256"):
            self.__dict__.pop(name, None)

        path = resolve_checkpoint(self.checkpoint)
        config = read_checkpoint_config(path)
        device = resolve_device(self.device)
        model = _cached_model(path, device, self.language_model)

        self.checkpoint_ = str(path)
        self.checkpoint_config_ = model.checkpoint_config
        self.device_ = str(device)
        self.layers_ = resolve_layers(self.layers, model.feature_layer_names(), model.config.encoder_depth,
                                      model.language_model.num_layers)
        grid = model.config.grid_size
        g = self.token_grid
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not 1 <= g <= grid):
            raise ValueError(f"token_grid must be None or an int from 1 to the checkpoint's patch grid ({grid}), "
                             f"got {g!r}")
        self.n_tokens_ = (int(g) if g is not None else grid) ** 2
        size, channels = model.config.image_size, model.config.in_channels
        self.image_shape_ = (size, size) if channels == 1 else (size, size, channels)
        self._weights_sha256 = config["weights_sha256"]
        self._model = model
        return self

    def _check_params(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.language_model is not None and not isinstance(self.language_model, (str, os.PathLike)):
            raise ValueError(f"language_model must be None, a name or a folder, got {self.language_model!r}")

    def __sklearn_is_fitted__(self) -> bool:
        return "_weights_sha256" in self.__dict__

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Images, not a feature matrix: arrays (N, H, W[, C]), paths (strings), PIL images.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []
        return tags

    @property
    def model_(self):
        """The LQAE, loaded on first use after unpickling."""
        model = self.__dict__.get("_model")
        if model is not None:
            return model
        if not self.__sklearn_is_fitted__():
            raise AttributeError("'LQAETokenizer' object has no attribute 'model_' (call fit first)")
        with _CACHE_LOCK:
            model = self.__dict__.get("_model")
            if model is None:
                model = self._reload()
                self.__dict__["_model"] = model
        return model

    def _reload(self):
        path = Path(self.checkpoint_)
        if not path.exists():
            raise CheckpointError(
                f"this LQAETokenizer was fitted on checkpoint {self.checkpoint_!r}, which does not exist on "
                f"this machine; copy it there, or set checkpoint= to its new location and call fit again"
            )
        config = read_checkpoint_config(path)
        if config.get("weights_sha256") != self._weights_sha256:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_!r} has changed since this LQAETokenizer was fitted (its weights "
                f"checksum differs), so it would not reproduce the same tokens; call fit again to use it"
            )
        return _cached_model(path, torch.device(self.device_), self.language_model)

    # -- pickling: parameters and small facts only, never weights ---------------------
    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_model", None)
        state.pop("_vocabulary", None)
        return state

    def __setstate__(self, state):
        state = dict(state)
        device = state.get("device", "auto")
        fallback = _unavailable_device(device)
        if fallback:
            warnings.warn(
                f"LQAETokenizer was pickled with device={device!r}, which this machine does not have "
                f"({fallback}); it runs on the CPU instead (device set to 'cpu')",
                DeviceWarning,
                stacklevel=2,
            )
            state["device"] = "cpu"
        if "device_" in state:
            # Re-resolve on this machine: "auto" pickled on a GPU box means the CPU here.
            state["device_"] = str(resolve_device(state["device"]))
        super().__setstate__(state)

    # -- transforming ----------------------------------------------------------------
    def transform(self, X):
        """Encode images into ``output``: ids, text or embeddings (see the class docstring)."""
        check_is_fitted(self)
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        return self.encode(X, (self.output,))[self.output]

    def encode(self, X, outputs=("ids", "text")) -> dict:
        """Compute several outputs in one pass over the model.

        The encoder runs once per image; the LM runs once, and only when
        ``"embeddings"`` asks for an LM layer.

        Parameters
        ----------
        X : images
            See the class docstring for the accepted forms.
        outputs : sequence of {"ids", "text", "embeddings"}

        Returns
        -------
        dict
            ``"ids"``: int64 ndarray (N, n_tokens); ``"text"``: list of str;
            ``"embeddings"``: float32 ndarray (N, n_features); only the
            requested keys.
        """
        check_is_fitted(self)
        outputs = _check_outputs(outputs)
        model = self.model_
        source = image_source(X, model.checkpoint_config["preprocessing"])
        want_embeddings = "embeddings" in outputs
        layers = self.layers_ if want_embeddings else []
        need_ids = "ids" in outputs or "text" in outputs or any(n.startswith("lm.") for n in layers)
        device = torch.device(self.device_)

        ids_parts, feature_parts = [], []
        starts = range(0, len(source), int(self.batch_size))
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding", unit="batch")
        with torch.inference_mode():
            for start in starts:
                batch = torch.from_numpy(source.batch(start, start + int(self.batch_size))).to(device)
                ids, features = model.encode_with_features(batch, layers, with_ids=need_ids,
                                                           token_grid=self.token_grid)
                if ids is not None:
                    ids_parts.append(ids.cpu().numpy())
                if features is not None:
                    feature_parts.append(features.cpu().numpy())

        result = {}
        if need_ids:
            all_ids = np.concatenate(ids_parts).astype(np.int64, copy=False)
            if "ids" in outputs:
                result["ids"] = all_ids
            if "text" in outputs:
                result["text"] = self.ids_to_text(all_ids)
        if want_embeddings:
            result["embeddings"] = np.concatenate(feature_parts).astype(np.float32, copy=False)
        return {name: result[name] for name in outputs}

    # -- ids <-> text ------------------------------------------------------------------
    def _vocab(self):
        """(pieces, piece -> id, allowed mask) of the checkpoint's LM, built once per estimator."""
        vocab = self.__dict__.get("_vocabulary")
        if vocab is None:
            model = self.model_
            tokenizer = model.language_model.tokenizer
            if tokenizer is None:
                raise ValueError("the checkpoint's language model has no tokenizer, so tokens cannot be written as text")
            size = model.language_model.vocab_size
            pieces = np.array(tokenizer.convert_ids_to_tokens(list(range(size))), dtype=object)
            allowed = np.zeros(size, dtype=bool)
            allowed[model.quantizer.allowed_ids.cpu().numpy()] = True
            lookup = {piece: i for i, piece in enumerate(pieces) if allowed[i]}
            vocab = self.__dict__["_vocabulary"] = (pieces, lookup, allowed)
        return vocab

    def ids_to_text(self, ids) -> list[str]:
        """Token ids (N, T) -> one string per row: the LM's pieces joined by single spaces."""
        check_is_fitted(self)
        ids = self._check_ids(ids, "ids")
        pieces, _, _ = self._vocab()
        return [" ".join(row) for row in pieces[ids].tolist()]

    def text_to_ids(self, texts) -> np.ndarray:
        """Inverse of :meth:`ids_to_text`: strings -> int64 ids (N, n_tokens).

        Each text must hold exactly ``n_tokens_`` codebook pieces separated by
        whitespace; anything else raises a ValueError naming the text and token.
        """
        check_is_fitted(self)
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a list of strings, one per image, not a single string")
        texts = list(texts.iloc[:, 0] if hasattr(texts, "columns") else texts)
        if not texts:
            raise ValueError("texts is empty")
        _, lookup, _ = self._vocab()
        out = np.empty((len(texts), self.n_tokens_), dtype=np.int64)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a string")
            tokens = text.split()
            if len(tokens) != self.n_tokens_:
                raise ValueError(f"texts[{i}] has {len(tokens)} tokens; this checkpoint writes {self.n_tokens_} per image")
            for j, token in enumerate(tokens):
                token_id = lookup.get(token)
                if token_id is None:
                    raise ValueError(f"texts[{i}], token {j} ({token!r}) is not in the checkpoint's codebook")
                out[i, j] = token_id
        return out

    def _check_ids(self, ids, what: str) -> np.ndarray:
        ids = np.asarray(ids.to_numpy() if hasattr(ids, "to_numpy") else ids)
        if ids.ndim != 2 or ids.shape[1] != self.n_tokens_:
            raise ValueError(f"{what} must have shape (n_images, {self.n_tokens_}), got {ids.shape}")
        if ids.shape[0] == 0:
            raise ValueError(f"{what} is empty")
        if not np.issubdtype(ids.dtype, np.integer):
            if not np.issubdtype(ids.dtype, np.floating) or not np.array_equal(ids, np.round(ids)):
                raise ValueError(
                    f"{what} must be integer token ids, got dtype {ids.dtype} (embeddings cannot be turned back "
                    f"into tokens)"
                )
        ids = ids.astype(np.int64)
        _, _, allowed = self._vocab()
        bad = (ids < 0) | (ids >= allowed.size)
        bad[~bad] = ~allowed[ids[~bad]]
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(f"{what}[{row}, {col}] = {ids[row, col]} is not a token of the checkpoint's codebook")
        return ids

    def inverse_transform(self, X):
        """Token ids (N, n_tokens) or token texts -> reconstructed images.

        Returns
        -------
        images : float32 ndarray (N, H, W) for grayscale checkpoints, (N, H, W, 3)
            for RGB ones, in [0, 1].
        """
        check_is_fitted(self)
        if not isinstance(X, (str, bytes)) and len(X) and _looks_like_texts(X):
            ids = self.text_to_ids(X)
        else:
            ids = self._check_ids(X, "X")
        model = self.model_
        device = torch.device(self.device_)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(ids), int(self.batch_size)):
                batch = torch.from_numpy(ids[start : start + int(self.batch_size)]).to(device)
                parts.append(model.decode(batch).float().cpu().numpy())
        images = np.concatenate(parts)  # (N, C, H, W)
        images = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images, dtype=np.float32)

    def get_feature_names_out(self, input_features=None):
        """Column names of :meth:`transform`'s output for the current ``output``.

        ``"ids"``: ``token_0`` ...; ``"text"``: ``text``; ``"embeddings"``:
        ``lqaetokenizer_<layer>_<i>``, e.g. ``lqaetokenizer_lm.6_0``.
        """
        check_is_fitted(self)
        if self.output == "ids":
            names = [f"token_{i}" for i in range(self.n_tokens_)]
        elif self.output == "text":
            names = ["text"]
        elif self.output == "embeddings":
            widths = self._layer_widths()
            names = [f"{_FEATURE_PREFIX}_{layer}_{i}" for layer in self.layers_ for i in range(widths[layer])]
        else:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        return np.asarray(names, dtype=object)

    def _layer_widths(self) -> dict:
        """Feature width of each resolved layer (encoder width or LM hidden size)."""
        model_config = self.checkpoint_config_["model"]
        lm_width = self.checkpoint_config_["language_model"]["hidden_size"]
        return {name: model_config["encoder_dim"] if name.startswith("encoder.") else lm_width for name in self.layers_}


# -- parameter resolution --------------------------------------------------------------
def resolve_checkpoint(checkpoint) -> Path:
    """A checkpoint argument (None, name of a shipped one, or path) -> an existing path."""
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
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist (neither a path nor a shipped checkpoint)")
    return path.resolve()


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; anything else must be a torch device this machine has."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    missing = _unavailable_device(resolved)
    if missing:
        raise ValueError(f"device={device!r} is not available on this machine ({missing})")
    return resolved


def _unavailable_device(device) -> str:
    """Why ``device`` cannot be used here, or "" when it can (or is "auto")."""
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


def resolve_layers(layers, names: list[str], encoder_depth: int, lm_layers: int) -> list[str]:
    """The ``layers`` parameter -> a list of valid, distinct layer names."""
    shortcuts = {
        "all": names,
        "encoder": [n for n in names if n.startswith("encoder.")],
        "lm": [n for n in names if n.startswith("lm.")],
        "last": [f"encoder.{encoder_depth}", f"lm.{lm_layers}"],
        # Best measured on the shipped checkpoint (benchmarks/linear_probe.py, docs/benchmarks.md).
        "default": [n for n in names if n.startswith("encoder.")],
    }
    if isinstance(layers, str):
        if layers in shortcuts:
            return list(shortcuts[layers])
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers must be one of {LAYER_SHORTCUTS}, a layer name or a non-empty list of them, got {layers!r}")
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; this checkpoint has {names} (or use one of {LAYER_SHORTCUTS})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers lists a layer twice: {list(layers)}")
    return list(layers)


def _check_outputs(outputs) -> tuple:
    if isinstance(outputs, str):
        outputs = (outputs,)
    outputs = tuple(outputs)
    if not outputs:
        raise ValueError(f"outputs must name at least one of {OUTPUTS}")
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad:
        raise ValueError(f"unknown outputs {bad}; choose from {OUTPUTS}")
    return tuple(dict.fromkeys(outputs))


def _looks_like_texts(X) -> bool:
    if hasattr(X, "columns"):
        return X.shape[1] == 1 and isinstance(X.iloc[0, 0], str)
    first = X.iloc[0] if hasattr(X, "iloc") else X[0]
    return isinstance(first, str)


# -- model cache: refits and clones (grid search) reuse the loaded model -------------------
_CACHE_LOCK = threading.RLock()
_LANGUAGE_MODELS: dict[tuple, FrozenLanguageModel] = {}
_MODELS: OrderedDict = OrderedDict()
_MAX_MODELS = 4


def _checkpoint_stamp(path: Path) -> tuple:
    """Identifies a checkpoint's current contents cheaply (file sizes and modification times)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)


def _cached_model(path: Path, device: torch.device, language_model=None):
    """The LQAE at ``path`` on ``device``, loaded once per (checkpoint contents, device, LM)."""
    key = (str(Path(path).resolve()), _checkpoint_stamp(path), str(device), language_model)
    with _CACHE_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        lm_name = language_model or read_checkpoint_config(path)["model"]["language_model"]
        # One LM per device: moving a model moves its LM in place, so devices cannot share one.
        lm_key = (str(lm_name), str(device))
        lm = _LANGUAGE_MODELS.get(lm_key)
        if lm is None:
            lm = _LANGUAGE_MODELS[lm_key] = FrozenLanguageModel.from_pretrained(str(lm_name))
        model = load_checkpoint(path, language_model=lm, device=device)
        _MODELS[key] = model
        while len(_MODELS) > _MAX_MODELS:
            _MODELS.popitem(last=False)
        return model


def clear_model_cache() -> None:
    """Forget every cached model and language model (frees their memory)."""
    with _CACHE_LOCK:
        _MODELS.clear()
        _LANGUAGE_MODELS.clear()


# -- image inputs ------------------------------------------------------------------------
def image_source(X, preprocessing: dict):
    """Wrap user input as a sized source of preprocessed batches (float32 (B, C, S, S))."""
    if isinstance(X, (str, bytes, os.PathLike)):
        raise TypeError(f"X must be a collection of images; got a single path {X!r} (wrap it in a list)")
    if isinstance(X, Image.Image):
        raise TypeError("X must be a collection of images; got a single PIL image (wrap it in a list)")
    if hasattr(X, "columns") and hasattr(X, "iloc"):  # pandas DataFrame
        if X.shape[1] != 1:
            raise ValueError(f"a DataFrame X must have exactly one column (of paths or images), got {X.shape[1]}")
        X = X.iloc[:, 0]
    if hasattr(X, "iloc"):  # pandas Series
        X = X.to_list()
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if isinstance(X, np.ndarray) and X.dtype != object:
        source = _ArraySource(X, preprocessing)
    elif isinstance(X, (list, tuple, np.ndarray)):
        source = _ItemSource(list(X), preprocessing)
    else:
        raise TypeError(
            f"X must be an array (N, H, W) or (N, H, W, C), a list of paths / PIL images / arrays, or a "
            f"pandas Series of them; got {type(X).__name__}"
        )
    if len(source) == 0:
        raise ValueError("X holds no images")
    return source


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 pixels exactly as ``to_model_input`` makes them (floats in [0, 1] scaled by 255)."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(array, 0.0, 1.0) * 255.0
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _check_pixel_range(array: np.ndarray, name: str) -> None:
    """Reject NaN and out-of-range pixels rather than clipping them silently."""
    if array.dtype == np.uint8 or array.dtype == bool:
        return
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError(name, "image array contains NaN or infinity")
        low, high, hint = 0.0, 1.0, "float images must lie in [0, 1] (divide 0-255 data by 255)"
    elif np.issubdtype(array.dtype, np.integer):
        low, high, hint = 0, 255, "integer images must lie in [0, 255]"
    else:
        raise ImageLoadError(name, f"unsupported image dtype {array.dtype}")
    if array.size and (array.min() < low or array.max() > high):
        raise ImageLoadError(name, f"pixel values span [{array.min()}, {array.max()}]; {hint}")


class _ArraySource:
    """A batch array (N, H, W) or (N, H, W, C); vectorised when no resize or colour change is needed."""

    def __init__(self, array: np.ndarray, preprocessing: dict):
        if array.ndim == 2:
            raise ValueError(
                f"X has shape {array.shape}: expected images (N, H, W) or (N, H, W, C). Reshape flat pixels "
                f"first, e.g. X.reshape(-1, 28, 28); for a single image use X[None]"
            )
        if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (1, 3, 4)):
            raise ValueError(
                f"X has shape {array.shape}: expected (N, H, W) or (N, H, W, C) with C in 1, 3, 4 "
                f"(channels-first arrays need X.transpose(0, 2, 3, 1))"
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"X has dtype {array.dtype}; expected uint8 or float images")
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        self.array = array
        self.preprocessing = preprocessing
        if array.dtype != np.uint8:
            self._check_range()
        size, mode = preprocessing["image_size"], preprocessing["color_mode"]
        channels = 1 if array.ndim == 3 else array.shape[-1]
        self.direct = array.shape[1:3] == (size, size) and (channels == 1 if mode == "L" else channels == 3)

    def _check_range(self) -> None:
        try:
            _check_pixel_range(self.array, "X")
        except ImageLoadError:
            for i in range(len(self.array)):  # name the first offending image
                _check_pixel_range(self.array[i], f"X[{i}]")
            raise

    def __len__(self) -> int:
        return len(self.array)

    def batch(self, start: int, stop: int) -> np.ndarray:
        part = self.array[start:stop]
        if self.direct:
            pixels = _to_uint8(part).astype(np.float32) / 255.0
            return np.ascontiguousarray(pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2))
        out = []
        for i, image in enumerate(part, start):
            try:
                out.append(to_model_input(image, self.preprocessing))
            except ValueError as exc:
                raise ImageLoadError(f"X[{i}]", str(exc)) from exc
        return np.stack(out)


class _ItemSource:
    """A list of paths, PIL images or arrays, each preprocessed on its own."""

    def __init__(self, items: list, preprocessing: dict):
        self.items = items
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self._one(i) for i in range(start, min(stop, len(self.items)))])

    def _one(self, i: int) -> np.ndarray:
        item = self.items[i]
        if isinstance(item, (str, os.PathLike)):
            name = f"X[{i}] ({os.fspath(item)!r})"
            try:
                item = load_image(item)
            except ImageLoadError as exc:
                raise ImageLoadError(name, exc.reason) from exc
        elif isinstance(item, Image.Image):
            name = f"X[{i}]"
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            name = f"X[{i}]"
            item = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item)
            _check_pixel_range(item, name)
            item = _to_uint8(item) if item.dtype != bool else item.astype(np.uint8) * 255
        else:
            raise ImageLoadError(
                f"X[{i}]", f"unsupported item of type {type(item).__name__} ({item!r:.60}); expected a path, a PIL "
                f"image or an array"
            )
        try:
            return to_model_input(item, self.preprocessing)
        except (ValueError, OSError) as exc:
            raise ImageLoadError(name, str(exc)) from exc


__all__ = ["LQAETokenizer", "DeviceWarning", "clear_model_cache"]

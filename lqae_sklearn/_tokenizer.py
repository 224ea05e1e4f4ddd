"""`LQAETokenizer`: images -> language-model tokens, as a scikit-learn transformer.

The estimator is a thin, picklable shell around a trained :class:`~lqae_sklearn.model.LQAE`
checkpoint. Nothing is loaded in ``__init__``; ``fit`` loads (or reuses, from the
per-process cache of :mod:`lqae_sklearn._loading`) the checkpoint; a pickle holds
the parameters and the few facts that pin the checkpoint down, never weights, and
reloads them lazily from the checkpoint path on the machine that unpickles it.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from numbers import Integral
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_feature_names_in, check_is_fitted, validate_data

from ._images import DomainWarning, as_array_input, domain_gap, flat_width, image_source, is_flat_rows
from ._loading import cached_lqae, device_here, resolve_checkpoint, resolve_device
from ._token_text import TokenVocabulary, looks_like_texts
from .model import CheckpointError, read_checkpoint_config

OUTPUTS = ("ids", "text", "embeddings")
LAYER_SHORTCUTS = ("default", "all", "encoder", "lm", "last")
_FEATURE_PREFIX = "lqaetokenizer"
_RELOAD_LOCK = threading.Lock()
#: Private fitted state (besides the public attributes ending in "_"): a refit replaces it whole.
_PRIVATE_STATE = ("_model", "_vocabulary", "_weights_sha256", "_fitted_with")


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
    output : {"embeddings", "ids", "text"}, default="embeddings"
        What :meth:`transform` returns:

        - ``"embeddings"``: float32 array (n_images, n_features): each chosen
          layer's hidden states averaged over tokens, the layers concatenated
          (with LM layers, the unmasked token sequence goes through the frozen
          LM: the paper's linear-probe features). The default, because a
          transformer's output feeds the next estimator, and token ids read as
          numbers mean nothing to a linear model: with every default,
          ``Pipeline([LQAETokenizer(), LogisticRegression()])`` scored 0.805 on
          Fashion-MNIST 5k/2k splits, 0.529 with ids. With the shipped
          checkpoint that only ties the same ``LogisticRegression`` on raw pixels
          (0.797 as uint8, 0.817 divided by 255; ``benchmarks/default_pipeline.py``,
          ``docs/benchmarks.md``);
        - ``"ids"``: int64 array (n_images, n_tokens) of vocabulary ids;
        - ``"text"``: list of one string per image (format below), for
          :class:`LLMFewShotClassifier` or a text vectorizer.
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
    batch_size : int or None, default=None
        Images per forward pass; None is 256.
    device : str, default="auto"
        ``"auto"`` uses CUDA when present, else the CPU; or any torch device
        string (``"cpu"``, ``"cuda:1"``).
    language_model : str or path-like, default=None
        Name or local folder of the frozen LM, overriding the one the
        checkpoint records (it must be the same model: its embeddings are
        checked). None uses the checkpoint's.
    progress : bool, default=False
        Show a progress bar over batches.
    token_grid : "auto", int or None, default="auto"
        Side of the token grid. None writes one token per patch (7 x 7 = 49 for
        the shipped checkpoint), as the paper does. An int ``g`` up to the patch
        grid averages the encoder's output over ``g x g`` regions before the
        nearest-word search: ``g * g`` coarser tokens per image, for LLM prompts,
        which are cheaper the shorter they are. ``"auto"`` is the grid the
        checkpoint recommends for ``output="text"`` (its config's
        ``inference.text_token_grid``: 3 for the shipped checkpoint, with which
        the embedded Gemma 3 270M classified Fashion-MNIST episodes as accurately
        from 3 x 3 tokens as from 49, within the confidence intervals, in a fifth
        to a third of the LLM time; see ``docs/benchmarks.md``), and one token per
        patch for the other outputs or a checkpoint that recommends nothing.
        :meth:`inverse_transform` spreads each coarse token back over its
        patches, so its reconstructions are blockier. With
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
        Device the model runs on: ``device`` resolved on this machine (the CPU,
        with a :class:`DeviceWarning`, when a pickle asks for a device it lacks).
    output_ : str
        The ``output`` in force.
    layers_ : list of str
        The resolved ``layers``.
    token_grid_ : int
        Side of the token grid in force (``token_grid`` resolved: the patch grid
        for None, and for "auto" unless ``output="text"``).
    n_tokens_ : int
        Tokens per image, ``token_grid_ ** 2``.
    image_shape_ : tuple of int
        Shape of one image as the checkpoint reads it: (H, W) or (H, W, 3).
    n_features_in_ : int
        Pixels per flat row (H x W x C); set when ``fit`` was given flat rows.
    feature_names_in_ : ndarray of str
        Pixel column names; set when ``fit`` was given a DataFrame of them.

    Notes
    -----
    **When parameters take effect.** Everything that decides *what*
    :meth:`transform` returns (``checkpoint``, ``output``, ``layers``,
    ``token_grid``, ``language_model``, ``device``) is read once, by ``fit``,
    into the fitted attributes above: after ``set_params``, call ``fit`` again.
    ``batch_size`` and ``progress`` only decide how the work is split and shown;
    they change no result and are read at every call.

    **A failed fit.** A ``fit`` that raises leaves the estimator as it was: a
    fitted estimator keeps its previous fitted state, whole and usable
    (transform/predict give what they gave before); an unfitted one stays
    unfitted. ``fit`` validates and computes everything first and assigns the
    fitted attributes only at the end, whether it fails on a parameter, the
    checkpoint, ``X``, the device or the loading of the model.

    **State.** :meth:`transform`, :meth:`encode` and the other methods change
    nothing in the estimator, apart from two private caches filled on first
    use: the model reloaded after unpickling and the vocabulary that writes
    ids as text.

    **Inputs.** ``X`` may be an array of images (N, H, W) or (N, H, W, C) with C
    in 1, 3, 4, uint8 in [0, 255] or float in [0, 1]; flat rows (N, H x W x C)
    of the checkpoint's own size, row-major (Fashion-MNIST from
    ``fetch_openml`` is such rows of 0-255 values: pass them as uint8, or
    divide by 255), also as a DataFrame of pixel columns or any array-like that
    scikit-learn's ``check_array`` takes (a list of lists, an object array of
    numbers, an object with ``__array__``); a list of file paths, PIL images or
    arrays (sizes may differ); or a pandas Series (or one-column DataFrame) of
    such items. Images are converted to the checkpoint's colour mode and resized
    (bilinear) to its image size; when some are far from what the checkpoint
    was trained on (much larger or smaller, or colour for a grayscale
    checkpoint), each call says so once with a
    :class:`~lqae_sklearn.DomainWarning`. A bad item raises
    :class:`~lqae_sklearn.ImageLoadError` naming its index (and path).
    ``fit`` learns nothing from ``X`` (the checkpoint is already trained); it
    checks flat rows and records their width and column names.

    **Text format.** Each image's tokens are written as the language model's
    own WordPiece pieces, in patch order, joined by single spaces, e.g.
    ``"shirt ##ing the ..."``. :meth:`text_to_ids` maps the text back to the
    exact ids. With ``output="text"``, :meth:`transform` returns a 1-D list of
    strings rather than an (n, 1) array: scikit-learn's text vectorizers
    (``CountVectorizer``, ``TfidfVectorizer``) and :class:`LLMFewShotClassifier`
    take such a list directly. It is one column, named
    ``lqaetokenizer_text`` by :meth:`get_feature_names_out`, and
    ``set_output(transform="pandas")`` turns it into a DataFrame with that
    column.

    Results are deterministic; on the CPU the ids are exact nearest neighbours.

    Examples
    --------
    >>> from lqae_sklearn import LQAETokenizer
    >>> from lqae_sklearn.datasets import fetch_fashion_mnist
    >>> images, labels = fetch_fashion_mnist(subset="test", return_X_y=True)  # doctest: +SKIP
    >>> tok = LQAETokenizer(output="text").fit(images)  # doctest: +SKIP
    >>> texts = tok.transform(images[:2])  # doctest: +SKIP
    >>> len(texts), len(texts[0].split())  # 3 x 3 coarse tokens: the checkpoint's choice for text  # doctest: +SKIP
    (2, 9)
    """

    _parameter_constraints: dict = {
        "checkpoint": [None, str, os.PathLike],
        "output": [StrOptions(set(OUTPUTS))],
        "layers": [str, list, tuple],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "device": [str],
        "language_model": [None, str, os.PathLike],
        "progress": ["boolean"],
        "token_grid": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        checkpoint=None,
        output="embeddings",
        layers="default",
        batch_size=None,
        device="auto",
        language_model=None,
        progress=False,
        token_grid="auto",
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
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Load the checkpoint and fix the transformation; ``X`` is checked, not learnt from.

        Parameters
        ----------
        X : images, optional
            Any input form :meth:`transform` takes (see Notes). Flat rows are
            checked against the checkpoint's image size and set
            ``n_features_in_`` (and ``feature_names_in_`` for a DataFrame).
        y : None
            Ignored.

        Returns
        -------
        self : LQAETokenizer
            The fitted tokenizer.
        """
        # Everything is computed into locals; the estimator changes only at the end (see Notes).
        X = None if X is None else as_array_input(X)
        path = resolve_checkpoint(self.checkpoint)
        config = read_checkpoint_config(path)
        model_config = config["model"]
        token_grid = self._resolve_token_grid(config, model_config["image_size"] // model_config["patch_size"])
        if config.get("language_model") is None:  # a VQ-VAE: its codes are nobody's words
            if self.output == "text":
                raise ValueError(f"output='text' needs a checkpoint whose codebook is a language model's vocabulary; "
                                 f"{str(path)!r} has a learned codebook (a VQ-VAE): use output='ids' or 'embeddings'")
            if self.language_model is not None:
                raise ValueError(f"language_model={self.language_model!r} was given, but {str(path)!r} is a VQ-VAE "
                                 f"checkpoint with no language model")
        input_facts = {} if X is None else self._flat_row_facts(X, config)
        device = resolve_device(self.device)
        model = cached_lqae(path, config, device, self.language_model)
        layers = resolve_layers(self.layers, model.feature_layer_names(), model.config.encoder_depth)
        size, channels = model.config.image_size, model.config.in_channels

        self._replace_fitted_state({
            "checkpoint_": str(path),
            "checkpoint_config_": copy.deepcopy(model.checkpoint_config),  # the cached model's is shared
            "device_": str(device),
            "output_": self.output,
            "layers_": layers,
            "token_grid_": token_grid,
            "n_tokens_": token_grid**2,
            "image_shape_": (size, size) if channels == 1 else (size, size, channels),
            **input_facts,
            "_weights_sha256": model.checkpoint_config["weights_sha256"],  # what was loaded, not what was read
            # What a reload (after unpickling) must ask for again: the values of this fit, not today's parameters.
            "_fitted_with": {"device": self.device, "language_model": self.language_model},
            "_model": model,
        })
        return self

    def _replace_fitted_state(self, state: dict) -> None:
        """Swap a whole new fitted state in for the previous one, the last step of a fit that succeeded."""
        previous = [name for name in vars(self)
                    if (name.endswith("_") and not name.startswith("__")) or name in _PRIVATE_STATE]
        for name in previous:
            if name not in state:  # e.g. n_features_in_ of an earlier fit on flat rows
                delattr(self, name)
        self.__dict__.update(state)

    def _resolve_token_grid(self, config: dict, grid: int) -> int:
        """``token_grid`` as a side length: "auto" reads the checkpoint's recommendation for text."""
        if self.token_grid == "auto":
            recommended = config.get("inference", {}).get("text_token_grid")
            if self.output != "text" or recommended is None:
                return grid
            if isinstance(recommended, bool) or not isinstance(recommended, int) or not 1 <= recommended <= grid:
                raise CheckpointError(f"checkpoint config's inference.text_token_grid must be an int from 1 to "
                                      f"the patch grid ({grid}), got {recommended!r}")
            return recommended
        if self.token_grid is None:
            return grid
        if isinstance(self.token_grid, bool) or self.token_grid > grid:
            raise ValueError(f"token_grid must be 'auto', None or an int from 1 to the checkpoint's patch grid "
                             f"({grid}), got {self.token_grid!r}")
        return int(self.token_grid)

    def _flat_row_facts(self, X, config) -> dict:
        """Refuse what cannot be images; flat rows go through scikit-learn's validation (sparse ones fail it).

        Returns the fitted facts flat rows give (``n_features_in_``, ``feature_names_in_``), {} for images.
        """
        if isinstance(X, np.ndarray) and X.dtype != object and X.ndim not in (2, 3, 4):
            raise ValueError(f"X has shape {X.shape}: expected images (N, H, W) or (N, H, W, C), or flat rows "
                             f"(N, H x W x C)")
        if not (is_flat_rows(X) or sp.issparse(X)):
            return {}  # images, paths, PIL images: read by transform
        # validate_data records the width and names on the estimator it checks: a scratch copy, so that
        # a fit that fails later leaves this one as it was.
        scratch = clone(self)
        validate_data(scratch, X, reset=True, dtype=None)
        width = flat_width(config["preprocessing"])
        if scratch.n_features_in_ != width:
            size = config["preprocessing"]["image_size"]
            raise ValueError(
                f"X has {scratch.n_features_in_} features per row, but this checkpoint reads flat rows of "
                f"{size} x {size} x {width // size**2} = {width} pixels (or images (N, H, W[, C]), paths, "
                f"PIL images)"
            )
        return {name: value for name, value in vars(scratch).items() if name in ("n_features_in_", "feature_names_in_")}

    def __sklearn_is_fitted__(self) -> bool:
        return "_weights_sha256" in self.__dict__

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Flat pixel rows, arrays of images (N, H, W[, C]) and paths (strings) are all images here.
        tags.input_tags.two_d_array = True
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
        with _RELOAD_LOCK:
            model = self.__dict__.get("_model")
            if model is None:
                model = self.__dict__["_model"] = self._reload()
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
        return cached_lqae(path, config, torch.device(self.device_), self._fitted_with["language_model"])

    # -- pickling: parameters and small facts only, never weights ---------------------
    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_model", None)
        state.pop("_vocabulary", None)
        return state

    def __setstate__(self, state):
        state = dict(state)
        if "device_" in state:
            requested = state["_fitted_with"]["device"]
            state["device_"] = device_here(state["device_"], requested, type(self).__name__)
        super().__setstate__(state)

    # -- transforming ----------------------------------------------------------------
    def transform(self, X):
        """Encode images into ``output_``: ids, text or embeddings (see the class docstring).

        Parameters
        ----------
        X : images
            See Notes for the accepted forms.

        Returns
        -------
        ndarray of int64 ``(n, n_tokens_)``, list of str, or ndarray of float32 (n, n_features)
            Token ids, token texts or embeddings, by ``output``.
        """
        check_is_fitted(self)
        return self._encode(X, (self.output_,), stacklevel=4)[self.output_]  # transform is wrapped by set_output

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
        return self._encode(X, _check_outputs(outputs), stacklevel=3)

    def _encode(self, X, outputs: tuple, stacklevel: int) -> dict:
        X = as_array_input(X)
        if is_flat_rows(X) and hasattr(self, "n_features_in_"):
            validate_data(self, X, reset=False, dtype=None)  # same width and column names as in fit
        model = self.model_
        preprocessing = model.checkpoint_config["preprocessing"]
        source = image_source(X, preprocessing)
        want_embeddings = "embeddings" in outputs
        layers = self.layers_ if want_embeddings else []
        need_ids = "ids" in outputs or "text" in outputs or any(n.startswith("lm.") for n in layers)
        device = torch.device(self.device_)
        batch_size = self._batch_size()

        ids_parts, feature_parts = [], []
        starts = range(0, len(source), batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding", unit="batch")
        with torch.inference_mode():
            for start in starts:
                batch = torch.from_numpy(source.batch(start, start + batch_size)).to(device)
                ids, features = model.encode_with_features(batch, layers, with_ids=need_ids,
                                                           token_grid=self.token_grid_)
                if ids is not None:
                    ids_parts.append(ids.cpu().numpy())
                if features is not None:
                    feature_parts.append(features.cpu().numpy())
        gap = domain_gap(source.originals(), preprocessing, self.checkpoint_config_.get("training", {}).get("data"))
        if gap is not None:
            warnings.warn(gap, DomainWarning, stacklevel=stacklevel)

        result = {}
        if need_ids:
            all_ids = np.concatenate(ids_parts).astype(np.int64, copy=False)
            if "ids" in outputs:
                result["ids"] = all_ids
            if "text" in outputs:
                result["text"] = self._vocab().to_text(all_ids)
        if want_embeddings:
            result["embeddings"] = np.concatenate(feature_parts).astype(np.float32, copy=False)
        return {name: result[name] for name in outputs}

    def _batch_size(self) -> int:
        return 256 if self.batch_size is None else int(self.batch_size)

    # -- ids <-> text ------------------------------------------------------------------
    def _vocab(self) -> TokenVocabulary:
        """The checkpoint's codebook pieces, built once per estimator."""
        vocab = self.__dict__.get("_vocabulary")
        if vocab is None:
            vocab = self.__dict__["_vocabulary"] = TokenVocabulary.of(self.model_)
        return vocab

    def ids_to_text(self, ids) -> list[str]:
        """Token ids ``(N, n_tokens_)`` -> one string per row: the LM's pieces joined by single spaces.

        Parameters
        ----------
        ids : array-like of int of shape ``(n_images, n_tokens_)``
            Token ids, as ``transform`` returns them with ``output="ids"``.

        Returns
        -------
        list of str
            One text per row.
        """
        check_is_fitted(self)
        return self._vocab().to_text(self._vocab().check_ids(ids, self.n_tokens_, "ids"))

    def text_to_ids(self, texts) -> np.ndarray:
        """Inverse of :meth:`ids_to_text`: strings -> int64 ids ``(N, n_tokens_)``.

        Each text must hold exactly ``n_tokens_`` codebook pieces separated by
        whitespace; anything else raises a ValueError naming the text and token.

        Parameters
        ----------
        texts : list of str
            Token texts, one per image.

        Returns
        -------
        ndarray of int64 of shape ``(n_images, n_tokens_)``
            The token ids.
        """
        check_is_fitted(self)
        return self._vocab().to_ids(texts, self.n_tokens_)

    def inverse_transform(self, X):
        """Token ids ``(N, n_tokens_)`` or token texts -> reconstructed images.

        Parameters
        ----------
        X : array-like of int ``(N, n_tokens_)``, or a list / (N, 1) column of token texts
            The tokens of each image, as ``transform`` returns them with
            ``output="ids"`` or ``output="text"``.

        Returns
        -------
        images : ndarray of float32
            Shape (N, H, W) for grayscale checkpoints, (N, H, W, 3) for RGB ones,
            values in [0, 1].
        """
        check_is_fitted(self)
        if not isinstance(X, (str, bytes)) and len(X) and looks_like_texts(X):
            ids = self.text_to_ids(X)
        else:
            ids = self._vocab().check_ids(X, self.n_tokens_, "X")
        model, device, batch_size = self.model_, torch.device(self.device_), self._batch_size()
        parts = []
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                batch = torch.from_numpy(ids[start : start + batch_size]).to(device)
                parts.append(model.decode(batch).float().cpu().numpy())
        images = np.concatenate(parts)  # (N, C, H, W)
        images = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images, dtype=np.float32)

    def get_feature_names_out(self, input_features=None):
        """Names of :meth:`transform`'s output columns: ``lqaetokenizer_`` and what the column holds.

        ``output="ids"``: ``lqaetokenizer_token0`` ... (token position);
        ``"text"``: ``lqaetokenizer_text``; ``"embeddings"``:
        ``lqaetokenizer_<layer>_<i>``, e.g. ``lqaetokenizer_lm.6_0``.

        Parameters
        ----------
        input_features : array-like of str, optional
            Checked against ``feature_names_in_`` / ``n_features_in_`` when
            ``fit`` saw flat rows; the output names do not depend on them.

        Returns
        -------
        feature_names_out : ndarray of str objects
            One name per output column.
        """
        check_is_fitted(self)
        _check_feature_names_in(self, input_features, generate_names=False)
        if self.output_ == "ids":
            names = [f"token{i}" for i in range(self.n_tokens_)]
        elif self.output_ == "text":
            names = ["text"]
        else:
            widths = self._layer_widths()
            names = [f"{layer}_{i}" for layer in self.layers_ for i in range(widths[layer])]
        return np.asarray([f"{_FEATURE_PREFIX}_{name}" for name in names], dtype=object)

    def _layer_widths(self) -> dict:
        """Feature width of each resolved layer (encoder width or LM hidden size)."""
        model_config = self.checkpoint_config_["model"]
        lm_width = (self.checkpoint_config_["language_model"] or {}).get("hidden_size")  # None: a VQ-VAE
        return {name: model_config["encoder_dim"] if name.startswith("encoder.") else lm_width for name in self.layers_}


# -- parameter resolution --------------------------------------------------------------
def resolve_layers(layers, names: list[str], encoder_depth: int) -> list[str]:
    """The ``layers`` parameter -> a list of valid, distinct layer names (``names`` lists no LM layer for a VQ-VAE)."""
    lm = [n for n in names if n.startswith("lm.")]
    shortcuts = {
        "all": names,
        "encoder": [n for n in names if n.startswith("encoder.")],
        "lm": lm,
        "last": [f"encoder.{encoder_depth}", *lm[-1:]],
        # Best measured on the shipped checkpoint (benchmarks/linear_probe.py, docs/benchmarks.md).
        "default": [n for n in names if n.startswith("encoder.")],
    }
    if isinstance(layers, str):
        if layers in shortcuts:
            if not shortcuts[layers]:
                raise ValueError(f"layers={layers!r}: this checkpoint has no language model (a VQ-VAE); its layers "
                                 f"are {names}")
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


__all__ = ["LQAETokenizer"]

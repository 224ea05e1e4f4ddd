"""The Language Quantized AutoEncoder and its file format: nothing about scikit-learn.

:class:`LQAE` is a ViT encoder, a quantizer onto a frozen language model's word
embeddings (:class:`FrozenLanguageModel`), the LM itself and a ViT decoder,
configured by an :class:`LQAEConfig` (named presets in :data:`PRESETS`).
:class:`VQVAE` is the paper's baseline: the same encoder and decoder around a
learned codebook (:class:`LearnedQuantizer`), no language model;
:class:`ProjectedLanguageQuantizer` searches the LQAE's words in a learned
low-dimensional space (``LQAEConfig.search_dim``);
:class:`TokenAutoencoder` is what the two share (encoding, decoding, probe
features); :func:`build_model` builds either from a config. :func:`save_checkpoint` /
:func:`load_checkpoint` write and read both as JSON + safetensors.
"""

from ._autoencoder import TokenAutoencoder
from ._build import build_model
from ._checkpoint import (
    DEFAULT_CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    preprocessing_of,
    read_checkpoint_config,
    save_checkpoint,
)
from ._config import DEFAULT_LANGUAGE_MODEL, PRESETS, LQAEConfig, preset_config
from ._language_model import FrozenLanguageModel
from ._learned_quantizer import LearnedQuantizer
from ._lqae import LQAE, LQAEOutput
from ._projected_quantizer import ProjectedLanguageQuantizer
from ._quantizer import LanguageQuantizer
from ._tokens import pool_tokens, unpool_tokens
from ._vqvae import VQVAE

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_LANGUAGE_MODEL",
    "PRESETS",
    "CheckpointError",
    "FrozenLanguageModel",
    "LQAE",
    "LQAEConfig",
    "LQAEOutput",
    "LanguageQuantizer",
    "LearnedQuantizer",
    "ProjectedLanguageQuantizer",
    "TokenAutoencoder",
    "VQVAE",
    "build_model",
    "load_checkpoint",
    "pool_tokens",
    "preprocessing_of",
    "preset_config",
    "read_checkpoint_config",
    "save_checkpoint",
    "unpool_tokens",
]

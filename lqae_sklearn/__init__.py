"""lqae-sklearn: images as language-model tokens, for scikit-learn.

The estimators: :class:`LQAETokenizer` (images -> token ids, token text or LM
features) and :class:`LLMFewShotClassifier` (few-shot classification by an LLM
reading token text). The model itself lives in :mod:`lqae_sklearn.model`, the
LLM backends in :mod:`lqae_sklearn.llm`, the few-shot protocol in
:mod:`lqae_sklearn.evaluation`, data sets in :mod:`lqae_sklearn.datasets`.
"""

from ._fewshot import LLMFewShotClassifier
from ._images import DomainWarning, ImageLoadError
from ._loading import DeviceWarning, clear_model_cache
from ._tokenizer import LQAETokenizer
from .model import (
    DEFAULT_LANGUAGE_MODEL,
    LQAE,
    PRESETS,
    CheckpointError,
    FrozenLanguageModel,
    LQAEConfig,
    LQAEOutput,
    load_checkpoint,
    preset_config,
    save_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "LLMFewShotClassifier",
    "LQAETokenizer",
    "DEFAULT_LANGUAGE_MODEL",
    "PRESETS",
    "CheckpointError",
    "DeviceWarning",
    "DomainWarning",
    "FrozenLanguageModel",
    "ImageLoadError",
    "LQAE",
    "LQAEConfig",
    "LQAEOutput",
    "clear_model_cache",
    "load_checkpoint",
    "preset_config",
    "save_checkpoint",
]

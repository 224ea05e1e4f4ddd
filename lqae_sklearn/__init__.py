"""lqae-sklearn: images as language-model tokens, for scikit-learn.

Public API: :class:`LQAETokenizer`, :class:`LLMFewShotClassifier`, and the model
pieces :class:`LQAE`, :class:`LQAEConfig`, :func:`load_checkpoint`,
:func:`save_checkpoint`.
"""

from ._checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ._config import DEFAULT_LANGUAGE_MODEL, PRESETS, LQAEConfig, preset_config
from ._fewshot import LLMFewShotClassifier
from ._language_model import FrozenLanguageModel
from ._model import LQAE, LQAEOutput
from ._tokenizer import LQAETokenizer

__version__ = "0.1.0"

__all__ = [
    "LLMFewShotClassifier",
    "LQAETokenizer",
    "DEFAULT_LANGUAGE_MODEL",
    "PRESETS",
    "CheckpointError",
    "FrozenLanguageModel",
    "LQAE",
    "LQAEConfig",
    "LQAEOutput",
    "load_checkpoint",
    "preset_config",
    "save_checkpoint",
]

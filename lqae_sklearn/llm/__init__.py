"""Large-language-model backends for LLMFewShotClassifier.

A backend scores, after one shared prompt prefix (task line and demonstrations),
every candidate label continuation for every query, and returns summed log-probs and
token counts (:class:`ContinuationScores`).

* :class:`HuggingFaceBackend`: any Hugging Face causal LM by name or folder, on CPU
  or CUDA, with the prefix's KV cache computed once and reused. Its default is the
  embedded Gemma 3 270M (converted once from the GGUF in ``lqae-sklearn[llm]`` and
  cached under ``$LQAE_SKLEARN_CACHE`` or ``~/.cache/lqae-sklearn``).
* :class:`OpenAICompatibleBackend`: an OpenAI-compatible server's ``/v1/completions``
  that returns prompt log-probabilities with ``echo`` (vLLM, llama-cpp-python's
  server; not llama.cpp's ``llama-server``: see the backend's notes).

:func:`make_backend` turns the ``llm`` parameter of the classifier into a backend.
"""

from ._base import ContinuationScores, LanguageModelBackend, LLMBackendError
from ._cache import EMBEDDED_LLM, cache_dir, clear_loaded_models, embedded_model_dir
from ._huggingface import HuggingFaceBackend
from ._openai import LLMServerError, LLMServerTimeout, OpenAICompatibleBackend

__all__ = [
    "EMBEDDED_LLM",
    "ContinuationScores",
    "HuggingFaceBackend",
    "LLMBackendError",
    "LLMServerError",
    "LLMServerTimeout",
    "LanguageModelBackend",
    "OpenAICompatibleBackend",
    "cache_dir",
    "clear_loaded_models",
    "embedded_model_dir",
    "make_backend",
]

_HF_OPTIONS = {"device", "dtype", "batch_size", "reuse_prefix"}
_HTTP_OPTIONS = {"api_key_env", "model", "timeout", "max_retries", "backoff", "max_backoff", "batch_size"}


def make_backend(llm=None, **options) -> LanguageModelBackend:
    """Build the backend that an ``llm`` value names.

    Parameters
    ----------
    llm : None, str or LanguageModelBackend
        None: the embedded Gemma 3 270M. ``"http://..."`` or ``"https://..."``: an
        OpenAI-compatible server rooted there (e.g. ``"http://127.0.0.1:8000/v1"``).
        Any other string: a Hugging Face causal LM name or folder. A backend object
        is returned as is.
    **options
        Keyword arguments of the backend's constructor (``device``, ``dtype``,
        ``batch_size``, ``reuse_prefix`` for Hugging Face; ``api_key_env``, ``model``,
        ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``, ``batch_size``
        for a server). Options that do not apply raise ``TypeError``.

    Returns
    -------
    LanguageModelBackend
        A :class:`HuggingFaceBackend` or an :class:`OpenAICompatibleBackend`
        (not loaded yet), or ``llm`` itself.

    Examples
    --------
    >>> from lqae_sklearn.llm import make_backend
    >>> type(make_backend("http://127.0.0.1:8000/v1", timeout=10)).__name__
    'OpenAICompatibleBackend'
    >>> type(make_backend(None, device="cpu")).__name__
    'HuggingFaceBackend'
    """
    if isinstance(llm, LanguageModelBackend):
        if options:
            raise TypeError(f"options {sorted(options)} cannot be applied to a ready backend object {llm!r}")
        return llm
    if llm is not None and not isinstance(llm, str):
        raise TypeError(
            "llm must be None (embedded Gemma), a model name or folder, an http(s) URL, "
            f"or a LanguageModelBackend; got {type(llm).__name__}"
        )
    if isinstance(llm, str) and llm.startswith(("http://", "https://")):
        unknown = set(options) - _HTTP_OPTIONS
        if unknown:
            raise TypeError(f"unknown options for an OpenAI-compatible server: {sorted(unknown)}")
        return OpenAICompatibleBackend(llm, **options)
    unknown = set(options) - _HF_OPTIONS
    if unknown:
        raise TypeError(f"unknown options for a Hugging Face model: {sorted(unknown)}")
    return HuggingFaceBackend(llm, **options)

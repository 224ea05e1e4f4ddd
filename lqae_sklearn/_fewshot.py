"""Few-shot classification by prompting a language model with labelled examples.

This is the evaluation protocol of Frozen (Tsimpoukelli et al., 2021), which LQAE
follows: a handful of ``input -> label`` demonstrations is written into a prompt,
then the query, and the class whose label the language model finds most likely
after the prompt wins. Labels may be real class names or arbitrary words ("dax",
"blicket"): the model has to bind them from the demonstrations alone.

Two ways to score. *Direct*: how likely is each label after the query? *Channel*
(Min et al., 2022, "Noisy Channel Language Model Prompting for Few-Shot Text
Classification"): write each demonstration label first, and ask how likely the
query's text is after each label. A small LLM prefers some labels whatever the
input (the last demonstration's, a familiar word); the channel score cannot be
decided by such a preference, since every class is scored on the same text.

Inputs are strings. For LQAE, they are token text from ``LQAETokenizer(output="text")``.
An LLM with its own vocabulary re-tokenises that text, so it should stay readable:
space-separated WordPiece pieces such as ``"shoe ##s black"`` split into ordinary
words and word pieces for any LLM tokenizer, where concatenated or id-encoded tokens
would become long runs of sub-word noise.
"""

from __future__ import annotations

import string
from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_consistent_length, check_is_fitted, column_or_1d

DEFAULT_PROMPT = "Input: {input}\nOutput: {label}\n"
#: Channel scoring reads the label first, then the input it explains.
DEFAULT_CHANNEL_PROMPT = "{label}: {input}\n"
SCORINGS = ("loglik", "mean_loglik", "channel")
_SENTINEL_INPUT, _SENTINEL_LABEL = "\x00input\x00", "\x00label\x00"


class LLMFewShotClassifier(ClassifierMixin, BaseEstimator):
    """Classify texts by prompting a causal language model with a few labelled examples.

    ``fit`` chooses ``n_examples_per_class`` demonstrations per class and writes them
    into a prompt; ``predict_proba`` appends each query and scores every class label
    as a continuation of the prompt. Nothing is trained: the LLM stays frozen.

    Parameters
    ----------
    llm : None, str or LanguageModelBackend, default=None
        The language model. None is the embedded Gemma 3 270M (needs
        ``lqae-sklearn[llm]``; converted once and cached, see
        :func:`lqae_sklearn.llm.embedded_model_dir`). A string is a Hugging Face
        causal LM name or folder, or the ``http(s)://`` root of an OpenAI-compatible
        server (``/v1/completions`` with ``echo`` and ``logprobs``, as vLLM and
        llama.cpp's server offer; key from ``$OPENAI_API_KEY``). A
        :class:`~lqae_sklearn.llm.LanguageModelBackend` object is used as given.
    n_examples_per_class : int, default=1
        Demonstrations per class (the "shots"). A class with fewer training samples
        contributes all of them.
    prompt : str or None, default=None
        Template of one demonstration, with the fields ``{input}`` and ``{label}``,
        each once: ``{input}`` first for the direct scorings, ``{label}`` first for
        ``"channel"``. None is ``"Input: {input}\\nOutput: {label}\\n"`` (direct) or
        ``"{label}: {input}\\n"`` (channel). The prompt is the demonstrations one
        after another, then the query rendered up to its second field, whose text is
        what gets scored. Spaces right before the second field belong to it
        (SentencePiece and BPE vocabularies attach a leading space to the word that
        follows), and the text after it (the newline) is scored with it, so it must
        also *end* where the model expects it to.
    instruction : str or None, default=None
        Optional task-induction line written before the demonstrations, such as
        ``"Answer with one of: {labels}."``; ``{labels}`` becomes the class labels
        joined by ", ". None writes no such line (the open-ended protocol of Frozen).
    max_tokens_per_item : int or None, default=None
        Keep only the first ``max_tokens_per_item`` whitespace-separated tokens of
        each input (demonstrations and queries), to bound the prompt length.
    scoring : {"loglik", "mean_loglik", "channel"}, default="loglik"
        Class score. ``"loglik"``: the log-probability of the label's text after
        the query (the sum over its tokens, i.e. the label as a whole).
        ``"mean_loglik"``: the mean per token, which does not penalise labels that
        take more tokens. ``"channel"``: the noisy-channel score of Min et al.
        (2022), the log-probability of the query's text after each label,
        ``log p(input | label, demonstrations)``: Bayes' rule with equal class
        priors, so the LLM's preference for one label (the label of the last
        demonstration, a familiar word) cannot decide the answer. It costs one
        scored query text per class instead of one shared query.
        ``predict_proba`` is the softmax of the scores over the classes.
    batch_size : int or None, default=None
        Queries per forward pass (local models) or prompts per request (servers);
        None uses the backend's default. Not allowed with a backend object.
    device : str or None, default=None
        Torch device of a local model (``"cpu"``, ``"cuda"``); None picks CUDA when
        available. Not allowed with a server or a backend object.
    llm_options : dict or None, default=None
        More keyword arguments for the backend: ``dtype``, ``reuse_prefix`` for a
        local model; ``model``, ``api_key``, ``timeout``, ``max_retries``,
        ``backoff``, ``max_backoff`` for a server.
    random_state : int, RandomState instance or None, default=None
        Chooses the demonstrations and their order.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels seen in ``fit``.
    label_texts_ : list of str
        ``str(c)`` for each class: the text written into the prompt.
    example_indices_ : ndarray of int
        Indices into the training ``X`` of the demonstrations, in prompt order.
    prompt_ : str
        The demonstration template in use (``prompt``, or the scoring's default).
    prompt_prefix_ : str
        The instruction line and the demonstrations: the prompt every query shares.
    backend_ : LanguageModelBackend
        The backend that scores prompts. Its weights are never pickled: they are
        reloaded (or taken from the per-process model cache) on first use.

    Notes
    -----
    Demonstrations are interleaved: one example per class, classes in a random
    order, then the next round, so that no class sits only at the end of the prompt.
    With a local model, the demonstrations' keys and values are computed once and
    reused for every query (see ``benchmarks/fewshot_speed.py``).
    """

    def __init__(
        self,
        llm=None,
        *,
        n_examples_per_class=1,
        prompt=None,
        instruction=None,
        max_tokens_per_item=None,
        scoring="loglik",
        batch_size=None,
        device=None,
        llm_options=None,
        random_state=None,
    ):
        self.llm = llm
        self.n_examples_per_class = n_examples_per_class
        self.prompt = prompt
        self.instruction = instruction
        self.max_tokens_per_item = max_tokens_per_item
        self.scoring = scoring
        self.batch_size = batch_size
        self.device = device
        self.llm_options = llm_options
        self.random_state = random_state

    # -- scikit-learn plumbing -----------------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.classifier_tags.poor_score = True
        return tags

    def __sklearn_is_fitted__(self):
        return hasattr(self, "prompt_prefix_")

    # -- fit -------------------------------------------------------------------------------------------
    def fit(self, X, y):
        """Choose the demonstrations, write the shared prompt and get the LLM ready.

        Parameters
        ----------
        X : array-like of str, shape (n_samples,) or (n_samples, 1)
            Input texts (for LQAE, token text).
        y : array-like of shape (n_samples,)
            Class labels; ``str(label)`` is what the prompt shows.

        Returns
        -------
        self : LLMFewShotClassifier
        """
        texts = _check_texts(X, "X")
        y = column_or_1d(y, warn=True)
        check_consistent_length(texts, y)
        check_classification_targets(y)
        self._check_params()
        channel = self.scoring == "channel"
        prompt = self.prompt if self.prompt is not None else (DEFAULT_CHANNEL_PROMPT if channel else DEFAULT_PROMPT)
        head, between, tail = _split_template(prompt, ("label", "input") if channel else ("input", "label"))

        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"y has {len(classes)} class; few-shot classification needs at least 2")
        label_texts = [str(c) for c in classes]
        for c, text in zip(classes, label_texts):
            if not text.strip():
                raise ValueError(f"class {c!r} has an empty label text; the LLM cannot be asked for it")
        if len(set(label_texts)) != len(label_texts):
            raise ValueError(f"classes {list(classes)!r} do not have distinct label texts {label_texts!r}")

        rng = check_random_state(self.random_state)
        shots = [rng.permutation(np.flatnonzero(y == c))[: self.n_examples_per_class] for c in classes]
        order = []
        for round_ in range(max(len(s) for s in shots)):
            for k in rng.permutation(len(classes)):
                if round_ < len(shots[k]):
                    order.append((int(shots[k][round_]), k))

        instruction = ""
        if self.instruction is not None:
            instruction = self.instruction.format(labels=", ".join(label_texts))
            if not instruction.endswith("\n"):
                instruction += "\n"
        inputs = [self._truncate(t) for t in texts]
        fields = ((label_texts[k], inputs[i]) if channel else (inputs[i], label_texts[k]) for i, k in order)
        demonstrations = "".join(head + first + between + second + tail for first, second in fields)
        # Spaces before the scored field go with it: " dax" is one word to the LLM.
        stripped = between.rstrip(" ")
        self._template = (head, stripped, between[len(stripped):], tail)

        self.classes_ = classes
        self.label_texts_ = label_texts
        self.example_indices_ = np.array([i for i, _ in order], dtype=np.int64)
        self.prompt_ = prompt
        self.prompt_prefix_ = instruction + demonstrations
        self.backend_ = self._make_backend().load()
        return self

    def _check_params(self):
        n = self.n_examples_per_class
        if not isinstance(n, Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n_examples_per_class must be an int >= 1, got {n!r}")
        m = self.max_tokens_per_item
        if m is not None and (not isinstance(m, Integral) or isinstance(m, bool) or m < 1):
            raise ValueError(f"max_tokens_per_item must be None or an int >= 1, got {m!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str template or None, got {type(self.prompt).__name__}")
        if self.instruction is not None:
            if not isinstance(self.instruction, str):
                raise TypeError(f"instruction must be a str or None, got {type(self.instruction).__name__}")
            fields = {f for _, f, _, _ in string.Formatter().parse(self.instruction) if f is not None}
            if fields - {"labels"}:
                raise ValueError(
                    f"instruction may only contain the field {{labels}}, found {sorted(fields - {'labels'})}"
                )
        if self.llm_options is not None and not isinstance(self.llm_options, dict):
            raise TypeError(f"llm_options must be a dict or None, got {type(self.llm_options).__name__}")

    def _make_backend(self):
        from .llm import LanguageModelBackend, make_backend

        options = dict(self.llm_options or {})
        is_object = isinstance(self.llm, LanguageModelBackend)
        is_server = isinstance(self.llm, str) and self.llm.startswith(("http://", "https://"))
        if self.batch_size is not None:
            if is_object:
                raise ValueError("batch_size cannot be set when llm is a backend object; configure the backend")
            options["batch_size"] = self.batch_size
        if self.device is not None:
            if is_object or is_server:
                raise ValueError(f"device applies to local models only, not to llm={self.llm!r}")
            options["device"] = self.device
        key = (self.llm if not is_object else id(self.llm), repr(sorted(options.items(), key=repr)))
        current = getattr(self, "backend_", None)
        if current is not None and getattr(self, "_backend_key", None) == key:
            return current  # refitting with new examples keeps the loaded model
        backend = make_backend(self.llm, **options)
        self._backend_key = key
        return backend

    def _truncate(self, text: str) -> str:
        if self.max_tokens_per_item is None:
            return text
        tokens = text.split()
        return text if len(tokens) <= self.max_tokens_per_item else " ".join(tokens[: self.max_tokens_per_item])

    # -- prediction ---------------------------------------------------------------------------------------
    def format_prompt(self, text: str, label=None) -> str:
        """The exact text the LLM reads for ``text``: the prompt, then ``label`` scored after it.

        With ``label=None``, the prompt up to the scored part (direct scorings only:
        the LLM is asked for a label). With a class, the whole text whose last part,
        the label (direct) or the input (channel), is scored.
        """
        check_is_fitted(self)
        text = _check_texts([text], "text")[0]
        if label is None and self.scoring == "channel":
            raise ValueError("channel scoring reads the input after each label: pass label= to see one prompt")
        if label is None:
            queries, _ = self.scoring_requests([text])
            return self.prompt_prefix_ + queries[0]
        matches = np.flatnonzero(self.classes_ == label)
        if matches.size == 0:
            raise ValueError(f"label {label!r} is not one of the classes {list(self.classes_)!r}")
        queries, continuations = self.scoring_requests([text])
        k = int(matches[0])
        if self.scoring == "channel":
            return self.prompt_prefix_ + queries[k] + continuations[0]
        return self.prompt_prefix_ + queries[0] + continuations[k]

    def scoring_requests(self, X) -> tuple[list[str], list[str]]:
        """What :meth:`predict_proba` asks the backend to score after ``prompt_prefix_``.

        Returns ``(queries, continuations)``: the backend scores every continuation
        after every ``prompt_prefix_ + query``. Direct scorings: one query per input
        (the prompt up to the label) and one continuation per class (the label).
        Channel: one query per class (the prompt up to the input) and one
        continuation per input.
        """
        check_is_fitted(self)
        texts = [self._truncate(t) for t in _check_texts(X, "X")]
        head, between, spaces, tail = self._template
        fields, scored = (self.label_texts_, texts) if self.scoring == "channel" else (texts, self.label_texts_)
        return [head + f + between for f in fields], [spaces + s + tail for s in scored]

    def _scores(self, X) -> np.ndarray:
        """(n_samples, n_classes) class scores."""
        queries, continuations = self.scoring_requests(X)  # checks fitted-ness first
        result = self.backend_.score(self.prompt_prefix_, queries, continuations)
        if self.scoring == "channel":
            return result.logprob.T
        return result.logprob if self.scoring == "loglik" else result.mean()

    def decision_function(self, X):
        """Class scores (``scoring``): each label's log-likelihood after the query's prompt,
        or, for channel scoring, the query's log-likelihood after each label.

        Returns
        -------
        scores : ndarray of shape (n_samples, n_classes), or (n_samples,) for two
            classes (score of ``classes_[1]`` minus that of ``classes_[0]``).
        """
        scores = self._scores(X)
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X):
        """Softmax over classes of the label scores.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        scores = self._scores(X)
        scores = scores - scores.max(axis=1, keepdims=True)
        proba = np.exp(scores)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X):
        """Log of :meth:`predict_proba`."""
        scores = self._scores(X)
        return scores - _logsumexp(scores)

    def predict(self, X):
        """The class whose label is most likely after each query (never an unseen label)."""
        scores = self._scores(X)
        return self.classes_[np.argmax(scores, axis=1)]


def _logsumexp(scores: np.ndarray) -> np.ndarray:
    top = scores.max(axis=1, keepdims=True)
    return top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True))


def _split_template(prompt, order=("input", "label")) -> tuple[str, str, str]:
    """Split a demonstration template into (text before the first field, between, after the second)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str template, got {type(prompt).__name__}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(prompt) if f is not None]
    except ValueError as exc:
        raise ValueError(f"prompt {prompt!r} is not a valid format string: {exc}") from exc
    if [f for f, _, _ in fields] != list(order):
        scorings = "channel scoring" if order[0] == "label" else "scoring='loglik' or 'mean_loglik'"
        raise ValueError(
            f"with {scorings}, prompt must contain {{{order[0]}}} then {{{order[1]}}}, each exactly once; "
            f"{prompt!r} has fields {[f for f, _, _ in fields]}"
        )
    if any(spec or conv for _, spec, conv in fields):
        raise ValueError(f"prompt fields take no conversion or format spec: {prompt!r}")
    sentinels = {"input": _SENTINEL_INPUT, "label": _SENTINEL_LABEL}
    rendered = prompt.format(**sentinels)
    head, rest = rendered.split(sentinels[order[0]])
    between, tail = rest.split(sentinels[order[1]])
    return head, between, tail


def _check_texts(X, name: str) -> list[str]:
    """A list of str from a 1-D sequence or a one-column 2-D array/frame of strings."""
    if isinstance(X, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string")
    if hasattr(X, "iloc") and getattr(X, "ndim", 1) == 2:  # DataFrame
        if X.shape[1] != 1:
            raise ValueError(f"{name} must have one column of texts, got shape {X.shape}")
        X = X.iloc[:, 0]
    array = np.asarray(X, dtype=object)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (or one column) of strings, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    texts = []
    for i, item in enumerate(array):
        if isinstance(item, np.str_):
            item = str(item)
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(item).__name__}: {item!r}")
        texts.append(item)
    return texts

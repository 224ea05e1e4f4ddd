"""Few-shot classification by prompting a language model with labelled examples.

This is the evaluation protocol of Frozen (Tsimpoukelli et al., 2021), which LQAE
follows: a handful of ``input -> label`` demonstrations is written into a prompt,
then the query, and the class the language model finds most likely wins. Labels may
be real class names or arbitrary words ("dax", "blicket"): the model has to bind
them from the demonstrations alone. How a class is scored, directly or through the
noisy channel, is described in :mod:`lqae_sklearn.llm._prompt`.

Inputs are strings. For LQAE, they are token text from ``LQAETokenizer(output="text")``.
An LLM with its own vocabulary re-tokenises that text, so it should stay readable:
space-separated WordPiece pieces such as ``"shoe ##s black"`` split into ordinary
words and word pieces for any LLM tokenizer, where concatenated or id-encoded tokens
would become long runs of sub-word noise.
"""

from __future__ import annotations

import copy
import os
from numbers import Integral

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _get_feature_names,
    check_array,
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

from ._loading import device_here, unavailable_device
from .llm import HuggingFaceBackend, LanguageModelBackend, make_backend
from .llm._calibration import CALIBRATIONS, CONTENT_FREE_INPUTS, batch_calibrated
from .llm._demonstrations import NearestDemonstrations, interleave, nearest_last
from .llm._prompt import LABEL_SCORINGS, FewShotPrompt, check_instruction, demonstration_orders, first_tokens

DEMONSTRATIONS = ("random", "nearest")
#: Defaults chosen by measurement: see the class's docstring and docs/benchmarks.md.
DEFAULT_N_EXAMPLES_PER_CLASS = 5
DEFAULT_DEMONSTRATIONS = "nearest"
DEFAULT_N_ORDERS = 1
DEFAULT_CALIBRATION = None
DEFAULT_LABEL_SCORING = "channel_per_class"


class LLMFewShotClassifier(ClassifierMixin, BaseEstimator):
    """Classify texts by prompting a causal language model with a few labelled examples.

    ``fit`` keeps the labelled examples; ``predict_proba`` shows each query, for every
    class, that class's ``n_examples_per_class`` examples nearest to it, and scores how
    likely the LLM finds the query's text after them (by default; see
    ``demonstrations`` and ``label_scoring`` for the other ways). Nothing is trained:
    the LLM stays frozen.

    Parameters
    ----------
    llm : None, str or LanguageModelBackend, default=None
        The language model. None is the embedded Gemma 3 270M (needs
        ``lqae-sklearn[llm]``; converted once and cached, see
        :func:`lqae_sklearn.llm.embedded_model_dir`). A string is a Hugging Face
        causal LM name or folder, or the ``http(s)://`` root of an OpenAI-compatible
        server whose ``/v1/completions`` returns prompt log-probabilities with
        ``echo`` (vLLM does; see :class:`~lqae_sklearn.llm.OpenAICompatibleBackend`
        for which servers were checked). A
        :class:`~lqae_sklearn.llm.LanguageModelBackend` object is copied, never
        changed, and the copy is loaded.
    n_examples_per_class : int, default=5
        Demonstrations per class (the "shots") in each prompt. A class with fewer
        training samples contributes all of them, so with the default every
        support image of a 1- to 5-shot episode is shown. The default was chosen
        by measurement under nearest demonstrations (``docs/benchmarks.md``,
        "Nearest demonstrations by default"; embedded Gemma 3 270M, per-class
        prompts, 9 tokens per image): on a pooled 10-way Fashion-MNIST task the
        5 nearest per class scored 0.598 against 0.560 for the 3 nearest (50
        labelled images per class, 500 queries; paired +0.038 ± 0.030), and
        0.553 against 0.577 with 20 per class (300 queries; −0.023 ± 0.038),
        where the nearest alone scored 0.513; in 2-way 5-shot episodes all 5
        scored 0.835 against 0.820 for the 3 nearest. It costs 1.36 times the
        LLM time per query of one nearest demonstration per class (2.03 times
        that of one random one, the defaults before;
        ``benchmarks/fewshot_pooled_cost.py``).
    demonstrations : {"nearest", "random"}, default="nearest"
        Which training examples a prompt shows, and in which order.
        ``"nearest"``: ``fit`` keeps every example, and each query gets, per
        class, the ``n_examples_per_class`` examples whose texts are nearest to
        its own: cosine similarity of TF-IDF vectors over the
        whitespace-separated tokens, searched by scikit-learn's
        :class:`~sklearn.neighbors.NearestNeighbors` (kNN prompting). The nearest
        stand last, closest to the query; see ``max_prompt_tokens`` for the
        bound on their number. Prompts are shared only by queries with the same
        demonstrations (under ``"channel_per_class"``, the same ones of that
        class). ``"random"``: ``fit`` draws ``n_examples_per_class`` of each
        class (``random_state``), which keep their order in ``X``, and every
        query shares them.
        The default, ``"nearest"``, was chosen by measurement
        (``docs/benchmarks.md``, "Channel per class" and "Nearest demonstrations
        by default"; embedded Gemma 3 270M, per-class prompts, 9 tokens per
        image). With more labelled examples than a prompt shows it is the more
        accurate: on a pooled 10-way Fashion-MNIST task, 0.513 against 0.310
        with one demonstration per class (20 labelled images per class, 300
        queries; paired +0.203 ± 0.069) and 0.560 against 0.448 with three (50
        per class, 500 queries; paired +0.112 ± 0.053); with five, 0.598
        against 0.530 (+0.068 ± 0.048; 0.558 against 0.502 out of 20 per
        class), the 0.598 within noise of a k-nearest-neighbour classifier on
        the same similarity without an LLM (k = 1: 0.584, k = 5: 0.612). Its
        predictions never depend on ``random_state``. When every example is
        shown (an N-way K-shot episode with K at most ``n_examples_per_class``)
        the two show the same examples and differ only in their order: nearest
        last scored 0.835 against 0.810 in 2-way 5-shot (200 episodes, paired
        +0.025 ± 0.025), and 0.611 against 0.605 in 5-way 5-shot (200 episodes,
        +0.006 ± 0.020); with one example per class the prompts are the same.
        The price: each query scores prompts of its own where ``"random"``
        shares one set among the queries of a ``predict`` call (1.50 times the
        LLM time per query with one demonstration per class, on the pooled
        task in batches of 10 queries), and the fitted state keeps every
        training text.
    n_orders : int, default=1
        Orders of the demonstrations each query is scored under; the class scores
        (log-probabilities) are averaged over them. With ``D`` demonstrations: all
        ``D!`` orders when ``D! <= n_orders``, else the first ``min(n_orders, D)``
        rotations of the interleaved order (see Notes; with ``D`` rotations every
        demonstration stands at every position once). Under
        ``label_scoring="channel_per_class"``, ``D`` counts each class's own
        demonstrations, in its own prompt (1-shot: one order). Which order a
        prompt starts from never depends on ``random_state``. Each order costs
        one scoring pass (with a local model, one cached prefix per order). The
        default, 1, was
        chosen by measurement (``docs/benchmarks.md``, "Few-shot options";
        embedded Gemma 3 270M, channel scoring, 9 tokens per image, the 200
        Fashion-MNIST episodes of its grid): in 2-way 1-shot, 1 order scored
        0.615 ± 0.044 and 2 orders 0.623 ± 0.046 at twice the LLM time; in
        5-way 1-shot (20 episodes), 1 to 5 orders scored 0.34-0.40, each within
        the others' intervals (± 0.10), at up to 5 times the cost; under the
        defaults in 2-way 5-shot, 2 orders scored 0.820 against 0.835 for 1
        (200 episodes, paired −0.015 ± 0.015) at 1.7 times the LLM time. One
        fixed order is what removed the spread: across 5 values of ``random_state``
        on fixed 2-way 1-shot episodes, 0.040 when each fit drew a random order,
        0.000 now.
    calibration : {None, "content_free", "batch"}, default=None
        Removes the LLM's preference for some labels whatever the query, by
        subtracting a per-class offset from the class scores (dividing the class
        probabilities by a per-class factor); ``predict_proba`` stays a
        distribution. ``"content_free"`` (contextual calibration, Zhao et al.
        2021): the offset is each class's score for the inputs ``"N/A"``, ``""``
        and ``"[MASK]"``, averaged, after the same demonstrations (a few short
        extra continuations per prompt). ``"batch"`` (batch calibration, Zhou et
        al. 2023): the offset is each class's mean score over the queries of the
        ``predict``/``predict_proba``/``decision_function`` call, so a query's
        prediction depends on the other queries predicted with it; the call
        assumes they come from the classes in roughly equal numbers, and raises
        ``ValueError`` for a single query (its own mean would leave every class
        the same score). Both apply to the direct and the channel scorings.
        The default, None, was chosen by measurement and by what a classifier
        owes its caller. Under ``"channel_per_class"`` (200 episodes,
        ``docs/benchmarks.md``, "Channel per class"): ``"content_free"`` 0.672
        against 0.693 without calibration in 2-way 1-shot and 0.450 against
        0.446 in 5-way 1-shot; ``"batch"`` 0.770 and 0.493, for the reason
        below. In the 5-shot cells under the defaults (nearest
        demonstrations, 200 episodes), ``"content_free"`` scored 0.823 against
        0.835 (2-way) and 0.604 against 0.611 (5-way). Under ``"channel"``
        (figures as for ``n_orders``, 1 order):
        ``"content_free"`` scored 0.608 ± 0.042 against 0.615 ± 0.044 without
        calibration in 2-way 1-shot, and 0.330 ± 0.028 against 0.350 ± 0.027
        in 5-way 1-shot, at 1.13-1.33 times the LLM time. ``"batch"`` scored
        0.700 ± 0.064 in 2-way 1-shot, but an episode's queries are one per
        class, and with two classes and two queries batch calibration gives the
        two opposite answers whatever their scores (each episode was all right
        or all wrong): the gain is the protocol's knowledge of the classes'
        numbers, not the query's. In 5-way 1-shot, where that knowledge
        constrains less, it scored 0.357 ± 0.031 (paired gain +0.007 ± 0.022).
        With it, ``predict(X)[i]`` depends on the rest of ``X``, and two
        queries of one class are forced apart; use it only for a large batch
        known to be roughly balanced.
    prompt : str or None, default=None
        Template of one demonstration, with the fields ``{input}`` and ``{label}``,
        each once: ``{input}`` first for the direct scorings, ``{label}`` first for
        the channel ones. None is ``"Input: {input}\\nOutput: {label}\\n"`` (direct)
        or ``"{label}: {input}\\n"`` (channel). The prompt is the demonstrations one
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
    max_prompt_tokens : int or None, default=None
        Under ``demonstrations="nearest"``, the longest prompt allowed, in the
        LLM's tokens: a query's farthest round of demonstrations (one per class)
        is dropped until its longest prompt (instruction, demonstrations, query
        and scored text) fits, counted by the backend's tokenizer; a prompt that
        does not fit with one round raises ``ValueError``. None is the model's
        context length (``max_position_embeddings`` of a local model; no bound
        for a server, which tokenises for itself: a server backend takes only
        None). Unused under ``"random"``, where ``n_examples_per_class`` and
        ``max_tokens_per_item`` set the length.
    label_scoring : {"channel_per_class", "channel", "loglik", "mean_loglik"}, \
            default="channel_per_class"
        Class score. ``"channel_per_class"``: each class gets a prompt of its
        own, holding only that class's demonstrations (written as for
        ``"channel"``, label first), and its score is the log-probability of
        the query's text after them, ``log p(input | the class's
        demonstrations)``. A small LLM that cannot bind a nonsense label to
        the demonstration after it still copies what its context holds: the
        query's tokens are likelier after demonstrations that share them. It
        is the default because it was the most accurate scoring measured
        (``docs/benchmarks.md``, "Channel per class"; embedded Gemma 3 270M, 9
        tokens per image, 200 Fashion-MNIST episodes per cell): 0.693 ±
        0.045 against 0.615 ± 0.044 for ``"channel"`` in 2-way 1-shot (paired
        +0.077 ± 0.049), 0.446 against 0.350 in 5-way 1-shot, 0.810 against
        0.703 in 2-way 5-shot: level with or above plain word overlap on the
        same text (0.645, 0.445, 0.812), where ``"channel"`` was below it.
        The class prompts together hold what the one prompt of ``"channel"``
        holds, and every class still scores one query text; the extra passes
        cost 1.14-1.25 times its LLM time (three cells measured).
        ``"channel"``: the noisy-channel score of Min et al. (2022), every
        class's demonstrations in one prompt and the log-probability of the
        query's text after each label, ``log p(input | label,
        demonstrations)``: Bayes' rule with equal class priors, so the LLM's
        preference for one label (the label of the last demonstration, a
        familiar word) cannot decide the answer. It costs one scored query
        text per class instead of one shared query; it was the most accurate
        of the one-prompt scorings in every cell of the episode grid.
        ``"loglik"``: the direct score, the log-probability of the label's text
        after the query (the sum over its tokens, i.e. the label as a whole):
        the closest of the four to the paper's protocol (Frozen's), which
        generates the label after the query.
        ``"mean_loglik"``: the direct score's mean per token, which does not
        penalise labels that take more tokens. ``predict_proba`` is the softmax
        of the scores over the classes.
    batch_size : int or None, default=None
        Queries per forward pass (local models) or prompts per request (servers);
        None uses the backend's default. Not allowed with a backend object.
    device : str, default="auto"
        Torch device of a local model (``"cpu"``, ``"cuda"``); ``"auto"`` picks CUDA
        when available. Only ``"auto"`` is allowed with a server or a backend object.
    llm_options : dict or None, default=None
        More keyword arguments for the backend: ``dtype``, ``reuse_prefix`` for a
        local model; ``model``, ``api_key_env``, ``timeout``, ``max_retries``,
        ``backoff``, ``max_backoff`` for a server. An API key itself is never a
        parameter (it would show in reprs and pickles): the server backend reads
        it from ``$OPENAI_API_KEY``, or from the variable ``api_key_env`` names,
        at each request.
    random_state : int, RandomState instance or None, default=None
        Chooses which demonstrations a prompt shows under
        ``demonstrations="random"``, never their order. Predictions do not
        depend on it under ``"nearest"`` (the default), nor when every example
        is used (``n_examples_per_class`` at least the size of each class).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels seen in ``fit``.
    label_texts_ : list of str
        ``str(c)`` for each class: the text written into the prompt.
    example_indices_ : ndarray of int
        Indices into the training ``X`` of the shared demonstrations, in their
        first order (``"random"``), or of every example (``"nearest"``; see
        :meth:`demonstrations_for`).
    prompt_ : FewShotPrompt
        The prompt: its template, ``label_scoring``, labels, instruction line
        (``header``), ``max_tokens_per_item`` (which cuts the queries as it cut
        the demonstrations) and the shared ``demonstrations`` in their first order
        (none under ``"nearest"``).
    prompt_prefix_ : str
        ``prompt_.prefix``: the instruction line and the shared demonstrations in
        their first order (under ``"nearest"``, the instruction line only). Under
        ``label_scoring="channel_per_class"`` no prompt holds them all: each
        class's prompt is the instruction line and that class's demonstrations
        (see :meth:`format_prompt`).
    orders_ : ndarray of int of shape (n_orders_used, n_demonstrations) or None
        The orders of the shared demonstrations, as positions into
        ``prompt_.demonstrations`` (row 0: the first order). None under
        ``"nearest"``, where each query's orders follow from its own number of
        demonstrations and ``n_orders_``, and under
        ``label_scoring="channel_per_class"``, where each class's prompt orders
        its own demonstrations (the same rule, applied per class).
    n_orders_ : int
        ``n_orders`` as read by ``fit``.
    calibration_ : None or str
        ``calibration`` as read by ``fit``.
    neighbors_ : NearestDemonstrations or None
        Under ``"nearest"``: the fitted vectorizer, one
        :class:`~sklearn.neighbors.NearestNeighbors` per class, and the training
        texts; None under ``"random"``.
    max_prompt_tokens_ : int or None
        The prompt-length bound in force under ``"nearest"`` (``max_prompt_tokens``
        or the model's context length); None when unbounded or under ``"random"``.
    backend_ : LanguageModelBackend
        The backend that scores prompts. Its weights are never pickled: they are
        reloaded (or taken from the per-process model cache) on first use.
    n_features_in_ : int
        Columns of ``X``; set when ``fit`` was given a 2-D array.

    Notes
    -----
    **When parameters take effect.** Everything is read by ``fit``: the prompt
    (``prompt``, ``instruction``, ``label_scoring``, ``max_tokens_per_item``,
    the demonstrations) is written into ``prompt_``, ``n_orders``,
    ``calibration`` and ``max_prompt_tokens`` into ``n_orders_``,
    ``calibration_`` and ``max_prompt_tokens_``, and the backend is built into
    ``backend_``. After ``set_params``, call ``fit`` again.

    **A failed fit.** A ``fit`` that raises leaves the estimator as it was: a
    fitted estimator keeps its previous fitted state, whole and usable
    (``transform``/``predict`` give what they gave before); an unfitted one stays
    unfitted. Whatever makes it raise (a bad parameter, ``X`` or ``y``, a model
    or server that cannot be loaded), ``fit`` computes everything first and
    assigns the fitted attributes only once all of it has succeeded.

    **Inputs.** ``X`` is a 1-D sequence of texts, or a 2-D array (or DataFrame)
    whose rows are sequences of tokens: each row's cells are written as text and
    joined by single spaces, so a one-column array holds its texts as they are
    and a row of token ids becomes the ids written out.

    **Demonstration order.** Demonstrations are interleaved: one example per
    class, classes in the order of ``classes_``, then the next round, so that no
    class sits only at the end of the prompt. Within a class, random
    demonstrations follow their order in the training ``X`` and nearest ones go
    from the farthest to the nearest. That first order is a function of which
    demonstrations were chosen alone, and the other orders are its rotations or
    permutations (``n_orders``), so ``random_state`` changes predictions only
    through which demonstrations it chooses. Under
    ``label_scoring="channel_per_class"`` each class's prompt holds that class's
    demonstrations in the same within-class order. With a local model, each
    prompt's keys and values are computed once per ``predict`` call and reused
    for every query of that call that reads it (see
    ``benchmarks/fewshot_speed.py``); under ``"nearest"``, queries whose nearest
    examples of a class are the same share that class's prompt.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from lqae_sklearn import LLMFewShotClassifier, LQAETokenizer
    >>> X = ["examples/fashion-mnist/bag/00018.png", "examples/fashion-mnist/sneaker/00012.png"]
    >>> few_shot = make_pipeline(LQAETokenizer(output="text"), LLMFewShotClassifier(random_state=0))
    >>> few_shot.fit(X, ["dax", "blicket"])  # doctest: +SKIP
    >>> few_shot.predict_proba(["examples/fashion-mnist/bag/00030.png"]).shape  # doctest: +SKIP
    (1, 2)
    """

    _parameter_constraints: dict = {
        "llm": [None, str, os.PathLike, LanguageModelBackend],
        "n_examples_per_class": [Interval(Integral, 1, None, closed="left")],
        "demonstrations": [StrOptions(set(DEMONSTRATIONS))],
        "n_orders": [Interval(Integral, 1, None, closed="left")],
        "calibration": [None, StrOptions(set(CALIBRATIONS))],
        "prompt": [None, str],
        "instruction": [None, str],
        "max_tokens_per_item": [Interval(Integral, 1, None, closed="left"), None],
        "max_prompt_tokens": [Interval(Integral, 1, None, closed="left"), None],
        "label_scoring": [StrOptions(set(LABEL_SCORINGS))],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "device": [str],
        "llm_options": [None, dict],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        llm=None,
        *,
        n_examples_per_class=DEFAULT_N_EXAMPLES_PER_CLASS,
        demonstrations=DEFAULT_DEMONSTRATIONS,
        n_orders=DEFAULT_N_ORDERS,
        calibration=DEFAULT_CALIBRATION,
        prompt=None,
        instruction=None,
        max_tokens_per_item=None,
        max_prompt_tokens=None,
        label_scoring=DEFAULT_LABEL_SCORING,
        batch_size=None,
        device="auto",
        llm_options=None,
        random_state=None,
    ):
        self.llm = llm
        self.n_examples_per_class = n_examples_per_class
        self.demonstrations = demonstrations
        self.n_orders = n_orders
        self.calibration = calibration
        self.prompt = prompt
        self.instruction = instruction
        self.max_tokens_per_item = max_tokens_per_item
        self.max_prompt_tokens = max_prompt_tokens
        self.label_scoring = label_scoring
        self.batch_size = batch_size
        self.device = device
        self.llm_options = llm_options
        self.random_state = random_state

    # -- scikit-learn plumbing -----------------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True  # rows of tokens (see Notes)
        tags.input_tags.string = True
        tags.classifier_tags.poor_score = True
        return tags

    def __sklearn_is_fitted__(self):
        return hasattr(self, "prompt_")

    @property
    def prompt_prefix_(self) -> str:
        check_is_fitted(self)
        return self.prompt_.prefix

    # -- fit -------------------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Choose the demonstrations, write the prompt and get the LLM ready.

        Parameters
        ----------
        X : array-like of str of shape (n_samples,), or 2-D array-like of tokens
            Input texts (for LQAE, token text); see Notes for 2-D input.
        y : array-like of shape (n_samples,)
            Class labels; ``str(label)`` is what the prompt shows.

        Returns
        -------
        self : LLMFewShotClassifier
            The fitted classifier.
        """
        # Everything is computed into locals and assigned at the end: a fit that raises changes nothing (Notes).
        texts, columns = self._texts(X, fitting=True)
        y = column_or_1d(y, warn=True)
        check_consistent_length(texts, y)
        check_classification_targets(y)
        if self.instruction is not None:
            check_instruction(self.instruction)
        options = self._backend_options()

        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"y has {len(classes)} class; few-shot classification needs at least 2")
        label_texts = [str(c) for c in classes]
        for c, text in zip(classes, label_texts):
            if not text.strip():
                raise ValueError(f"class {c!r} has an empty label text; the LLM cannot be asked for it")
        if len(set(label_texts)) != len(label_texts):
            raise ValueError(f"classes {list(classes)!r} do not have distinct label texts {label_texts!r}")

        # The demonstrations: which ones is random (or per query), their order never is (see Notes).
        class_index = np.searchsorted(classes, y)
        prompt_per_class = self.label_scoring == "channel_per_class"
        neighbors = None
        if self.demonstrations == "random":
            rng = check_random_state(self.random_state)
            chosen = [np.sort(rng.permutation(np.flatnonzero(class_index == k))[: self.n_examples_per_class])
                      for k in range(len(classes))]
            pairs = interleave(chosen)
            shared = [(texts[i], k) for i, k in pairs]
            example_indices = np.array([i for i, _ in pairs], dtype=np.int64)
            orders = None if prompt_per_class else demonstration_orders(len(pairs), self.n_orders)
        else:
            cut = [first_tokens(text, self.max_tokens_per_item) for text in texts]
            neighbors = NearestDemonstrations(self.n_examples_per_class).fit(cut, class_index, len(classes))
            shared, example_indices, orders = [], np.arange(len(texts), dtype=np.int64), None
        prompt = FewShotPrompt.build(self.prompt, self.label_scoring, label_texts, shared, self.instruction,
                                     self.max_tokens_per_item)
        backend, backend_source = self._backend(options)  # may fail (a server down, a missing folder)
        max_prompt_tokens = self._prompt_limit(backend) if neighbors is not None else None

        self.classes_ = classes
        self.label_texts_ = label_texts
        self.example_indices_ = example_indices
        self.prompt_ = prompt
        self.orders_ = orders
        self.n_orders_ = int(self.n_orders)
        self.calibration_ = self.calibration
        self.neighbors_ = neighbors
        self.max_prompt_tokens_ = max_prompt_tokens
        self.backend_ = backend
        self._backend_source = backend_source
        for name, value in columns.items():  # set for 2-D X, removed for 1-D texts
            if value is None:
                self.__dict__.pop(name, None)
            else:
                setattr(self, name, value)
        return self

    def _prompt_limit(self, backend) -> int | None:
        """The longest prompt allowed under nearest demonstrations: ``max_prompt_tokens``, else the model's context."""
        if self.max_prompt_tokens is None:
            return backend.context_length
        if backend.prompt_length("", [""], ["x"]) is None:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} needs a backend that counts tokens (a "
                             f"local model); {backend!r} cannot: leave max_prompt_tokens=None and bound the prompt "
                             f"with n_examples_per_class and max_tokens_per_item")
        return int(self.max_prompt_tokens)

    def _backend_options(self) -> dict:
        options = dict(self.llm_options or {})
        if "api_key" in options:
            raise ValueError(
                "llm_options must not hold an API key (it would show in repr, get_params and pickles); set "
                "$OPENAI_API_KEY, or name another environment variable with llm_options={'api_key_env': ...}"
            )
        is_object = isinstance(self.llm, LanguageModelBackend)
        is_server = isinstance(self.llm, str) and self.llm.startswith(("http://", "https://"))  # a path is local
        if self.batch_size is not None:
            if is_object:
                raise ValueError("batch_size cannot be set when llm is a backend object; configure the backend")
            options["batch_size"] = self.batch_size
        if self.device != "auto":
            if is_object or is_server:
                raise ValueError(f"device applies to local models only, not to llm={self.llm!r}")
            options["device"] = self.device
        return options

    def _backend(self, options: dict) -> tuple[LanguageModelBackend, tuple]:
        """The loaded backend for ``llm`` and ``options``, and what it was built from.

        The current backend when neither changed since the last fit (a refit keeps the loaded model).
        """
        source = (self.llm, repr(sorted(options.items(), key=repr)))
        current, built_from = self.__dict__.get("backend_"), self.__dict__.get("_backend_source")
        if current is not None and built_from is not None and built_from[0] is source[0] and built_from[1] == source[1]:
            return current, built_from
        if isinstance(self.llm, LanguageModelBackend):
            backend = copy.copy(self.llm)  # loading sets state on the backend: never on the caller's object
        else:
            backend = make_backend(None if self.llm is None else os.fspath(self.llm), **options)
        backend.load()
        return backend, source

    def __setstate__(self, state):
        backend = state.get("backend_")
        if isinstance(backend, HuggingFaceBackend) and unavailable_device(backend.device):
            backend = copy.copy(backend)
            backend.device = device_here(backend.device, backend.device, type(self).__name__)
            state = {**state, "backend_": backend}
        super().__setstate__(state)

    # -- inputs --------------------------------------------------------------------------------------------
    def _texts(self, X, fitting: bool = False) -> tuple[list[str], dict]:
        """``(texts, columns)`` from 1-D texts or 2-D rows of tokens (checked as scikit-learn checks tables).

        ``columns`` holds the values of ``n_features_in_`` and ``feature_names_in_``
        that ``X`` gives (None: unset). In fit (``fitting=True``) they are only
        returned, for fit to assign once everything else has succeeded; after fit,
        2-D ``X`` must have the fitted columns.
        """
        if isinstance(X, (str, bytes)):
            raise TypeError("X must be a sequence of texts, not a single string")
        table = sp.issparse(X) or hasattr(X, "columns")
        array = None if table else np.asarray(X, dtype=object)
        columns = {"n_features_in_": None, "feature_names_in_": None}
        if table or array.ndim == 2:
            if fitting:
                rows = check_array(X, dtype=None, estimator=self, input_name="X")
            else:
                rows = validate_data(self, X, reset=False, dtype=None)
            columns = {"n_features_in_": rows.shape[1], "feature_names_in_": _get_feature_names(X)}
            texts = [" ".join(str(cell) for cell in row) for row in rows]
        elif array.ndim != 1:
            raise ValueError(f"X must be 1-D texts or a 2-D array of tokens, got shape {array.shape}")
        elif array.shape[0] == 0:
            raise ValueError("X is empty")
        else:
            texts = []
            for i, item in enumerate(array):
                if not isinstance(item, str):
                    raise ValueError(f"X[{i}] must be a str, got {type(item).__name__}: {item!r}. Reshape your "
                                     f"data to 2-D for rows of tokens (a 1-D X holds texts)")
                texts.append(str(item))
        return texts, columns

    # -- prediction ---------------------------------------------------------------------------------------
    def demonstrations_for(self, X) -> list[np.ndarray]:
        """The labelled examples each query's prompt shows, in their first order.

        Parameters
        ----------
        X : array-like of str of shape (n_samples,), or 2-D array-like of tokens
            Query texts.

        Returns
        -------
        list of ndarray of int
            For each query, indices into the training ``X``: ``example_indices_``
            for every query under ``demonstrations="random"``, the query's nearest
            examples under ``"nearest"``. The other orders are the rows of
            :func:`~lqae_sklearn.llm._prompt.demonstration_orders` applied to it.
        """
        check_is_fitted(self)
        texts = self._texts(X)[0]
        if self.neighbors_ is None:
            return [self.example_indices_.copy() for _ in texts]
        return [np.array([i for i, _ in pairs], dtype=np.int64) for pairs in self._nearest_pairs(texts)]

    def _nearest_pairs(self, texts) -> list[list[tuple[int, int]]]:
        """Each query's ``(training index, class)`` demonstrations (nearest last), as many rounds as the prompt holds."""
        found = self.neighbors_.nearest([first_tokens(t, self.prompt_.max_tokens_per_item) for t in texts])
        if self.max_prompt_tokens_ is None:
            return [nearest_last(per_class) for per_class in found]
        limit, pool = self.max_prompt_tokens_, self.neighbors_.texts_
        chosen = []
        for i, (text, per_class) in enumerate(zip(texts, found)):
            queries, continuations = self._requests([text])
            rounds = max(len(items) for items in per_class)
            while True:
                pairs = nearest_last(per_class, rounds)
                length = self._longest_prompt([(pool[j], k) for j, k in pairs], queries, continuations)
                if length <= limit:
                    break
                if rounds == 1:
                    raise ValueError(
                        f"X[{i}]: its prompt with one demonstration per class takes {length} tokens, more than "
                        f"max_prompt_tokens={limit} (the model's context length unless set); raise "
                        f"max_prompt_tokens or cut the texts with max_tokens_per_item"
                    )
                rounds -= 1
            chosen.append(pairs)
        return chosen

    def _longest_prompt(self, demos, queries, continuations) -> int:
        """Tokens of the longest prompt a query with demonstrations ``demos`` is scored in (see ``_requests``)."""
        if not self.prompt_.per_class:
            return self.backend_.prompt_length(self.prompt_.write(demos), queries, continuations)
        return max(self.backend_.prompt_length(self.prompt_.write(self.prompt_.class_demonstrations(demos, k)),
                                               [queries[k]], continuations) for k in range(len(self.classes_)))

    def format_prompt(self, text: str, label=None) -> str:
        """The exact text the LLM reads for ``text`` in the first order: the prompt, then ``label`` scored after it.

        Parameters
        ----------
        text : str
            One query text.
        label : object or None, default=None
            One of ``classes_``. None gives the prompt up to the scored part (direct
            scorings only: the LLM is asked for a label). With a class, the whole text
            whose last part, the label (direct) or the input (channel), is scored.

        Returns
        -------
        str
            The prompt text, with the demonstrations in their first order (the
            query is also scored under the other orders of ``orders_``).
        """
        check_is_fitted(self)
        (text,), _ = self._texts([text])
        demonstrations = None
        if self.neighbors_ is not None:
            demonstrations = [(self.neighbors_.texts_[j], k) for j, k in self._nearest_pairs([text])[0]]
        if label is None:
            return self.prompt_.render(text, demonstrations=demonstrations)
        matches = np.flatnonzero(self.classes_ == label)
        if matches.size == 0:
            raise ValueError(f"label {label!r} is not one of the classes {list(self.classes_)!r}")
        return self.prompt_.render(text, int(matches[0]), demonstrations)

    def scoring_requests(self, X) -> tuple[list[str], list[str]]:
        """What :meth:`predict_proba` asks the backend to score after the demonstrations of each prompt.

        Parameters
        ----------
        X : array-like of str of shape (n_samples,), or 2-D array-like of tokens
            Query texts.

        Returns
        -------
        queries : list of str
            The text appended to the demonstrations (in each order) for each query.
        continuations : list of str
            The continuations scored after every ``demonstrations + query`` (see
            :meth:`FewShotPrompt.requests`).
        """
        check_is_fitted(self)
        return self.prompt_.requests(self._texts(X)[0])

    def _requests(self, texts) -> tuple[list[str], list[str]]:
        """``prompt_.requests(texts)`` with the content-free inputs appended when calibrating with them."""
        queries, continuations = self.prompt_.requests(texts)
        if self.calibration_ != "content_free":
            return queries, continuations
        free_queries, free_continuations = self.prompt_.requests(CONTENT_FREE_INPUTS)
        if self.prompt_.channel:  # an input is a continuation; "" may write none
            return queries, continuations + [c for c in free_continuations if c]
        return queries + free_queries, continuations

    def _prompts(self, texts) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Every prompt prefix to score, the queries (indices into ``texts``) and the classes it is scored for.

        A prompt of all classes' demonstrations scores every class; under
        ``"channel_per_class"`` each class's prompt scores that class alone.
        """
        if self.neighbors_ is None:
            return self._ordered_prompts(self.prompt_.demonstrations, np.arange(len(texts)))
        # Queries that share a prompt are scored in it together: under "channel_per_class", every query whose
        # nearest examples of one class are the same shares that class's prompt, whatever its other classes'.
        groups: dict[tuple, list[int]] = {}
        pool = self.neighbors_.texts_
        for i, pairs in enumerate(self._nearest_pairs(texts)):
            for prefix, _, classes in self._ordered_prompts([(pool[j], k) for j, k in pairs], None):
                groups.setdefault((prefix, tuple(classes)), []).append(i)
        return [(prefix, np.array(members), np.array(classes)) for (prefix, classes), members in groups.items()]

    def _ordered_prompts(self, demos, members) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """The prompts of ``demos`` (``(text, class)`` pairs in their first order) in each of their orders."""
        groups = [(demos, np.arange(len(self.classes_)))]
        if self.prompt_.per_class:  # each class its own prompt, its own orders
            groups = [(self.prompt_.class_demonstrations(demos, k), np.array([k]))
                      for k in range(len(self.classes_))]
        return [(self.prompt_.write([group[j] for j in order]), members, classes)
                for group, classes in groups for order in demonstration_orders(len(group), self.n_orders_)]

    def _order_scores(self, prefix: str, texts, classes) -> np.ndarray:
        """(len(texts), len(classes)) scores of ``classes`` for ``texts`` after ``prefix``, less the content-free ones if asked."""
        queries, continuations = self._requests(texts)
        if self.prompt_.channel:  # one query per label: score only the classes this prompt is for
            queries = [queries[k] for k in classes]
        result = self.backend_.score(prefix, queries, continuations)
        scoring = self.prompt_.label_scoring
        scores = result.mean() if scoring == "mean_loglik" else result.logprob
        if self.prompt_.channel:
            scores = scores.T  # (inputs, labels)
        else:
            scores = scores[:, classes]
        n = len(texts)
        if self.calibration_ == "content_free":
            return scores[:n] - scores[n:].mean(axis=0, keepdims=True)
        return scores

    def _scores(self, X) -> np.ndarray:
        """(n_samples, n_classes) class scores: averaged over the orders, then calibrated."""
        check_is_fitted(self)
        texts = self._texts(X)[0]
        total = np.zeros((len(texts), len(self.classes_)))
        count = np.zeros((len(texts), len(self.classes_)))
        for prefix, members, classes in self._prompts(texts):
            total[np.ix_(members, classes)] += self._order_scores(prefix, [texts[i] for i in members], classes)
            count[np.ix_(members, classes)] += 1
        scores = total / count
        return batch_calibrated(scores) if self.calibration_ == "batch" else scores

    def decision_function(self, X):
        """Class scores: log-likelihoods of each label after the query, or of the query after each label (channel).

        Parameters
        ----------
        X : array-like of str of shape (n_samples,), or 2-D array-like of tokens
            Query texts.

        Returns
        -------
        scores : ndarray of shape (n_samples, n_classes), or (n_samples,)
            For two classes, the score of ``classes_[1]`` minus that of ``classes_[0]``.
        """
        scores = self._scores(X)
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X):
        """Softmax over classes of the class scores.

        Parameters
        ----------
        X : array-like of str of shape (n_samples,), or 2-D array-like of tokens
            Query texts.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Class probabilities in the order of ``classes_``; rows sum to 1.
        """
        return np.exp(self.predict_log_proba(X))

    def predict_log_proba(self, X):
        """Log of :meth:`predict_proba`.

        Parameters
        ----------
        X : array-like of str of shape (n_samples,), or 2-D array-like of tokens
            Query texts.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
            Log class probabilities in the order of ``classes_``.
        """
        scores = self._scores(X)
        top = scores.max(axis=1, keepdims=True)
        return scores - (top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True)))

    def predict(self, X):
        """The class whose score is highest for each query (never an unseen label).

        Parameters
        ----------
        X : array-like of str of shape (n_samples,), or 2-D array-like of tokens
            Query texts.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
            Predicted classes, values of ``classes_``.
        """
        scores = self._scores(X)  # checks fitted-ness before classes_ is read
        return self.classes_[np.argmax(scores, axis=1)]

"""Few-shot prompts: demonstrations in a template, and what a backend must score for each query.

Two ways to score a class. *Direct* (``"loglik"``, ``"mean_loglik"``): how likely
is the class's label after the query? *Channel* (Min et al., 2022, "Noisy Channel
Language Model Prompting for Few-Shot Text Classification"): each demonstration
is written label first, and the score is how likely the query's text is after
each label. A small LLM prefers some labels whatever the input (the last
demonstration's, a familiar word); the channel score cannot be decided by such a
preference, since every class is scored on the same text.

*Channel per class* (``"channel_per_class"``) scores the same text, the query's, but
gives each class a prompt of its own that holds only that class's demonstrations:
the score is ``log p(input | the class's demonstrations)``. A small LLM that cannot
bind a nonsense label to the demonstration written after it still copies what its
context holds, so the query's tokens are likelier after the demonstrations that
share them (in-context copying). Every class is scored on the same text, as in the
channel scoring, and no prompt shows two labels for the LLM to confuse.
"""

from __future__ import annotations

import itertools
import math
import string
from dataclasses import dataclass

import numpy as np

DEFAULT_PROMPT = "Input: {input}\nOutput: {label}\n"
#: Channel scoring reads the label first, then the input it explains.
DEFAULT_CHANNEL_PROMPT = "{label}: {input}\n"
LABEL_SCORINGS = ("loglik", "mean_loglik", "channel", "channel_per_class")
#: The scorings that score the input after the label (label-first templates).
CHANNEL_SCORINGS = ("channel", "channel_per_class")
_SENTINEL_INPUT, _SENTINEL_LABEL = "\x00input\x00", "\x00label\x00"


@dataclass(frozen=True)
class FewShotPrompt:
    """A written few-shot prompt: everything a classifier needs to ask a backend for scores.

    Attributes
    ----------
    template : str
        The demonstration template, with ``{input}`` and ``{label}``.
    label_scoring : {"loglik", "mean_loglik", "channel", "channel_per_class"}
        Which of the two fields is scored (the label, or for the channel
        scorings the input), and whether a prompt shows every class.
    labels : tuple of str
        The class labels as the prompt writes them.
    header : str
        The instruction line ("" when there is none): the start of every prompt.
    demonstrations : tuple of (str, int)
        The demonstrations every query shares, ``(input text, label index)``, in
        their first order, inputs already cut to ``max_tokens_per_item``; empty
        when each query gets its own (``demonstrations="nearest"``).
    max_tokens_per_item : int or None
        How many whitespace-separated tokens of each input, demonstration or
        query, the prompt writes (None: all of them).
    """

    template: str
    label_scoring: str
    labels: tuple
    header: str
    demonstrations: tuple
    max_tokens_per_item: int | None = None

    @classmethod
    def build(cls, template, label_scoring, labels, demonstrations, instruction=None,
              max_tokens_per_item=None) -> "FewShotPrompt":
        """Check ``template`` and keep ``demonstrations`` (``(input text, label index)`` pairs, in order).

        ``template=None`` picks the scoring's default. ``instruction`` (with an
        optional ``{labels}`` field) becomes a first line. Every input, here and in
        the queries, is cut to its first ``max_tokens_per_item`` tokens.
        """
        if template is None:
            template = DEFAULT_CHANNEL_PROMPT if label_scoring in CHANNEL_SCORINGS else DEFAULT_PROMPT
        split_template(template, _field_order(label_scoring))  # raises on a bad template
        line = ""
        if instruction is not None:
            line = instruction.format(labels=", ".join(labels))
            if not line.endswith("\n"):
                line += "\n"
        demonstrations = tuple((first_tokens(text, max_tokens_per_item), int(k)) for text, k in demonstrations)
        return cls(template, label_scoring, tuple(labels), line, demonstrations, max_tokens_per_item)

    def write(self, demonstrations=None) -> str:
        """The prompt up to the query: the header, then ``demonstrations`` (default: the shared ones) in order.

        ``demonstrations`` are ``(input text, label index)`` pairs; their inputs are
        cut to ``max_tokens_per_item`` tokens.
        """
        if demonstrations is None:
            demonstrations = self.demonstrations
        head, between, tail = split_template(self.template, _field_order(self.label_scoring))
        channel = self.channel
        written = []
        for text, k in demonstrations:
            text = first_tokens(text, self.max_tokens_per_item)
            first, second = (self.labels[k], text) if channel else (text, self.labels[k])
            written.append(head + first + between + second + tail)
        return self.header + "".join(written)

    @property
    def channel(self) -> bool:
        """Whether the input is scored after the label (``"channel"``, ``"channel_per_class"``)."""
        return self.label_scoring in CHANNEL_SCORINGS

    @property
    def per_class(self) -> bool:
        """Whether each class gets a prompt of its own demonstrations (``"channel_per_class"``)."""
        return self.label_scoring == "channel_per_class"

    @staticmethod
    def class_demonstrations(demonstrations, label_index: int) -> list:
        """The ``(input text, label index)`` pairs of ``demonstrations`` whose label is ``label_index``, in order."""
        return [(text, k) for text, k in demonstrations if k == label_index]

    @property
    def prefix(self) -> str:
        """The header and the shared demonstrations in their first order: what :meth:`write` writes by default."""
        return self.write()

    def requests(self, texts) -> tuple[list[str], list[str]]:
        """``(queries, continuations)``: the backend scores every continuation after every ``prefix + query``.

        Direct scorings: one query per text (the prompt up to the label) and one
        continuation per label. Channel: one query per label (the prompt up to the
        input) and one continuation per text. Spaces right before the scored
        field go with it: " dax" is one word to the LLM.
        """
        texts = [first_tokens(text, self.max_tokens_per_item) for text in texts]
        head, between, tail = split_template(self.template, _field_order(self.label_scoring))
        stripped = between.rstrip(" ")
        spaces = between[len(stripped):]
        fields, scored = (self.labels, texts) if self.channel else (texts, self.labels)
        return [head + f + stripped for f in fields], [spaces + s + tail for s in scored]

    def render(self, text: str, label_index: int | None = None, demonstrations=None) -> str:
        """The exact text the LLM reads for ``text``: up to the scored part, or with label ``label_index`` scored.

        ``demonstrations`` as in :meth:`write` (default: the shared ones); under
        ``"channel_per_class"`` only those of class ``label_index`` are written.
        """
        if demonstrations is None:
            demonstrations = self.demonstrations
        if self.per_class and label_index is not None:
            demonstrations = self.class_demonstrations(demonstrations, label_index)
        prefix = self.write(demonstrations)
        queries, continuations = self.requests([text])
        if label_index is None:
            if self.channel:
                raise ValueError(f"{self.label_scoring} scoring reads the input after each label: pass a label to "
                                 f"see one prompt")
            return prefix + queries[0]
        if self.channel:
            return prefix + queries[label_index] + continuations[0]
        return prefix + queries[0] + continuations[label_index]


def demonstration_orders(n_demonstrations: int, n_orders: int) -> np.ndarray:
    """The orders in which ``n_demonstrations`` demonstrations are written: rows of positions into their first order.

    All ``n!`` orders (the first order first) when ``n! <= n_orders``. Otherwise
    rotations of the first order: shifts ``0, 1, ..., m - 1`` with
    ``m = min(n_orders, n)``; with ``m = n`` every demonstration stands at every
    position exactly once, and with fewer each stands at ``m`` consecutive ones.
    A rotation of interleaved demonstrations (one per class, round after round)
    stays interleaved, and ``m`` consecutive shifts put each class last
    ``m / n_classes`` times when ``m`` is a multiple of the number of classes.

    Parameters
    ----------
    n_demonstrations : int
        How many demonstrations the prompt holds (0 gives one empty order).
    n_orders : int
        The most orders wanted (at least 1).

    Returns
    -------
    ndarray of int of shape (n_orders_used, n_demonstrations)
        Row ``o`` lists, position by position, which demonstration of the first
        order stands there; row 0 is the first order itself.

    Examples
    --------
    >>> from lqae_sklearn.llm._prompt import demonstration_orders
    >>> demonstration_orders(2, 4).tolist()
    [[0, 1], [1, 0]]
    >>> demonstration_orders(4, 4).tolist()
    [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]
    """
    n, wanted = int(n_demonstrations), int(n_orders)
    if n < 0 or wanted < 1:
        raise ValueError(f"need n_demonstrations >= 0 and n_orders >= 1, got {n} and {wanted}")
    if n <= 1:
        return np.arange(n, dtype=np.int64)[None, :]
    if math.factorial(n) <= wanted:
        return np.array(list(itertools.permutations(range(n))), dtype=np.int64)
    shifts = np.arange(min(wanted, n))
    return (np.arange(n)[None, :] + shifts[:, None]) % n


def first_tokens(text: str, limit: int | None) -> str:
    """``text`` cut to its first ``limit`` whitespace-separated tokens (all of it when ``limit`` is None)."""
    if limit is None:
        return text
    tokens = text.split()
    return text if len(tokens) <= limit else " ".join(tokens[:limit])


def _field_order(label_scoring: str) -> tuple[str, str]:
    return ("label", "input") if label_scoring in CHANNEL_SCORINGS else ("input", "label")


def check_instruction(instruction) -> None:
    """An instruction line may use only the ``{labels}`` field."""
    fields = {f for _, f, _, _ in string.Formatter().parse(instruction) if f is not None}
    if fields - {"labels"}:
        raise ValueError(f"instruction may only contain the field {{labels}}, found {sorted(fields - {'labels'})}")


def split_template(prompt, order=("input", "label")) -> tuple[str, str, str]:
    """Split a demonstration template into (text before the first field, between, after the second)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str template, got {type(prompt).__name__}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(prompt) if f is not None]
    except ValueError as exc:
        raise ValueError(f"prompt {prompt!r} is not a valid format string: {exc}") from exc
    if [f for f, _, _ in fields] != list(order):
        scorings = "channel scoring" if order[0] == "label" else "label_scoring='loglik' or 'mean_loglik'"
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

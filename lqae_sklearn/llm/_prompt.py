"""Few-shot prompts: demonstrations in a template, and what a backend must score for each query.

Two ways to score a class. *Direct* (``"loglik"``, ``"mean_loglik"``): how likely
is the class's label after the query? *Channel* (Min et al., 2022, "Noisy Channel
Language Model Prompting for Few-Shot Text Classification"): each demonstration
is written label first, and the score is how likely the query's text is after
each label. A small LLM prefers some labels whatever the input (the last
demonstration's, a familiar word); the channel score cannot be decided by such a
preference, since every class is scored on the same text.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

DEFAULT_PROMPT = "Input: {input}\nOutput: {label}\n"
#: Channel scoring reads the label first, then the input it explains.
DEFAULT_CHANNEL_PROMPT = "{label}: {input}\n"
LABEL_SCORINGS = ("loglik", "mean_loglik", "channel")
_SENTINEL_INPUT, _SENTINEL_LABEL = "\x00input\x00", "\x00label\x00"


@dataclass(frozen=True)
class FewShotPrompt:
    """A written few-shot prompt: everything a classifier needs to ask a backend for scores.

    Attributes
    ----------
    template : str
        The demonstration template, with ``{input}`` and ``{label}``.
    label_scoring : {"loglik", "mean_loglik", "channel"}
        Which of the two fields is scored (the label, or for channel the input).
    labels : tuple of str
        The class labels as the prompt writes them.
    prefix : str
        The instruction line and the demonstrations: shared by every query.
    max_tokens_per_item : int or None
        How many whitespace-separated tokens of each input, demonstration or
        query, the prompt writes (None: all of them).
    """

    template: str
    label_scoring: str
    labels: tuple
    prefix: str
    max_tokens_per_item: int | None = None

    @classmethod
    def build(cls, template, label_scoring, labels, demonstrations, instruction=None,
              max_tokens_per_item=None) -> "FewShotPrompt":
        """Write ``demonstrations`` (``(input text, label index)`` pairs, in order) into ``template``.

        ``template=None`` picks the scoring's default. ``instruction`` (with an
        optional ``{labels}`` field) becomes a first line. Every input, here and in
        the queries, is cut to its first ``max_tokens_per_item`` tokens.
        """
        if template is None:
            template = DEFAULT_CHANNEL_PROMPT if label_scoring == "channel" else DEFAULT_PROMPT
        head, between, tail = split_template(template, _field_order(label_scoring))
        channel = label_scoring == "channel"
        written = []
        for text, k in demonstrations:
            text = first_tokens(text, max_tokens_per_item)
            first, second = (labels[k], text) if channel else (text, labels[k])
            written.append(head + first + between + second + tail)
        line = ""
        if instruction is not None:
            line = instruction.format(labels=", ".join(labels))
            if not line.endswith("\n"):
                line += "\n"
        return cls(template, label_scoring, tuple(labels), line + "".join(written), max_tokens_per_item)

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
        fields, scored = (self.labels, texts) if self.label_scoring == "channel" else (texts, self.labels)
        return [head + f + stripped for f in fields], [spaces + s + tail for s in scored]

    def render(self, text: str, label_index: int | None = None) -> str:
        """The exact text the LLM reads for ``text``: up to the scored part, or with label ``label_index`` scored."""
        queries, continuations = self.requests([text])
        if label_index is None:
            if self.label_scoring == "channel":
                raise ValueError("channel scoring reads the input after each label: pass a label to see one prompt")
            return self.prefix + queries[0]
        if self.label_scoring == "channel":
            return self.prefix + queries[label_index] + continuations[0]
        return self.prefix + queries[0] + continuations[label_index]


def first_tokens(text: str, limit: int | None) -> str:
    """``text`` cut to its first ``limit`` whitespace-separated tokens (all of it when ``limit`` is None)."""
    if limit is None:
        return text
    tokens = text.split()
    return text if len(tokens) <= limit else " ".join(tokens[:limit])


def _field_order(label_scoring: str) -> tuple[str, str]:
    return ("label", "input") if label_scoring == "channel" else ("input", "label")


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

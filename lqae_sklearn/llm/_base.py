"""What every LLM backend offers: log-likelihoods of continuations after a shared prefix.

A few-shot prompt is ``prefix + query + continuation``: the *prefix* (task line and
demonstrations) is the same for every query, the *query* is one input, and each
*continuation* is one candidate label. A backend returns, for every query and every
continuation, the summed log-probability of the continuation's tokens and how many
tokens it has, so that the caller can normalise as it likes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class LLMBackendError(RuntimeError):
    """A language-model backend could not score a prompt.

    Examples
    --------
    >>> from lqae_sklearn.llm import LLMBackendError, LLMServerError
    >>> issubclass(LLMServerError, LLMBackendError)
    True
    """


@dataclass(frozen=True)
class ContinuationScores:
    """Log-likelihoods of each continuation after each query.

    Parameters
    ----------
    logprob : ndarray of shape (n_queries, n_continuations), float64
        Sum over the continuation's tokens of ``log p(token | everything before it)``.
    n_tokens : ndarray of shape (n_queries, n_continuations), int64
        How many tokens each continuation was scored over. With a local tokenizer it
        is the same for every query; an HTTP server tokenises the whole prompt, so a
        token that straddles the query/label boundary can change it per query.

    Examples
    --------
    >>> import numpy as np
    >>> from lqae_sklearn.llm import ContinuationScores
    >>> scores = ContinuationScores(np.array([[-2.0, -6.0]]), np.array([[1, 2]]))
    >>> scores.mean()
    array([[-2., -3.]])
    """

    logprob: np.ndarray
    n_tokens: np.ndarray

    def mean(self) -> np.ndarray:
        """Per-token mean log-probability (length-normalised score).

        Returns
        -------
        ndarray of shape (n_queries, n_continuations)
            ``logprob / n_tokens``.
        """
        return self.logprob / np.maximum(self.n_tokens, 1)


class LanguageModelBackend(ABC):
    """Scores continuations of a shared prompt prefix with a causal language model.

    Subclasses keep only plain configuration as state that survives pickling and
    copying; loaded weights and open connections are rebuilt on first use.

    Examples
    --------
    >>> from lqae_sklearn.llm import HuggingFaceBackend, LanguageModelBackend
    >>> issubclass(HuggingFaceBackend, LanguageModelBackend)
    True
    """

    def load(self) -> "LanguageModelBackend":
        """Make the backend ready (load weights, resolve names). Idempotent.

        Returns
        -------
        LanguageModelBackend
            ``self``.
        """
        return self

    @abstractmethod
    def score(
        self, prefix: str, queries: Sequence[str], continuations: Sequence[str]
    ) -> ContinuationScores:
        """Score every continuation after ``prefix + query`` for every query.

        Parameters
        ----------
        prefix : str
            Text shared by all prompts (instruction and demonstrations).
        queries : sequence of str
            One text per query, appended to ``prefix``.
        continuations : sequence of str
            Candidate continuations (for example ``" dax\\n"``), each scored after
            every ``prefix + query``.
        """

    def prompt_length(self, prefix: str, queries: Sequence[str], continuations: Sequence[str]) -> int | None:
        """Tokens the model reads for the longest of the prompts ``prefix + query + continuation``.

        The base class cannot tell (a server tokenises prompts itself) and returns
        None; a backend with a local tokenizer counts.

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
        int or None
            The token count of the longest prompt, or None.
        """
        return None

    @property
    def context_length(self) -> int | None:
        """The longest prompt, in tokens, the model takes; None when unknown."""
        return None

    @property
    @abstractmethod
    def identity(self) -> str:
        """A short string naming the model behind the backend (for repr and errors)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity!r})"


def check_score_arguments(prefix, queries, continuations) -> tuple[str, list[str], list[str]]:
    """Validate the arguments of :meth:`LanguageModelBackend.score`."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    queries = list(queries)
    continuations = list(continuations)
    for name, items in (("queries", queries), ("continuations", continuations)):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(item).__name__}")
    if not continuations:
        raise ValueError("continuations is empty: there is nothing to score")
    for i, item in enumerate(continuations):
        if not item:
            raise ValueError(f"continuations[{i}] is the empty string; it has no tokens to score")
    return prefix, queries, continuations

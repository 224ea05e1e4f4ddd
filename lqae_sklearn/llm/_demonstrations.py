"""Which demonstrations a query sees: the same random ones for every query, or the nearest ones per query.

Nearest demonstrations (kNN prompting; Liu et al. 2022, "What Makes Good In-Context
Examples for GPT-3?") give each query, per class, the labelled texts most like it.
Similarity is the cosine between TF-IDF vectors of the whitespace-separated tokens
(for LQAE token text, the WordPiece pieces ``"shoe"``, ``"##s"``; no lower-casing,
no stop words): how many tokens two texts share, rare tokens weighing more. The
search is scikit-learn's :class:`~sklearn.neighbors.NearestNeighbors`, one per class.

Both kinds are written in *rounds*: a round holds one demonstration of each class
(classes in the order of ``classes_``), so no class sits only at the end of the prompt.
"""

from __future__ import annotations

import numpy as np

#: Tokens are whitespace-separated pieces, kept as written ("##s" is a token).
TOKEN_PATTERN = r"\S+"


def interleave(per_class) -> list[tuple[int, int]]:
    """``(index, class)`` pairs in rounds: the first of each class, then the second of each, ...

    ``per_class[k]`` lists class ``k``'s items in the order they go into rounds; a
    class with fewer items sits out the later rounds.
    """
    rounds = max((len(items) for items in per_class), default=0)
    return [(int(items[r]), k) for r in range(rounds) for k, items in enumerate(per_class) if r < len(items)]


def text_vectorizer():
    """The vectorizer whose cosine similarity picks nearest demonstrations: TF-IDF over whitespace tokens."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(token_pattern=TOKEN_PATTERN, lowercase=False)


class NearestDemonstrations:
    """Per class, the labelled texts nearest a query (cosine over :func:`text_vectorizer`).

    Parameters
    ----------
    n_per_class : int
        How many demonstrations of each class a query gets (fewer when a class has
        fewer texts).

    Attributes
    ----------
    vectorizer_ : TfidfVectorizer
        Fitted on every labelled text.
    neighbors_ : list of NearestNeighbors
        One per class, over that class's texts (cosine, brute force).
    members_ : list of ndarray of int
        Indices into the labelled texts of each class's texts, in the order
        ``neighbors_[k]`` holds them.
    texts_ : list of str
        The labelled texts, as the prompts write them.
    """

    def __init__(self, n_per_class: int):
        self.n_per_class = n_per_class

    def fit(self, texts, class_index, n_classes: int) -> "NearestDemonstrations":
        """Index ``texts`` (labelled with ``class_index``, values in ``range(n_classes)``)."""
        from sklearn.neighbors import NearestNeighbors

        class_index = np.asarray(class_index)
        self.texts_ = list(texts)
        self.vectorizer_ = text_vectorizer()
        try:
            vectors = self.vectorizer_.fit_transform(texts)
        except ValueError as exc:  # every text empty or whitespace
            raise ValueError(f"the training texts have no tokens to compare queries with: {exc}") from exc
        self.members_ = [np.flatnonzero(class_index == k) for k in range(n_classes)]
        self.neighbors_ = [NearestNeighbors(metric="cosine", algorithm="brute").fit(vectors[members])
                           for members in self.members_]
        return self

    def nearest(self, texts) -> list[list[np.ndarray]]:
        """For each text, for each class, indices of its nearest labelled texts, nearest first."""
        vectors = self.vectorizer_.transform(texts)
        per_class = []
        for members, neighbors in zip(self.members_, self.neighbors_):
            k = min(int(self.n_per_class), len(members))
            per_class.append(members[neighbors.kneighbors(vectors, n_neighbors=k, return_distance=False)])
        return [[found[i] for found in per_class] for i in range(len(texts))]


def nearest_last(per_class, n_rounds: int | None = None) -> list[tuple[int, int]]:
    """Demonstrations as ``(index, class)`` pairs in rounds from the farthest to the nearest.

    ``per_class[k]`` lists class ``k``'s demonstrations nearest first. Round ``r``
    (counted from the end) holds each class's ``r``-th nearest, so the
    demonstrations most like the query stand closest to it, and a class with fewer
    demonstrations sits out the first rounds. ``n_rounds`` keeps only the nearest
    rounds (all by default).
    """
    total = max((len(items) for items in per_class), default=0)
    kept = total if n_rounds is None else min(int(n_rounds), total)
    return [(int(items[r]), k) for r in reversed(range(kept)) for k, items in enumerate(per_class) if r < len(items)]

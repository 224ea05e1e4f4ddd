"""Token ids <-> token text: an image's tokens written as the language model's own pieces.

Each image's ids become the LM tokenizer's pieces (``convert_ids_to_tokens``: a
``##`` prefix marks a WordPiece continuation) joined by single spaces. The
codebook holds no special or ``[unused]`` tokens and no piece contains
whitespace, so splitting on whitespace maps a text back to exactly its ids.
"""

from __future__ import annotations

import numpy as np


class TokenVocabulary:
    """The pieces of a checkpoint's codebook, for writing ids as text and reading them back.

    Parameters
    ----------
    pieces : sequence of str or None
        The LM tokenizer's piece for every vocabulary id; None for a learned
        codebook, whose ids can be checked but not written as text.
    allowed_ids : array-like of int
        The ids the quantizer can choose (the codebook).
    size : int or None, default=None
        The id range when ``pieces`` is None.
    """

    def __init__(self, pieces, allowed_ids, size=None):
        self.pieces = None if pieces is None else np.asarray(pieces, dtype=object)
        self.allowed = np.zeros(len(self.pieces) if pieces is not None else size, dtype=bool)
        self.allowed[np.asarray(allowed_ids)] = True
        self.lookup = {} if pieces is None else {p: i for i, p in enumerate(self.pieces) if self.allowed[i]}

    @classmethod
    def of(cls, model) -> "TokenVocabulary":
        """The vocabulary of a loaded :class:`~lqae_sklearn.model.LQAE` (or VQVAE, whose codes have no pieces)."""
        allowed = model.quantizer.allowed_ids.cpu().numpy()
        if model.language_model is None:
            return cls(None, allowed, size=model.quantizer.vocab_size)
        tokenizer = model.language_model.tokenizer
        if tokenizer is None:
            raise ValueError("the checkpoint's language model has no tokenizer, so tokens cannot be written as text")
        pieces = tokenizer.convert_ids_to_tokens(list(range(model.language_model.vocab_size)))
        return cls(pieces, allowed)

    def _require_words(self) -> None:
        if self.pieces is None:
            raise ValueError("this checkpoint has a learned codebook (a VQ-VAE): its codes are not words of a "
                             "language model, so they cannot be written as text")

    def check_ids(self, ids, n_tokens: int, what: str) -> np.ndarray:
        """``ids`` as int64 (n, n_tokens), every one a codebook token; else a ValueError naming the first bad one."""
        ids = np.asarray(ids.to_numpy() if hasattr(ids, "to_numpy") else ids)
        if ids.ndim != 2 or ids.shape[1] != n_tokens:
            raise ValueError(f"{what} must have shape (n_images, {n_tokens}), got {ids.shape}")
        if ids.shape[0] == 0:
            raise ValueError(f"{what} is empty")
        if not np.issubdtype(ids.dtype, np.integer):
            if not np.issubdtype(ids.dtype, np.floating) or not np.array_equal(ids, np.round(ids)):
                raise ValueError(
                    f"{what} must be integer token ids, got dtype {ids.dtype} (embeddings cannot be turned back "
                    f"into tokens)"
                )
        ids = ids.astype(np.int64)
        bad = (ids < 0) | (ids >= self.allowed.size)
        bad[~bad] = ~self.allowed[ids[~bad]]
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(f"{what}[{row}, {col}] = {ids[row, col]} is not a token of the checkpoint's codebook")
        return ids

    def to_text(self, ids: np.ndarray) -> list[str]:
        """Checked ids (n, T) -> one string per row."""
        self._require_words()
        return [" ".join(row) for row in self.pieces[ids].tolist()]

    def to_ids(self, texts, n_tokens: int) -> np.ndarray:
        """Strings of ``n_tokens`` codebook pieces each -> int64 ids (n, n_tokens); a ValueError names a bad one."""
        self._require_words()
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a list of strings, one per image, not a single string")
        texts = list(texts.iloc[:, 0] if hasattr(texts, "columns") else np.asarray(texts, dtype=object).reshape(-1))
        if not texts:
            raise ValueError("texts is empty")
        out = np.empty((len(texts), n_tokens), dtype=np.int64)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a string")
            tokens = text.split()
            if len(tokens) != n_tokens:
                raise ValueError(f"texts[{i}] has {len(tokens)} tokens; this checkpoint writes {n_tokens} per image")
            for j, token in enumerate(tokens):
                token_id = self.lookup.get(token)
                if token_id is None:
                    raise ValueError(f"texts[{i}], token {j} ({token!r}) is not in the checkpoint's codebook")
                out[i, j] = token_id
        return out


def looks_like_texts(X) -> bool:
    """Whether ``X`` (non-empty) holds token texts rather than ids."""
    if hasattr(X, "columns"):
        return X.shape[1] == 1 and isinstance(X.iloc[0, 0], str)
    first = X.iloc[0] if hasattr(X, "iloc") else X[0]
    if isinstance(first, np.ndarray) and first.shape == (1,):  # a (n, 1) column of texts
        first = first[0]
    return isinstance(first, str)

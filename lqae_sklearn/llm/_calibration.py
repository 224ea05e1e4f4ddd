"""Removing the LLM's label prior from few-shot class scores.

A small LLM prefers some labels whatever the query: a familiar word, the label of
the last demonstration. Each correction here subtracts a per-class offset from the
class scores (log-probabilities), which divides the class probabilities by a
per-class factor before they are normalised again:

* **content-free** (contextual calibration, Zhao et al. 2021, "Calibrate Before
  Use"): the offset is the score each class gets for inputs that carry no content,
  ``"N/A"``, ``""`` and ``"[MASK]"`` (the paper's three), averaged over them,
  scored after the same demonstrations as the query;
* **batch** (batch calibration, Zhou et al. 2023, "Batch Calibration: Rethinking
  Calibration for In-Context Learning and Prompt Engineering"): the offset is the
  mean score of each class over the queries predicted together;
* **other classes**: the offset is what the demonstrations add, on average, to
  a class's score for labelled examples of the *other* classes: one reference
  example per class, chosen at ``fit`` (:func:`class_references`), is scored
  after the same demonstrations as the query and after none, and the offset of
  class ``c`` is the mean difference over the references of the classes other
  than ``c``. The difference, not the score, because a text's own likelihood
  varies from one reference to the next far more than any prompt's bias, and
  under one prompt per class each class has other references. Like batch
  calibration it reads real inputs, but inputs whose labels are known, so it
  needs neither a batch nor balanced queries: a query's prediction depends on
  the query alone.

All three apply to the direct and to the channel scorings. Under channel scoring the
score is ``log p(input | label)``; the offset is how much a label's context makes
any text likelier, which the channel score does not otherwise remove.
"""

from __future__ import annotations

import numpy as np

CALIBRATIONS = ("content_free", "batch", "other_classes")
#: The content-free inputs of Zhao et al. (2021), averaged.
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


def batch_calibrated(scores: np.ndarray) -> np.ndarray:
    """``scores`` (n_queries, n_classes) less each class's mean over the queries.

    Parameters
    ----------
    scores : ndarray of shape (n_queries, n_classes)
        Class scores of the queries predicted together.

    Returns
    -------
    ndarray of shape (n_queries, n_classes)
        The calibrated scores.

    Raises
    ------
    ValueError
        With fewer than 2 queries: the mean of one query is the query itself,
        and subtracting it would give every class the same score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[0] < 2:
        raise ValueError(
            f"calibration='batch' estimates the label prior from the queries predicted together, and got "
            f"{scores.shape[0]}: predict at least 2 queries in one call, or use calibration='content_free'"
        )
    return scores - scores.mean(axis=0, keepdims=True)


def class_references(texts, class_index, n_classes: int) -> np.ndarray:
    """Index into ``texts`` of each class's most typical text: its reference for ``calibration="other_classes"``.

    The most typical text of a class is the one whose TF-IDF vector (the
    similarity that picks nearest demonstrations) has the highest mean cosine with
    the class's texts; ties go to the first in ``texts``. No randomness: a class
    of one text has that text.

    Parameters
    ----------
    texts : list of str
        The labelled texts.
    class_index : array-like of int of shape (len(texts),)
        Each text's class, in ``range(n_classes)``.
    n_classes : int
        Number of classes; each must have a text.

    Returns
    -------
    ndarray of int of shape (n_classes,)
    """
    from ._demonstrations import text_vectorizer

    class_index = np.asarray(class_index)
    try:
        vectors = text_vectorizer().fit_transform(texts)  # rows have unit norm: dot products are cosines
    except ValueError:  # no text has a token: every text is as typical as any other
        vectors = None
    references = np.empty(n_classes, dtype=np.int64)
    for k in range(n_classes):
        members = np.flatnonzero(class_index == k)
        if vectors is None:
            references[k] = members[0]
            continue
        block = vectors[members]
        typicality = np.asarray(block @ block.mean(axis=0).T).ravel()
        references[k] = members[int(np.argmax(typicality))]
    return references


def other_class_offsets(lifts: np.ndarray, reference_classes, classes) -> np.ndarray:
    """Per column of ``classes``, the mean of its column over the references of the other classes.

    Parameters
    ----------
    lifts : ndarray of shape (n_references, len(classes))
        What the demonstrations add to the references' scores for ``classes``.
    reference_classes : array-like of int of shape (n_references,)
        The class of each reference.
    classes : array-like of int
        The class of each column.

    Returns
    -------
    ndarray of shape (1, len(classes))
    """
    reference_classes = np.asarray(reference_classes)
    offsets = [lifts[reference_classes != c, m].mean() for m, c in enumerate(classes)]
    return np.asarray(offsets, dtype=np.float64)[None, :]

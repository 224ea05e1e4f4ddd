"""Removing the LLM's label prior from few-shot class scores.

A small LLM prefers some labels whatever the query: a familiar word, the label of
the last demonstration. Both corrections here subtract a per-class offset from the
class scores (log-probabilities), which divides the class probabilities by a
per-class factor before they are normalised again:

* **content-free** (contextual calibration, Zhao et al. 2021, "Calibrate Before
  Use"): the offset is the score each class gets for inputs that carry no content,
  ``"N/A"``, ``""`` and ``"[MASK]"`` (the paper's three), averaged over them,
  scored after the same demonstrations as the query;
* **batch** (batch calibration, Zhou et al. 2023, "Batch Calibration: Rethinking
  Calibration for In-Context Learning and Prompt Engineering"): the offset is the
  mean score of each class over the queries predicted together.

Both apply to the direct and to the channel scorings. Under channel scoring the
score is ``log p(input | label)``; the offset is how much a label's context makes
any text likelier, which the channel score does not otherwise remove.
"""

from __future__ import annotations

import numpy as np

CALIBRATIONS = ("content_free", "batch")
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

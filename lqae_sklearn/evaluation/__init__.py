"""Evaluation: a checkpoint against training-free baselines, and the few-shot episode protocol.

:func:`evaluate_checkpoint` measures a checkpoint (``lqae-eval`` on the command
line) beside raw pixels, PCA and k-means patch tokens on the same split;
:func:`sample_episodes` and the functions after it are the seeded N-way K-shot
protocol, its statistics and its baselines.
"""

from ._checkpoint import evaluate_checkpoint
from ._episodes import (
    NONSENSE_LABELS,
    Episode,
    LLMEpisodeRunner,
    episode_accuracies,
    evaluate_grid,
    format_table,
    mean_confidence_interval,
    prototype_predict,
    sample_episodes,
    shuffle_tokens,
    token_overlap_predict,
)
from ._markdown import evaluation_markdown

__all__ = [
    "NONSENSE_LABELS",
    "Episode",
    "LLMEpisodeRunner",
    "episode_accuracies",
    "evaluate_checkpoint",
    "evaluate_grid",
    "evaluation_markdown",
    "format_table",
    "mean_confidence_interval",
    "prototype_predict",
    "sample_episodes",
    "shuffle_tokens",
    "token_overlap_predict",
]

"""The few-shot evaluation protocol: seeded N-way K-shot episodes, their statistics and baselines."""

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

__all__ = [
    "NONSENSE_LABELS",
    "Episode",
    "LLMEpisodeRunner",
    "episode_accuracies",
    "evaluate_grid",
    "format_table",
    "mean_confidence_interval",
    "prototype_predict",
    "sample_episodes",
    "shuffle_tokens",
    "token_overlap_predict",
]

"""Pictures of what the model does, as scikit-learn's ``Display`` objects.

Each display is built from a fitted estimator with ``from_estimator`` (or from
precomputed arrays with its constructor), draws on a matplotlib ``Axes`` and
keeps the artists it made as attributes ending in ``_`` (``figure_``, ``ax_``):

* :class:`TokenMapDisplay`: one image with each token written on the patch, or
  the coarser ``token_grid`` region, it stands for;
* :class:`ReconstructionDisplay`: originals over their reconstructions from
  their tokens (:meth:`~lqae_sklearn.LQAETokenizer.inverse_transform`);
* :class:`FewShotEpisodeDisplay`: a few-shot episode: the demonstrations with
  their labels, the query, and the LLM's probability for each label.

matplotlib is an optional dependency: ``pip install 'lqae-sklearn[plotting]'``.
It is imported when a display is drawn, not when this module is imported.
"""

from ._episode import FewShotEpisodeDisplay
from ._reconstruction import ReconstructionDisplay
from ._token_map import TokenMapDisplay

__all__ = ["FewShotEpisodeDisplay", "ReconstructionDisplay", "TokenMapDisplay"]

"""One entry point from a config to a model: an LQAE or its VQ-VAE baseline, by ``config.codebook``."""

from __future__ import annotations

from ._config import LQAEConfig
from ._language_model import FrozenLanguageModel
from ._lqae import LQAE
from ._vqvae import VQVAE


def build_model(config: LQAEConfig, language_model: FrozenLanguageModel | None = None):
    """The untrained model a config describes: :class:`LQAE` or :class:`VQVAE`.

    Parameters
    ----------
    config : LQAEConfig
        ``codebook="language"`` builds an :class:`LQAE`, ``codebook="learned"`` a
        :class:`VQVAE`.
    language_model : FrozenLanguageModel or None, default=None
        The LQAE's frozen LM; None loads ``config.language_model``. A VQVAE has
        no LM: it ignores this and loads none.

    Returns
    -------
    model : LQAE or VQVAE
        In training mode, as any freshly built ``nn.Module``.

    Examples
    --------
    >>> from lqae_sklearn.model import build_model, preset_config
    >>> type(build_model(preset_config("small-28-vqvae"))).__name__
    'VQVAE'
    >>> type(build_model(preset_config("small-28"))).__name__
    'LQAE'
    """
    if config.codebook == "learned":
        return VQVAE(config)
    return LQAE(config, language_model)

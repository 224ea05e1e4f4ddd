"""The LQAE paper's VQ-VAE baseline: the LQAE's encoder and decoder around a learned codebook.

image -> ViT encoder -> nearest learned code (L2) -> ViT decoder -> image; no
language model anywhere (official ``vqae.py``). The decoder reads the codes
themselves, where the LQAE's reads the frozen LM's hidden states.

Loss = pixel MSE + mse(sg(z), e) + commitment_weight * mse(z, sg(e)): the
codebook term trains the codes, the commitment term the encoder (see
:mod:`._learned_quantizer`). Both terms have the value mse(z, e), reported as
``LQAEOutput.commitment_loss``, so ``loss = reconstruction_loss + (1 +
commitment_weight) * commitment_loss``; there is no masking and no MLM term.

It has the LQAE's interface (``encode``, ``decode``, ``features``, ``forward``
returning an :class:`LQAEOutput`, ``trainable_state_dict``, ...), so tokenizers,
trainers and checkpoints use either; its ``language_model`` is None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._config import LQAEConfig
from ._learned_quantizer import LearnedQuantizer
from ._lqae import LQAEOutput, _init_weights, pool_tokens, unpool_tokens
from ._vit import ViTDecoder, ViTEncoder


class VQVAE(nn.Module):
    """Encoder, learned-codebook quantizer and decoder: the paper's VQ-VAE baseline.

    Parameters
    ----------
    config : LQAEConfig
        Architecture and loss settings with ``codebook="learned"`` (the
        ``"small-28-vqvae"`` preset); ``codebook_size`` codes as wide as the
        encoder (``encoder_dim``). The language-model fields are not used.

    Attributes
    ----------
    language_model : None
        No language model: the decoder reads the codes.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import VQVAE, preset_config
    >>> model = VQVAE(preset_config("small-28-vqvae")).eval()
    >>> ids = model.encode(torch.rand(1, 1, 28, 28))
    >>> ids.shape, bool(ids.max() < model.quantizer.codebook_size)
    (torch.Size([1, 49]), True)
    >>> model.decode(ids).shape
    torch.Size([1, 1, 28, 28])
    """

    def __init__(self, config: LQAEConfig):
        super().__init__()
        if config.codebook != "learned":
            raise ValueError(f"VQVAE needs codebook='learned', got codebook={config.codebook!r} (that is an LQAE)")
        self.config = config
        self.language_model = None
        c = config
        # As the official baseline, the encoder's output goes to the quantizer as it is: codes are encoder_dim wide.
        self.encoder = ViTEncoder(
            c.image_size, c.patch_size, c.in_channels, c.encoder_dim, c.encoder_depth,
            c.encoder_heads, c.mlp_ratio, c.block, out_dim=c.encoder_dim,
        )
        self.quantizer = LearnedQuantizer(c.codebook_size, c.encoder_dim)
        self.decoder = ViTDecoder(
            c.image_size, c.patch_size, c.in_channels, c.decoder_dim, c.decoder_depth,
            c.decoder_heads, c.mlp_ratio, c.block, in_dim=c.encoder_dim,
        )
        for part in (self.encoder, self.decoder):
            part.apply(_init_weights)

    # -- the trained part ------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder, codebook and decoder weights: everything, as there is no frozen LM.

        Returns
        -------
        dict of str to torch.Tensor
            The trained parameters and buffers, by name (the codebook is ``quantizer.codebook``).
        """
        return dict(self.state_dict())

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # -- inference -------------------------------------------------------------------
    def encode(self, images: torch.Tensor, token_grid: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> code ids (B, T), row-major over the patch grid.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        token_grid : int or None, default=None
            ``g`` averages the encoder's output over a g x g grid of regions before
            the nearest-code search: g * g coarser tokens (see :func:`pool_tokens`).

        Returns
        -------
        torch.Tensor
            Code ids (B, T), int64, in ``[0, codebook_size)``.
        """
        return self.quantizer.nearest(pool_tokens(self.encoder(images), token_grid))

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantizer.embed(ids)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids (B, T) -> images (B, C, H, W) clamped to [0, 1].

        Ids of a coarser token grid (T = g * g < the patch count) are first spread
        back over the patch grid, each to the patches nearest its region.

        Parameters
        ----------
        ids : torch.Tensor
            Code ids (B, T).

        Returns
        -------
        torch.Tensor
            Images (B, C, H, W) in [0, 1].
        """
        grid = self.config.grid_size
        if ids.shape[1] != grid * grid:
            ids = unpool_tokens(ids, grid)
        return self.decoder(self.embed_ids(ids)).clamp(0, 1)

    def feature_layer_names(self) -> list[str]:
        """Names accepted by :meth:`features`: the encoder blocks (there is no LM).

        Returns
        -------
        list of str
            ``"encoder.1"`` (the output of the first encoder block) to
            ``"encoder.{encoder_depth}"``.
        """
        return [f"encoder.{i}" for i in range(1, self.config.encoder_depth + 1)]

    def features(self, images: torch.Tensor, layers: list[str]) -> torch.Tensor:
        """Token-averaged hidden states of the named encoder blocks, concatenated (B, sum of widths).

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        layers : list of str
            Names from :meth:`feature_layer_names`.

        Returns
        -------
        torch.Tensor
            Features (B, encoder_dim x len(layers)).
        """
        return self.encode_with_features(images, layers)[1]

    def encode_with_features(self, images: torch.Tensor, layers: list[str], with_ids: bool = True,
                             token_grid: int | None = None):
        """Code ids and :meth:`features` from one encoder pass.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        layers : list of str
            Names from :meth:`feature_layer_names`; empty for no features.
        with_ids : bool, default=True
            Return the ids.
        token_grid : int or None, default=None
            As in :meth:`encode`.

        Returns
        -------
        ids : torch.Tensor or None
            Code ids (B, T), or None.
        features : torch.Tensor or None
            Features (B, sum of widths), or None when ``layers`` is empty.
        """
        names = self.feature_layer_names()
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise ValueError(f"unknown feature layers {unknown} (a VQVAE has no language model); choose from {names}")
        if not layers:
            return (self.encode(images, token_grid) if with_ids else None), None
        z, enc_layers = self.encoder(images, return_layers=True)
        by_name = dict(zip(names, enc_layers))
        ids = self.quantizer.nearest(pool_tokens(z, token_grid)) if with_ids else None
        return ids, torch.cat([by_name[name].float().mean(dim=1) for name in layers], dim=1)

    # -- training --------------------------------------------------------------------
    def forward(self, images: torch.Tensor, mask_ratio: float | None = None, generator=None) -> LQAEOutput:
        """Full pass with losses.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        mask_ratio : float or None, default=None
            Ignored (nothing is masked without an LM); accepted for the LQAE's interface.
        generator : torch.Generator or None, default=None
            Ignored: the pass draws no random numbers.

        Returns
        -------
        LQAEOutput
            Reconstruction, ids, an all-False mask and the loss terms:
            ``commitment_loss`` is ``mse(z, e)``, the value of both VQ terms, and
            ``mlm_loss`` is 0.
        """
        c = self.config
        z = self.encoder(images)
        q, ids, codebook_loss, commitment = self.quantizer(z)
        reconstruction = self.decoder(q)
        recon_loss = F.mse_loss(reconstruction.float(), images.float())
        loss = recon_loss + codebook_loss + c.commitment_weight * commitment
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        return LQAEOutput(reconstruction, ids, mask, loss, recon_loss, commitment, recon_loss.new_zeros(()))

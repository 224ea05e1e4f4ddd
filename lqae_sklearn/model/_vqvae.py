"""The LQAE paper's VQ-VAE baseline: the LQAE's encoder and decoder around a learned codebook.

image -> ViT encoder -> nearest learned code (L2) -> ViT decoder -> image; no
language model anywhere (official ``vqae.py``). The decoder reads the codes
themselves, where the LQAE's reads the frozen LM's hidden states.

Loss = pixel MSE + mse(sg(z), e) + commitment_weight * mse(z, sg(e)): the
codebook term trains the codes, the commitment term the encoder (see
:mod:`._learned_quantizer`). Both terms have the value mse(z, e), reported as
``LQAEOutput.commitment_loss``, so ``loss = reconstruction_loss + (1 +
commitment_weight) * commitment_loss``; there is no masking and no MLM term.

It shares the LQAE's encoding, decoding and probe features
(:class:`TokenAutoencoder`) and its ``forward`` returns an :class:`LQAEOutput`, so
tokenizers, trainers and checkpoints use either; its ``language_model`` is None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autoencoder import TokenAutoencoder, vit_encoder_decoder
from ._config import LQAEConfig
from ._learned_quantizer import LearnedQuantizer
from ._lqae import LQAEOutput


class VQVAE(TokenAutoencoder):
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
        self.encoder, decoder = vit_encoder_decoder(c, c.encoder_dim)
        self.quantizer = LearnedQuantizer(c.codebook_size, c.encoder_dim, kmeans_init=c.kmeans_init,
                                          restart_unused_after=c.restart_unused_after)
        self.decoder = decoder

    # -- the trained part ------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder, codebook and decoder weights: everything, as there is no frozen LM.

        Returns
        -------
        dict of str to torch.Tensor
            The trained parameters and buffers, by name (the codebook is
            ``quantizer.codebook``; with k-means initialisation or restarts, their
            state is ``quantizer.kmeans_done`` and ``quantizer.calls_unused``).
        """
        return dict(self.state_dict())

    # -- how the decoder reads tokens ---------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantizer.embed(ids)

    def read_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input for code ids (B, T): the codes themselves.

        Parameters
        ----------
        ids : torch.Tensor
            Code ids (B, T) over the patch grid.

        Returns
        -------
        torch.Tensor
            Their codes (B, T, encoder_dim).
        """
        return self.embed_ids(ids)

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
            Source of the latents that the k-means initialisation and the
            dead-code restarts draw in training mode (``kmeans_init``,
            ``restart_unused_after``), for exact resumption; otherwise unused.

        Returns
        -------
        LQAEOutput
            Reconstruction, ids, an all-False mask and the loss terms:
            ``commitment_loss`` is ``mse(z, e)``, the value of both VQ terms, and
            ``mlm_loss`` is 0.
        """
        c = self.config
        z = self.encoder(images)
        q, ids, codebook_loss, commitment = self.quantizer(z, generator)
        reconstruction = self.decoder(q)
        recon_loss = F.mse_loss(reconstruction.float(), images.float())
        loss = recon_loss + codebook_loss + c.commitment_weight * commitment
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        return LQAEOutput(reconstruction, ids, mask, loss, recon_loss, commitment, recon_loss.new_zeros(()))

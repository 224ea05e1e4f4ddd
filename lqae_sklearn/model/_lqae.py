"""The Language Quantized AutoEncoder (Liu, Yan, Abbeel, arXiv 2302.00902).

image -> ViT encoder -> nearest LM word embedding (frozen codebook) -> random
<mask> replacement (training only) -> frozen LM -> ViT decoder -> image.

Loss = pixel MSE + commitment_weight * mse(z, sg(q)) + mlm_weight * CE(LM logits
at masked positions, the image's own token ids). With ``search_dim > 0`` the word is
searched in a learned low-dimensional space (:class:`ProjectedLanguageQuantizer`),
whose maps add their own terms; the LM still reads the word's raw embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.compiler import is_compiling

from ._autoencoder import TokenAutoencoder, vit_encoder_decoder
from ._config import LQAEConfig
from ._language_model import FrozenLanguageModel
from ._projected_quantizer import ProjectedLanguageQuantizer
from ._quantizer import LanguageQuantizer


@dataclass
class LQAEOutput:
    """Everything one forward pass produces; the loss terms are float32 scalars.

    :class:`LQAE` and :class:`VQVAE` both return it.

    Parameters
    ----------
    reconstruction : torch.Tensor
        Reconstructed images (B, C, H, W).
    ids : torch.Tensor
        Chosen vocabulary ids (B, n_tokens) (code ids for a VQVAE).
    mask : torch.Tensor
        Which tokens were masked for the LM (B, n_tokens), bool (all False for a VQVAE).
    loss : torch.Tensor
        The weighted sum of the three terms below, plus the quantizer's codebook
        term where it has one (a VQVAE: reconstruction + (1 + commitment_weight) x
        commitment, its codebook term having the commitment term's value; an LQAE
        with ``search_dim > 0``: the code map's term).
    reconstruction_loss : torch.Tensor
        Pixel mean squared error.
    commitment_loss : torch.Tensor
        ``mse(x, sg(q))`` between encoder outputs and their chosen rows (with
        ``search_dim > 0``, its mean with the same term between their projections).
    mlm_loss : torch.Tensor
        Masked-token prediction loss against the image's own ids (0 for a VQVAE).

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn import LQAE, preset_config
    >>> model = LQAE(preset_config("small-28", patch_size=7, encoder_depth=1, decoder_depth=1))
    >>> out = model(torch.rand(2, 1, 28, 28))
    >>> out.reconstruction.shape, out.ids.shape
    (torch.Size([2, 1, 28, 28]), torch.Size([2, 16]))
    """

    reconstruction: torch.Tensor  # (B, C, H, W), unclamped
    ids: torch.Tensor  # (B, T) vocabulary ids
    mask: torch.Tensor  # (B, T) True where the token was replaced by <mask>
    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    commitment_loss: torch.Tensor
    mlm_loss: torch.Tensor


class LQAE(TokenAutoencoder):
    """Encoder, frozen-codebook quantizer, frozen LM and decoder.

    Encoding, decoding and probe features (``encode``, ``decode``, ``features``,
    ``encode_with_features``, ``feature_layer_names``) are
    :class:`TokenAutoencoder`'s; here the decoder reads the frozen LM's hidden
    states over the tokens' word embeddings.

    Parameters
    ----------
    config : LQAEConfig
        Architecture and loss settings (:func:`preset_config` builds the named ones).
    language_model : FrozenLanguageModel, optional
        Loaded from ``config.language_model`` when not given.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn import LQAE, preset_config
    >>> model = LQAE(preset_config("small-28")).eval()
    >>> model.encode(torch.rand(1, 1, 28, 28)).shape
    torch.Size([1, 49])
    """

    def __init__(self, config: LQAEConfig, language_model: FrozenLanguageModel | None = None):
        super().__init__()
        self.config = config
        lm = language_model if language_model is not None else FrozenLanguageModel.from_pretrained(config.language_model)
        self.language_model = lm
        c = config
        self.encoder, decoder = vit_encoder_decoder(c, lm.hidden_size)  # tokens are LM-width word embeddings
        excluded = lm.excluded_token_ids() if c.codebook_exclude == "special" else []
        if c.search_dim or c.codebook_map:
            self.quantizer = ProjectedLanguageQuantizer(lm.codebook, excluded, c.search_dim or lm.hidden_size,
                                                        rescore_top_k=c.rescore_top_k, map_latents=not c.codebook_map)
        else:
            self.quantizer = LanguageQuantizer(lm.codebook, excluded, rescore_top_k=c.rescore_top_k)
        self.decoder = decoder

    # -- the trained part ------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder weights: what a checkpoint stores (the LM is referenced).

        Returns
        -------
        dict of str to torch.Tensor
            The trained parameters and buffers, by name.
        """
        return {k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")}

    # -- how the decoder reads tokens ---------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.language_model.codebook)

    def read_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input for token ids (B, T): the frozen LM's hidden states over their word embeddings.

        Parameters
        ----------
        ids : torch.Tensor
            Token ids (B, T) over the patch grid.

        Returns
        -------
        torch.Tensor
            The LM's last hidden states (B, T, hidden_size).
        """
        return self.language_model(self.embed_ids(ids))

    # -- training --------------------------------------------------------------------
    def draw_mask(self, batch: int, generator=None, mask_ratio: float | None = None) -> torch.Tensor:
        """Which tokens the LM reads as ``<mask>``: each one independently with probability ``mask_ratio``.

        Parameters
        ----------
        batch : int
            Images in the batch.
        generator : torch.Generator or None, default=None
            Source of the draw, for exact resumption.
        mask_ratio : float or None, default=None
            None is the config's in training mode, 0 in eval mode. At 0 nothing is drawn.

        Returns
        -------
        torch.Tensor
            The mask (batch, n_tokens), bool, on the model's device.
        """
        if mask_ratio is None:
            mask_ratio = self.config.mask_ratio if self.training else 0.0
        shape, device = (batch, self.config.num_tokens), self.language_model.codebook.device
        if mask_ratio == 0:
            return torch.zeros(shape, dtype=torch.bool, device=device)
        return torch.rand(shape, device=device, generator=generator) < mask_ratio

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None, generator=None,
                mask: torch.Tensor | None = None) -> LQAEOutput:
        """Full pass with losses.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        mask_ratio : float or None, default=None
            Fraction of tokens masked for the LM; None is the config's in training
            mode, 0 in eval mode. Not used when ``mask`` is given.
        generator : torch.Generator or None, default=None
            Source of the mask, for exact resumption.
        mask : torch.Tensor or None, default=None
            The mask itself (B, n_tokens), bool, as :meth:`draw_mask` gives it: a
            compiled training step draws it outside the graph.

        Returns
        -------
        LQAEOutput
            Reconstruction, ids, mask and the loss terms.
        """
        c = self.config
        masking = True  # a given mask may mask tokens; a drawn one only at a positive ratio
        if mask is None:
            if mask_ratio is None:
                mask_ratio = c.mask_ratio if self.training else 0.0
            mask = self.draw_mask(images.shape[0], generator, mask_ratio)
            masking = mask_ratio > 0
        z = self.encoder(images)
        q, ids, codebook_loss, commitment = self.quantizer(z, self.language_model.codebook, c.normalize_latents)
        mask_embedding = self.language_model.codebook[self.language_model.mask_token_id].to(q.dtype)
        q = torch.where(mask.unsqueeze(-1), mask_embedding, q)
        hidden = self.language_model(q)
        reconstruction = self.decoder(hidden)
        recon_loss = F.mse_loss(reconstruction.float(), images.float())
        mlm_loss = self._mlm_loss(hidden, ids, mask) if masking else recon_loss.new_zeros(())
        loss = recon_loss + codebook_loss + c.commitment_weight * commitment + c.mlm_weight * mlm_loss
        return LQAEOutput(reconstruction, ids, mask, loss, recon_loss, commitment, mlm_loss)

    def _mlm_loss(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the LM's predictions at the masked positions against the image's own ids
        (0 when nothing is masked), with no (tokens x vocabulary) logits tensor."""
        count = mask.sum().clamp(min=1)
        if is_compiling():
            # Every position, the unmasked ones weighted 0: one shape every step and no host read of
            # the count, so the whole step stays one graph (CUDA-graph capturable), for twice the
            # projection work of the masked rows alone.
            weights = mask.flatten().float() / count
            return self.language_model.mlm_loss(hidden.flatten(0, 1), ids.flatten(), weights)
        # Eager: the masked rows alone (the boolean index reads their number on the host).
        rows = hidden[mask]
        return self.language_model.mlm_loss(rows, ids[mask], (1.0 / count).expand(rows.shape[0]))

"""The Language Quantized AutoEncoder (Liu, Yan, Abbeel, arXiv 2302.00902).

image -> ViT encoder -> nearest LM word embedding (frozen codebook) -> random
<mask> replacement (training only) -> frozen LM -> ViT decoder -> image.

Loss = pixel MSE + commitment_weight * mse(z, sg(q)) + mlm_weight * CE(LM logits
at masked positions, the image's own token ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._config import LQAEConfig
from ._language_model import FrozenLanguageModel
from ._quantizer import LanguageQuantizer
from ._vit import ViTDecoder, ViTEncoder


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
        The weighted sum of the three terms below (for a VQVAE, reconstruction +
        (1 + commitment_weight) x commitment: its codebook term has the
        commitment term's value).
    reconstruction_loss : torch.Tensor
        Pixel mean squared error.
    commitment_loss : torch.Tensor
        ``mse(x, sg(q))`` between encoder outputs and their chosen rows.
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


class LQAE(nn.Module):
    """Encoder, frozen-codebook quantizer, frozen LM and decoder.

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
        self.encoder = ViTEncoder(
            c.image_size, c.patch_size, c.in_channels, c.encoder_dim, c.encoder_depth,
            c.encoder_heads, c.mlp_ratio, c.block, out_dim=lm.hidden_size,
        )
        excluded = lm.excluded_token_ids() if c.codebook_exclude == "special" else []
        self.quantizer = LanguageQuantizer(lm.codebook, excluded, rescore_top_k=c.rescore_top_k)
        self.decoder = ViTDecoder(
            c.image_size, c.patch_size, c.in_channels, c.decoder_dim, c.decoder_depth,
            c.decoder_heads, c.mlp_ratio, c.block, in_dim=lm.hidden_size,
        )
        for part in (self.encoder, self.decoder):
            part.apply(_init_weights)

    # -- the trained part ------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder weights: what a checkpoint stores (the LM is referenced).

        Returns
        -------
        dict of str to torch.Tensor
            The trained parameters and buffers, by name.
        """
        return {k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")}

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # -- inference -------------------------------------------------------------------
    def encode(self, images: torch.Tensor, token_grid: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> token ids (B, T), row-major over the patch grid.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        token_grid : int or None, default=None
            ``g`` averages the encoder's output over a g x g grid of regions before
            the nearest-word search: g * g coarser tokens (see :func:`pool_tokens`).

        Returns
        -------
        torch.Tensor
            Token ids (B, T), int64.
        """
        return self.quantizer.nearest(pool_tokens(self.encoder(images), token_grid))

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.language_model.codebook)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> images (B, C, H, W) clamped to [0, 1].

        Ids of a coarser token grid (T = g * g < the patch count) are first spread
        back over the patch grid, each to the patches nearest its region.

        Parameters
        ----------
        ids : torch.Tensor
            Token ids (B, T).

        Returns
        -------
        torch.Tensor
            Images (B, C, H, W) in [0, 1].
        """
        grid = self.config.grid_size
        if ids.shape[1] != grid * grid:
            ids = unpool_tokens(ids, grid)
        hidden = self.language_model(self.embed_ids(ids))
        return self.decoder(hidden).clamp(0, 1)

    def feature_layer_names(self) -> list[str]:
        """Names accepted by :meth:`features`: encoder blocks, then LM hidden states.

        ``"encoder.1"`` is the output of the first encoder block; ``"lm.0"`` is the
        LM's embedding layer output (token + position embeddings) and ``"lm.N"``
        the output of its N-th layer.

        Returns
        -------
        list of str
            The layer names, in network order.
        """
        enc = [f"encoder.{i}" for i in range(1, self.config.encoder_depth + 1)]
        return enc + [f"lm.{i}" for i in range(self.language_model.num_layers + 1)]

    def features(self, images: torch.Tensor, layers: list[str]) -> torch.Tensor:
        """Token-averaged hidden states of the named layers, concatenated (B, sum of widths).

        The unmasked token sequence goes through the frozen LM, as for the
        paper's linear probe.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        layers : list of str
            Names from :meth:`feature_layer_names`.

        Returns
        -------
        torch.Tensor
            Features (B, sum of the layers' widths).
        """
        return self.encode_with_features(images, layers)[1]

    def encode_with_features(self, images: torch.Tensor, layers: list[str], with_ids: bool = True,
                             token_grid: int | None = None):
        """Token ids and :meth:`features` from one encoder pass (and one LM pass).

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        layers : list of str
            Names from :meth:`feature_layer_names`; empty for no features.
        with_ids : bool, default=True
            Return the ids (they are computed anyway when an LM layer needs them).
        token_grid : int or None, default=None
            As in :meth:`encode`; the LM then reads the ``token_grid`` tokens.

        Returns
        -------
        ids : torch.Tensor or None
            Token ids (B, T), or None.
        features : torch.Tensor or None
            Features (B, sum of widths), or None when ``layers`` is empty.
        """
        if not layers:
            return (self.encode(images, token_grid) if with_ids else None), None
        z, enc_layers = self.encoder(images, return_layers=True)
        by_name = {f"encoder.{i + 1}": h for i, h in enumerate(enc_layers)}
        need_lm = any(name.startswith("lm.") for name in layers)
        ids = self.quantizer.nearest(pool_tokens(z, token_grid)) if with_ids or need_lm else None
        if need_lm:
            lm_layers = self.language_model(self.embed_ids(ids), output_hidden_states=True)
            by_name.update({f"lm.{i}": h for i, h in enumerate(lm_layers)})
        return ids, torch.cat([by_name[name].float().mean(dim=1) for name in layers], dim=1)

    # -- training --------------------------------------------------------------------
    def forward(self, images: torch.Tensor, mask_ratio: float | None = None, generator=None) -> LQAEOutput:
        """Full pass with losses.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        mask_ratio : float or None, default=None
            Fraction of tokens masked for the LM; None is the config's in training
            mode, 0 in eval mode.
        generator : torch.Generator or None, default=None
            Source of the mask, for exact resumption.

        Returns
        -------
        LQAEOutput
            Reconstruction, ids, mask and the loss terms.
        """
        c = self.config
        if mask_ratio is None:
            mask_ratio = c.mask_ratio if self.training else 0.0
        z = self.encoder(images)
        q, ids, commitment = self.quantizer(z, self.language_model.codebook, c.normalize_latents)
        mask = torch.rand(ids.shape, device=ids.device, generator=generator) < mask_ratio
        mask_embedding = self.language_model.codebook[self.language_model.mask_token_id].to(q.dtype)
        q = torch.where(mask.unsqueeze(-1), mask_embedding, q)
        hidden = self.language_model(q)
        reconstruction = self.decoder(hidden)
        recon_loss = F.mse_loss(reconstruction.float(), images.float())
        if mask.any():
            # Logits only where tokens were masked: the loss needs no others.
            logits = self.language_model.mlm_logits(hidden[mask])
            mlm_loss = F.cross_entropy(logits.float(), ids[mask])
        else:
            mlm_loss = recon_loss.new_zeros(())
        loss = recon_loss + c.commitment_weight * commitment + c.mlm_weight * mlm_loss
        return LQAEOutput(reconstruction, ids, mask, loss, recon_loss, commitment, mlm_loss)


def pool_tokens(z: torch.Tensor, token_grid: int | None) -> torch.Tensor:
    """Average (B, n*n, D) patch latents over a ``token_grid`` x ``token_grid`` grid of regions.

    Region edges follow ``adaptive_avg_pool2d`` (regions overlap by a patch when
    the grids do not divide). None, or the patch grid itself, returns ``z``.

    Parameters
    ----------
    z : torch.Tensor
        Patch latents (B, n * n, D) over an n x n patch grid.
    token_grid : int or None
        Side of the coarse grid.

    Returns
    -------
    pooled : torch.Tensor
        (B, token_grid ** 2, D), or ``z`` itself.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import pool_tokens
    >>> pool_tokens(torch.ones(2, 49, 8), 3).shape
    torch.Size([2, 9, 8])
    """
    grid = int(round(z.shape[1] ** 0.5))
    if token_grid is None or token_grid == grid:
        return z
    b, _, d = z.shape
    pooled = F.adaptive_avg_pool2d(z.transpose(1, 2).reshape(b, d, grid, grid).float(), token_grid)
    return pooled.flatten(2).transpose(1, 2).to(z.dtype)


def unpool_tokens(ids: torch.Tensor, grid: int) -> torch.Tensor:
    """Ids of a coarse g x g token grid (B, g*g) -> (B, grid*grid): each patch takes its nearest region's id.

    Parameters
    ----------
    ids : torch.Tensor
        Token ids (B, g * g) of a coarse grid.
    grid : int
        Side of the patch grid (at least g).

    Returns
    -------
    ids : torch.Tensor
        (B, grid * grid): patch ``p`` of a row takes region ``p * g // grid``.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import unpool_tokens
    >>> unpool_tokens(torch.tensor([[1, 2, 3, 4]]), 3)
    tensor([[1, 1, 2, 1, 1, 2, 3, 3, 4]])
    """
    b, t = ids.shape
    coarse = int(round(t**0.5))
    if coarse * coarse != t or coarse > grid:
        raise ValueError(f"{t} tokens per image do not form a square grid of at most {grid} x {grid}")
    index = (torch.arange(grid, device=ids.device) * coarse) // grid  # region row/column of each patch
    square = ids.view(b, coarse, coarse)
    return square[:, index][:, :, index].reshape(b, grid * grid)


def _init_weights(module: nn.Module) -> None:
    # Linear layers and the patch embedding; depthwise convs keep PyTorch's default.
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

"""What the LQAE and its VQ-VAE baseline share: images -> token ids -> images, and probe features.

Both are a ViT encoder, a quantizer (``nearest`` rows of a codebook) and a ViT
decoder; they differ in what the decoder reads (:meth:`TokenAutoencoder.read_tokens`):
the frozen LM's hidden states over the tokens' word embeddings (LQAE), or the
learned codes themselves (VQVAE).
"""

from __future__ import annotations

import torch
from torch import nn

from ._tokens import pool_tokens, unpool_tokens
from ._vit import ViTDecoder, ViTEncoder


class TokenAutoencoder(nn.Module):
    """Base of :class:`LQAE` and :class:`VQVAE`: encoding, decoding and probe features.

    A subclass sets ``config`` (:class:`LQAEConfig`), ``encoder``, ``quantizer``,
    ``decoder`` and ``language_model`` (None without one) and defines
    ``embed_ids``, :meth:`read_tokens`, ``trainable_state_dict`` and ``forward``.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import TokenAutoencoder, VQVAE, preset_config
    >>> model = VQVAE(preset_config("small-28-vqvae")).eval()
    >>> isinstance(model, TokenAutoencoder), model.decode(model.encode(torch.rand(1, 1, 28, 28))).shape
    (True, torch.Size([1, 1, 28, 28]))
    """

    def __init__(self) -> None:  # no arguments: the subclass builds the parts from its config
        super().__init__()

    def read_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input (B, T, width) for token ids (B, T) over the patch grid.

        Parameters
        ----------
        ids : torch.Tensor
            Token ids (B, T).

        Returns
        -------
        torch.Tensor
            What the decoder reads for them.
        """
        raise NotImplementedError

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def draw_mask(self, batch: int, generator=None, mask_ratio: float | None = None) -> torch.Tensor | None:
        """The tokens to hide from the model in training (B, n_tokens), or None where nothing is hidden.

        A training step draws it before the forward pass (outside a compiled graph) and
        passes it as ``mask=``; this base has no language model and masks nothing.

        Parameters
        ----------
        batch : int
            Images in the batch.
        generator : torch.Generator or None, default=None
            Source of the draw.
        mask_ratio : float or None, default=None
            Fraction of tokens to mask; None is the config's in training mode.

        Returns
        -------
        None
            Nothing to mask.
        """
        return None

    # -- inference -------------------------------------------------------------------
    def encode(self, images: torch.Tensor, token_grid: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> token ids (B, T), row-major over the patch grid.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        token_grid : int or None, default=None
            ``g`` averages the encoder's output over a g x g grid of regions before
            the nearest-row search: g * g coarser tokens (see :func:`pool_tokens`).

        Returns
        -------
        torch.Tensor
            Token ids (B, T), int64.
        """
        return self.quantizer.nearest(pool_tokens(self.encoder(images), token_grid))

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
        return self.decoder(self.read_tokens(ids)).clamp(0, 1)

    def feature_layer_names(self) -> list[str]:
        """Names accepted by :meth:`features`: encoder blocks, then LM hidden states (if there is an LM).

        ``"encoder.1"`` is the output of the first encoder block; ``"lm.0"`` is the
        LM's embedding layer output (token + position embeddings) and ``"lm.N"``
        the output of its N-th layer.

        Returns
        -------
        list of str
            The layer names, in network order.
        """
        enc = [f"encoder.{i}" for i in range(1, self.config.encoder_depth + 1)]
        if self.language_model is None:
            return enc
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
        names = self.feature_layer_names()
        unknown = [name for name in layers if name not in names]
        if unknown:
            no_lm = " (this model has no language model)" if self.language_model is None else ""
            raise ValueError(f"unknown feature layers {unknown}{no_lm}; choose from {names}")
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


def vit_encoder_decoder(config, token_width: int) -> tuple[ViTEncoder, ViTDecoder]:
    """The config's ViT encoder (out: ``token_width``) and decoder (in: ``token_width``), initialised."""
    c = config
    encoder = ViTEncoder(c.image_size, c.patch_size, c.in_channels, c.encoder_dim, c.encoder_depth,
                         c.encoder_heads, c.mlp_ratio, c.block, out_dim=token_width)
    decoder = ViTDecoder(c.image_size, c.patch_size, c.in_channels, c.decoder_dim, c.decoder_depth,
                         c.decoder_heads, c.mlp_ratio, c.block, in_dim=token_width)
    for part in (encoder, decoder):
        part.apply(_init_weights)
    return encoder, decoder


def _init_weights(module: nn.Module) -> None:
    # Linear layers and the patch embedding; depthwise convs keep PyTorch's default.
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

"""Nearest-code quantizer over a learned codebook: the VQ-VAE of van den Oord et al. (arXiv 1711.00937).

The LQAE paper's baseline (official ``vqae.py``): ``codebook_size`` trainable rows
as wide as the encoder's output, and plain VQ as there:

- *Search*: smallest squared L2 distance, as the VQ-VAE paper and the official
  baseline (``l2_normalize=False``). The LQAE searches by cosine because its rows
  are word embeddings whose norms it cannot change; here the codebook term pulls
  each chosen row towards its latents in L2, so an L2 search picks the row the
  loss is pulling, and latent norms carry information as in any VQ-VAE.
- *Loss*: the codebook term ``mse(sg(z), e)`` moves the rows only, the commitment
  term ``mse(z, sg(e))`` moves the encoder only; both are returned unweighted
  (they have the same value, ``mse(z, e)``; only their gradients differ). The
  straight-through estimator ``z + sg(e - z)`` hands the decoder's gradient to the
  encoder, so reconstruction never moves the codebook.
- *No EMA updates, no dead-code restarts*, as the official baseline: a row no
  latent picks gets no gradient and stays where it is (the trainer's
  ``codebook_usage`` says how many rows are used).
- *Initialisation*: normal with std ``dim ** -0.5`` (rows of norm about 1), the
  official ``variance_scaling(1.0, "fan_in", "normal")``.

The official ``vqae.py`` (``lhao499/language-quantized-autoencoders`` at 79cd033)
computes ``0.25 * mean((sg(q) - x)^2) + mean((q - sg(x))^2)`` in ``get_train_loss``
(lines 157-176) and adds it twice, for ``x`` and for its identity "latent" branch
(lines 106 and 116-121; ``quantizer_latent_dim=0``), as its LQAE does; the trainer adds
that sum to the pixel MSE unweighted (``lqae_main.py``, ``total_loss``). Its effective
weights are therefore 2 (codebook) and 2 x 0.25 = 0.5 (commitment): the VQ-VAE preset
uses ``VQVAE_COMMITMENT_WEIGHT`` = 0.5 (``_config.py``). The codebook
term is the codebook's only gradient, which AdamW's per-parameter scaling makes nearly
indifferent to its weight, so it keeps weight 1 here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LearnedQuantizer(nn.Module):
    """Snap vectors to their nearest row (by L2) of a trainable codebook.

    Parameters
    ----------
    codebook_size : int
        Number of codes (rows).
    dim : int
        Width of a code, the width of the vectors it quantizes.
    rows_per_step : int, default=16384
        Vectors searched at once, bounding the (vectors x codes) distance matrix.

    Attributes
    ----------
    codebook : torch.nn.Parameter
        The codes (codebook_size, dim), trained by the codebook term of the loss.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import LearnedQuantizer
    >>> quantizer = LearnedQuantizer(codebook_size=8, dim=4)
    >>> quantized, ids, codebook_loss, commitment = quantizer(torch.randn(2, 3, 4))
    >>> quantized.shape, ids.shape, quantizer.codebook_size
    (torch.Size([2, 3, 4]), torch.Size([2, 3]), 8)
    """

    def __init__(self, codebook_size: int, dim: int, rows_per_step: int = 16384):
        super().__init__()
        self.rows_per_step = rows_per_step
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) * dim**-0.5)

    @property
    def codebook_size(self) -> int:
        """Number of codes: every one can be chosen."""
        return self.codebook.shape[0]

    @property
    def vocab_size(self) -> int:
        """Every id is in ``[0, vocab_size)``: the codebook size (as :class:`LanguageQuantizer`'s)."""
        return self.codebook.shape[0]

    @property
    def allowed_ids(self) -> torch.Tensor:
        """The ids that can be chosen: all of them (as :class:`LanguageQuantizer`'s)."""
        return torch.arange(self.codebook_size, device=self.codebook.device)

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Ids of the codes nearest to ``x`` (..., dim) in L2; ties go to the lower id.

        Parameters
        ----------
        x : torch.Tensor
            Vectors (..., dim).

        Returns
        -------
        torch.Tensor
            Code ids (...), int64.
        """
        flat = x.reshape(-1, x.shape[-1]).float()
        # float32 even under bf16 autocast: the argmin must not depend on the mixed precision.
        with torch.autocast(flat.device.type, enabled=False):
            codes = self.codebook.detach().float()
            half_sq_norms = 0.5 * (codes * codes).sum(dim=1)
            # |x - e|^2 / 2 = |x|^2 / 2 - x.e + |e|^2 / 2, and |x|^2 is the same for every code.
            ids = [(half_sq_norms - part @ codes.T).argmin(dim=1) for part in flat.split(self.rows_per_step)]
        return torch.cat(ids).view(x.shape[:-1])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The codes of ``ids`` (...) -> (..., dim).

        Parameters
        ----------
        ids : torch.Tensor
            Code ids, int64.

        Returns
        -------
        torch.Tensor
            Their rows of the codebook, with a gradient to the codebook.
        """
        return F.embedding(ids, self.codebook)

    def forward(self, x: torch.Tensor):
        """Quantize ``x`` (B, T, dim).

        Parameters
        ----------
        x : torch.Tensor
            Encoder outputs (B, T, dim).

        Returns
        -------
        quantized : torch.Tensor
            The chosen codes (B, T, dim), float32, with a straight-through
            gradient to ``x`` and none to the codebook.
        ids : torch.Tensor
            Their ids (B, T), int64.
        codebook_loss : torch.Tensor
            ``mse(sg(x), e)``: its gradient reaches the codebook only.
        commitment : torch.Tensor
            ``mse(x, sg(e))``: its gradient reaches ``x`` only.
        """
        ids = self.nearest(x)
        # float32 on purpose, as in LanguageQuantizer: in bf16, x + (e - x) is not e once |x| >> |e|.
        x = x.float()
        e = self.embed(ids).float()
        codebook_loss = F.mse_loss(e, x.detach())
        commitment = F.mse_loss(x, e.detach())
        return x + (e - x).detach(), ids, codebook_loss, commitment

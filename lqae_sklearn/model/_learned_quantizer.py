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
- *No EMA updates*, as the official baseline.
- *Unused codes*: a code that no latent picks gets no gradient and stays where it
  is (the trainer's ``codebook_usage`` says how many rows are used). Two standard
  remedies, off by default as in the official baseline and on in the
  ``"small-28-vqvae-restarts"`` preset:

  - *k-means initialisation* (``kmeans_init``): before the first training step, the
    codebook becomes the k-means centroids (L2, as the search; ``KMEANS_ITERATIONS``
    Lloyd iterations from distinct random latents) of that step's encoder outputs;
  - *dead-code restarts* (``restart_unused_after = N``): a code that no latent chose
    in N consecutive training batches is replaced by a latent of the current batch.

  Both draw their random latents from the training step's generator, and their state
  (whether k-means ran, each code's batches since last chosen) is in buffers saved with
  the checkpoint, so ``lqae-train --resume`` continues exactly. Under DDP every rank
  counts the codes chosen on all ranks and takes rank 0's latents, so the codebooks
  stay equal.
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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: Lloyd iterations of the k-means initialisation (vector-quantize-pytorch's default).
KMEANS_ITERATIONS = 10


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
    kmeans_init : bool, default=False
        At the first training-mode call, set the codebook to the k-means
        centroids of that call's vectors.
    restart_unused_after : int, default=0
        At each training-mode call, first replace every code that no vector
        chose in this many consecutive training-mode calls by a vector of the
        call; 0 never.

    Attributes
    ----------
    codebook : torch.nn.Parameter
        The codes (codebook_size, dim), trained by the codebook term of the loss.
    kmeans_done : torch.Tensor
        Buffer (with ``kmeans_init``): whether the k-means initialisation ran.
    calls_unused : torch.Tensor
        Buffer (with ``restart_unused_after``): per code, the training-mode
        calls since a vector last chose it.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import LearnedQuantizer
    >>> quantizer = LearnedQuantizer(codebook_size=8, dim=4)
    >>> quantized, ids, codebook_loss, commitment = quantizer(torch.randn(2, 3, 4))
    >>> quantized.shape, ids.shape, quantizer.codebook_size
    (torch.Size([2, 3, 4]), torch.Size([2, 3]), 8)
    """

    def __init__(self, codebook_size: int, dim: int, rows_per_step: int = 16384, kmeans_init: bool = False,
                 restart_unused_after: int = 0):
        super().__init__()
        self.rows_per_step = rows_per_step
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) * dim**-0.5)
        self.kmeans_init = kmeans_init
        self.restart_unused_after = restart_unused_after
        # Buffers only for the options that are on: checkpoints without them load as before.
        if kmeans_init:
            self.register_buffer("kmeans_done", torch.tensor(False))
            self._kmeans_known_done = False  # a host-side copy, so that a step need not read the buffer
            self.register_load_state_dict_post_hook(_forget_kmeans_done)
        if restart_unused_after:
            self.register_buffer("calls_unused", torch.zeros(codebook_size, dtype=torch.long))

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
        return self._nearest_among(x.reshape(-1, x.shape[-1]), self.codebook.detach()).view(x.shape[:-1])

    def _nearest_among(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: the argmin must not depend on the mixed precision.
        with torch.autocast(flat.device.type, enabled=False):
            flat, codes = flat.float(), codes.float()
            half_sq_norms = 0.5 * (codes * codes).sum(dim=1)
            # |x - e|^2 / 2 = |x|^2 / 2 - x.e + |e|^2 / 2, and |x|^2 is the same for every code.
            ids = [(half_sq_norms - part @ codes.T).argmin(dim=1) for part in flat.split(self.rows_per_step)]
        return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=flat.device)

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

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Quantize ``x`` (B, T, dim).

        In training mode, the k-means initialisation and the dead-code restarts
        (where switched on) happen first, on ``x``.

        Parameters
        ----------
        x : torch.Tensor
            Encoder outputs (B, T, dim).
        generator : torch.Generator or None, default=None
            Source of the latents that k-means starts from and that restarts
            copy (on ``x``'s device); None uses torch's global generator.

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
        if self.training and (self.kmeans_init or self.restart_unused_after):
            self._reseed(x.detach().reshape(-1, x.shape[-1]).float(), generator)
        ids = self.nearest(x)
        if self.training and self.restart_unused_after:
            with torch.no_grad():
                chosen = _summed_over_ranks(torch.bincount(ids.flatten(), minlength=self.codebook_size)) > 0
                self.calls_unused.add_(1).masked_fill_(chosen, 0)
        # float32 on purpose, as in LanguageQuantizer: in bf16, x + (e - x) is not e once |x| >> |e|.
        x = x.float()
        e = self.embed(ids).float()
        codebook_loss = F.mse_loss(e, x.detach())
        commitment = F.mse_loss(x, e.detach())
        return x + (e - x).detach(), ids, codebook_loss, commitment

    @torch.no_grad()
    def _reseed(self, flat: torch.Tensor, generator: torch.Generator | None) -> None:
        """The k-means initialisation (once), then the restart of every dead code: no host sync on either."""
        if self.kmeans_init and not self._kmeans_known_done:
            if bool(self.kmeans_done):  # read once: a resumed run
                self._kmeans_known_done = True
            else:
                self.codebook.copy_(_same_on_every_rank(self._kmeans(flat, generator)))
                self.kmeans_done.fill_(True)
                self._kmeans_known_done = True
        if self.restart_unused_after:
            dead = self.calls_unused >= self.restart_unused_after
            # Candidates for every code, taken where dead: the same random draws whatever dies, and no sync.
            candidates = _same_on_every_rank(flat[_distinct_rows(flat.shape[0], self.codebook_size, generator, flat.device)])
            self.codebook.copy_(torch.where(dead.unsqueeze(1), candidates, self.codebook))
            self.calls_unused.masked_fill_(dead, 0)

    def _kmeans(self, flat: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Lloyd's k-means (L2) of ``flat`` from distinct random rows; an empty cluster keeps its centroid."""
        centroids = flat[_distinct_rows(flat.shape[0], self.codebook_size, generator, flat.device)]
        for _ in range(KMEANS_ITERATIONS):
            assignment = F.one_hot(self._nearest_among(flat, centroids), self.codebook_size).T.float()  # (K, n)
            counts = assignment.sum(dim=1, keepdim=True)
            # A matmul rather than index_add_: deterministic on CUDA.
            centroids = torch.where(counts > 0, (assignment @ flat) / counts.clamp(min=1), centroids)
        return centroids


def _distinct_rows(n: int, k: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``k`` random row indices below ``n``: distinct where ``n >= k``."""
    if n >= k:
        return torch.randperm(n, generator=generator, device=device)[:k]
    return torch.randint(n, (k,), generator=generator, device=device)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _same_on_every_rank(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (itself without DDP)."""
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def _summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks (itself without DDP)."""
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def _forget_kmeans_done(module: LearnedQuantizer, incompatible_keys) -> None:
    module._kmeans_known_done = False  # loaded weights: read the buffer again

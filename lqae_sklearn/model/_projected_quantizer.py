"""Nearest-word search in a learned low-dimensional space: the official code's ``quantizer_latent_dim``.

The official ``LanguageQuantizer`` (``lhao499/language-quantized-autoencoders`` at
79cd033, ``lqae/models/lqae.py``) with ``quantizer_latent_dim = d > 0``:

- *Two learned maps*, both ``Dense(d)`` with a bias: ``input_to_latent`` of the
  encoder output and ``code_to_latent`` of the frozen word-embedding rows.
- *Search*: nearest of ``l2norm(input_to_latent(x))`` among
  ``sg(l2norm(code_to_latent(codebook)))``, with the README's ``l2_normalize``:
  a cosine search in ``d`` dimensions (lines 84-103).
- *Passed on*: the chosen word's **raw** row, ``x + sg(q - x)`` (lines 105, 116, 134):
  the maps only decide which word; the LM reads its own word embedding.
- *Losses* (``get_train_loss`` run twice, lines 117-132, 168-195): once on the raw
  vectors, ``c * mse(sg(q), x)`` (its ``q`` term has no gradient: ``q`` is frozen), and
  once on the unnormalised projections, ``c * mse(sg(P_code(q)), P_in(x))`` (moves the
  encoder and ``input_to_latent``) plus ``mse(P_code(q), sg(P_in(x)))`` with weight 1
  (the only gradient ``code_to_latent`` gets). The README's ``c`` is 0.005.

With ``map_latents=False`` (``LQAEConfig.codebook_map``) only the rows are mapped,
by a learned ``D x D`` linear map (no bias) initialised to the identity, and the encoder output is
searched as it is: SimVQ's reparameterisation (Zhu et al., arXiv 2411.02038: one
linear map over a frozen codebook, so that every row moves when it learns), used
here for the search only.

Here the same, with our commitment weight ``w`` (0.01 by default: the official 0.005
counted twice, because with ``d = 0`` both branches are the identity): the raw and the
projected commitment terms each get ``w / 2``, and the map's term weight 1. The
search is an exact float32 argmax (the official ``approx_min_k`` is approximate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._quantizer import LanguageQuantizer

# flax's lecun_normal draws from a normal truncated at 2 std and rescales by this constant so that the
# variance is 1 / fan_in (jax.nn.initializers.variance_scaling, "truncated_normal").
_TRUNCATED_NORMAL_STD = 0.87962566103423978


class ProjectedLanguageQuantizer(LanguageQuantizer):
    """A :class:`LanguageQuantizer` that chooses the word in a learned ``search_dim``-dimensional space.

    Parameters
    ----------
    codebook : Tensor (V, D)
        The frozen word-embedding matrix (never trained).
    excluded_ids : sequence of int
        Rows that may never be chosen (special tokens).
    search_dim : int
        Width of the space searched (the official ``quantizer_latent_dim``);
        the rows' width ``D`` with ``map_latents=False``.
    chunk_size : int, default=8192
        Passed to :class:`LanguageQuantizer`.
    rescore_top_k : int, default=8
        Passed to :class:`LanguageQuantizer` (this search is float32 throughout).
    map_latents : bool, default=True
        Map the encoder output too (the official projection); False searches it
        as it is against rows mapped by a ``D x D`` map that starts as the
        identity (SimVQ-style).

    Attributes
    ----------
    input_map : torch.nn.Linear or torch.nn.Identity
        Encoder output (D) -> search space (``search_dim``).
    code_map : torch.nn.Linear
        Word row (D) -> search space (``search_dim``).

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import ProjectedLanguageQuantizer
    >>> quantizer = ProjectedLanguageQuantizer(torch.randn(100, 16), excluded_ids=[0], search_dim=4)
    >>> quantizer.nearest(torch.randn(2, 3, 16)).shape
    torch.Size([2, 3])
    """

    #: Scores computed at once by the search (tokens x allowed rows): 256 MB of float32.
    max_scores = 2**26

    def __init__(self, codebook: torch.Tensor, excluded_ids=(), search_dim: int = 32, chunk_size: int = 8192,
                 rescore_top_k: int = 8, map_latents: bool = True):
        super().__init__(codebook, excluded_ids, chunk_size=chunk_size, rescore_top_k=rescore_top_k)
        width = codebook.shape[1]
        if map_latents:
            self.input_map = nn.Linear(width, search_dim)
            self.code_map = nn.Linear(width, search_dim)
            for layer in (self.input_map, self.code_map):  # flax Dense's default: lecun_normal kernel, zero bias
                std = width**-0.5 / _TRUNCATED_NORMAL_STD
                nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(layer.bias)
        else:
            if search_dim != width:
                raise ValueError(f"with map_latents=False the search space is the rows' own ({width}), got {search_dim}")
            self.input_map = nn.Identity()
            # SimVQ's C W: linear, no bias (a bias shared by every row pulls them all one way).
            self.code_map = nn.Linear(width, width, bias=False)
            with torch.no_grad():  # start as the plain search
                self.code_map.weight.copy_(torch.eye(width))
        # The raw allowed rows, for the code map (non-persistent: derived from the LM, as the base's buffers).
        self.register_buffer("allowed_rows", codebook.detach().float()[self.allowed_ids], persistent=False)

    @property
    def search_dim(self) -> int:
        """Width of the space searched."""
        return self.code_map.out_features

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of the rows whose mapped rows are nearest, by cosine, to the mapped ``x`` (..., D).

        An exact float32 argmax over every allowed row; ties go to the lower id.

        Parameters
        ----------
        x : torch.Tensor
            Vectors (..., D).

        Returns
        -------
        torch.Tensor
            Vocabulary ids (...), int64.
        """
        with torch.autocast(x.device.type, enabled=False):
            queries = F.normalize(self.input_map(x.reshape(-1, x.shape[-1]).float()), dim=-1)
            rows = F.normalize(self.code_map(self.allowed_rows), dim=-1)
            step = max(1, self.max_scores // rows.shape[0])
            local = [(part @ rows.T).argmax(dim=1) for part in queries.split(step)]
        local = torch.cat(local) if local else torch.zeros(0, dtype=torch.long, device=x.device)
        return self.allowed_ids[local].view(x.shape[:-1])

    def losses(self, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The code map's term and the mean of the raw and the projected commitment terms.

        Parameters
        ----------
        x : torch.Tensor
            Encoder outputs (B, T, D), float32 (rescaled with ``normalize_latents``).
        q : torch.Tensor
            Their chosen raw rows (B, T, D), float32, without gradient.

        Returns
        -------
        codebook_loss : torch.Tensor
            ``mse(code_map(q), sg(input_map(x)))``: its gradient reaches ``code_map`` only.
        commitment : torch.Tensor
            ``(mse(x, q) + mse(input_map(x), sg(code_map(q)))) / 2``: its gradient
            reaches ``x`` and ``input_map``; weighted by ``commitment_weight``, each
            half gets the official per-branch weight.
        """
        with torch.autocast(x.device.type, enabled=False):
            mapped_x, mapped_q = self.input_map(x), self.code_map(q)
        codebook_loss = F.mse_loss(mapped_q, mapped_x.detach())
        commitment = 0.5 * (F.mse_loss(x, q) + F.mse_loss(mapped_x, mapped_q.detach()))
        return codebook_loss, commitment

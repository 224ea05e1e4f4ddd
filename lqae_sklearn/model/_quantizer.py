"""Nearest-word quantizer over a frozen codebook (the LM's input embeddings).

Nearest neighbour is by cosine similarity. On the CPU, and on CUDA with
``rescore_top_k=0``, the search is an exact float32 argmax over every allowed
row. On CUDA by default it is not exact by construction: every row is scored in
bf16 on the tensor cores and only the best ``rescore_top_k`` (8) are rescored in
float32, so a row whose bf16 score error pushes it out of the top 8 is missed.
``benchmarks/gpu_paper_scale.py`` measured the ids against the all-float32
search (65,536 of 65,536 equal on an H200). The official code's ``approx_min_k``
is a TPU approximation of the same kind. The quantizer passes on the *raw*
embedding row with a straight-through gradient, as the official code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LanguageQuantizer(nn.Module):
    """Snap vectors to their nearest allowed codebook row.

    Parameters
    ----------
    codebook : Tensor (V, D)
        The frozen word-embedding matrix. It is referenced, never trained: no
        parameter, no optimizer state.
    excluded_ids : sequence of int
        Rows that may never be chosen (special tokens).
    chunk_size : int
        Codebook rows scored at once, so a 50k-row codebook never materialises a
        (tokens x 50k) score matrix.
    rescore_top_k : int
        On CUDA, rows are first scored in bf16 on the tensor cores and the best
        ``rescore_top_k`` candidates are rescored in float32. A bf16 score error
        would have to push the true best row out of the top k to change the
        answer; ``benchmarks/gpu_paper_scale.py`` measures the agreement with the
        all-float32 search. 0 forces the all-float32 search everywhere.
    """

    def __init__(self, codebook: torch.Tensor, excluded_ids=(), chunk_size: int = 8192, rescore_top_k: int = 8):
        super().__init__()
        vocab = codebook.shape[0]
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[list(excluded_ids)] = False
        self.chunk_size = chunk_size
        self.rescore_top_k = rescore_top_k
        # Indices of the rows that may be chosen, and their unit-norm float32 copy
        # (non-persistent: both are derived from the LM, which is not saved with us).
        self.register_buffer("allowed_ids", allowed.nonzero().squeeze(1), persistent=False)
        normed = F.normalize(codebook.detach().float()[self.allowed_ids], dim=-1)
        self.register_buffer("normed", normed, persistent=False)
        self.register_buffer("normed_bf16", normed.to(torch.bfloat16), persistent=False)

    @property
    def codebook_size(self) -> int:
        """Number of rows that can be chosen."""
        return self.allowed_ids.numel()

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of the rows nearest to ``x`` (..., D) by cosine similarity."""
        flat = F.normalize(x.reshape(-1, x.shape[-1]).float(), dim=-1)
        if flat.is_cuda and self.rescore_top_k > 0:
            local = self._nearest_rescored(flat)
        else:
            local = self._nearest_exact(flat)
        return self.allowed_ids[local].view(x.shape[:-1])

    def _nearest_exact(self, flat: torch.Tensor) -> torch.Tensor:
        best = torch.full((flat.shape[0],), -torch.inf, device=flat.device)
        best_idx = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        with torch.autocast(flat.device.type, enabled=False):
            for start in range(0, self.normed.shape[0], self.chunk_size):
                scores = flat @ self.normed[start : start + self.chunk_size].T
                value, idx = scores.max(dim=1)
                better = value > best  # strict: ties keep the lower index, like argmax
                best = torch.where(better, value, best)
                best_idx = torch.where(better, idx + start, best_idx)
        return best_idx

    def _nearest_rescored(self, flat: torch.Tensor, rows_per_step: int = 16384) -> torch.Tensor:
        out = []
        with torch.autocast("cuda", enabled=False):
            # Token chunks bound the (tokens x V) bf16 score matrix to ~1.6 GB at V = 50k.
            for part in flat.split(rows_per_step):
                scores = part.to(torch.bfloat16) @ self.normed_bf16.T
                candidates = scores.topk(self.rescore_top_k, dim=1).indices  # (n, k)
                exact = torch.einsum("nd,nkd->nk", part, self.normed[candidates])
                out.append(candidates.gather(1, exact.argmax(dim=1, keepdim=True)).squeeze(1))
        return torch.cat(out)

    def forward(self, x: torch.Tensor, codebook: torch.Tensor, normalize_latents: bool = False):
        """Quantize ``x`` (B, T, D).

        Returns ``(quantized, ids, commitment)``: the raw codebook rows (float32)
        with a straight-through gradient to ``x``, their vocabulary ids, and the
        commitment loss ``mse(x, sg(q))`` (the codebook is frozen, so the
        codebook-side term of a VQ-VAE has no gradient and is left out).

        With ``normalize_latents``, ``x`` is first rescaled to the norm of its
        chosen row. The search is by cosine already, so this removes the one
        degree of freedom, the latent's length, that nothing else constrains.
        """
        ids = self.nearest(x)
        q = F.embedding(ids, codebook).float()
        # float32 on purpose: in bf16, x + (q - x) is not q once |x| >> |q|.
        x = x.float()
        if normalize_latents:
            x = F.normalize(x, dim=-1) * q.norm(dim=-1, keepdim=True)
        commitment = F.mse_loss(x, q)
        return x + (q - x).detach(), ids, commitment

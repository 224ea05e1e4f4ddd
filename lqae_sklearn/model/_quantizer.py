"""Nearest-word quantizer over a frozen codebook (the LM's input embeddings).

Nearest neighbour is by cosine similarity: the row whose exact dot product with the
float32 unit query is largest, the lowest row on exact ties.

- On a CPU, :class:`~lqae_sklearn.model._search.ExactSearch` returns exactly that row
  from float32 scores or from int8 scores (oneDNN's int8 GEMM), each with a proven error
  bound, every row inside the bound decided in float64 and, for ties, in exact arithmetic.
  Both give the same ids by construction (the proof is in ``_search``'s notes).
  ``LQAE_CPU_SEARCH`` chooses: ``auto`` (the default) uses int8 where a one-off
  measurement finds the int8 search clearly faster and the kernel's sums exact
  (:func:`~lqae_sklearn.model._search.cpu_int8_is_faster`), float32 elsewhere; ``float32`` and ``int8`` force one;
  ``bf16`` is the *rescored* search below (opt-in on CPUs with native bf16). Inside a
  ``torch.compile`` graph a CPU takes the float32 argmax instead (the exact search cannot be
  traced); it differs only where float32 rounding decides a near-tie.
- *rescored* (CUDA, and ``LQAE_CPU_SEARCH=bf16``): every row scored in bf16, then the best
  ``rescore_top_k`` (8) rescored in float32. Not exact by construction: a row whose bf16
  score error pushes it out of the top 8 is missed, and rows whose float32 scores tie may
  come out the other way. Measured equal to the float32 argmax on 65,536 of 65,536 latents
  on an H200 (``benchmarks/gpu_paper_scale.py``). ``rescore_top_k=0`` makes CUDA use the
  float32 argmax over every row instead.

The official code's ``approx_min_k`` is a TPU approximation of the rescored kind. The
quantizer passes on the *raw* embedding row with a straight-through gradient, as the
official code does.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from ._search import ExactSearch, cpu_int8_is_faster, int8_kernel_is_exact


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
        Codebook rows scored at once by the float32 argmax (CUDA with
        ``rescore_top_k=0``, devices other than CPU and CUDA), so a 50k-row codebook
        never materialises a (tokens x 50k) score matrix there.
    rescore_top_k : int
        Candidates rescored in float32 after the bf16 search, on CUDA and with
        ``LQAE_CPU_SEARCH=bf16`` (see the module notes). A bf16 score error would
        have to push the true best row out of the top k to change the answer. 0
        turns the bf16 search off: CUDA uses the float32 argmax, a CPU the exact search.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import LanguageQuantizer
    >>> quantizer = LanguageQuantizer(torch.eye(4), excluded_ids=[0])
    >>> quantizer.codebook_size, quantizer.vocab_size  # row 0 can never be chosen
    (3, 4)
    """

    def __init__(self, codebook: torch.Tensor, excluded_ids=(), chunk_size: int = 8192, rescore_top_k: int = 8):
        super().__init__()
        vocab = codebook.shape[0]
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[list(excluded_ids)] = False
        self._vocab_size = vocab
        self.chunk_size = chunk_size
        self.rescore_top_k = rescore_top_k
        # Indices of the rows that may be chosen, and their unit-norm float32 copy
        # (non-persistent: both are derived from the LM, which is not saved with us).
        self.register_buffer("allowed_ids", allowed.nonzero().squeeze(1), persistent=False)
        normed = F.normalize(codebook.detach().float()[self.allowed_ids], dim=-1)
        self.register_buffer("normed", normed, persistent=False)
        self.register_buffer("normed_bf16", normed.to(torch.bfloat16), persistent=False)
        self._exact = None  # the CPU search's derived state (norms, int8 rows), made on first use

    @property
    def codebook_size(self) -> int:
        """Number of rows that can be chosen."""
        return self.allowed_ids.numel()

    @property
    def vocab_size(self) -> int:
        """Rows of the full codebook, chosen or not: every id is in ``[0, vocab_size)``."""
        return self._vocab_size

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of the rows nearest to ``x`` (..., D) by cosine similarity.

        Parameters
        ----------
        x : torch.Tensor
            Vectors (..., D).

        Returns
        -------
        torch.Tensor
            Vocabulary ids (...), int64.
        """
        flat = F.normalize(x.reshape(-1, x.shape[-1]).float(), dim=-1)
        if flat.device.type == "cpu" and is_compiling():
            # The exact search's candidate bookkeeping (data-dependent shapes, oneDNN's prepacked int8
            # weights, exact tie-breaks) cannot be traced; a compiled graph takes the float32 argmax,
            # which differs from it only where float32 rounding decides a near-tie.
            local = self._nearest_float32_argmax(flat)
        elif flat.device.type == "cpu":
            search = cpu_search()
            if search == "bf16" and self.rescore_top_k > 0:
                local = self._nearest_rescored(flat)
            else:
                local = self._exact_search().nearest(flat, "int8" if search == "int8" else "float32")
        elif flat.is_cuda and self.rescore_top_k > 0:
            local = self._nearest_rescored(flat)
        else:
            local = self._nearest_float32_argmax(flat)
        return self.allowed_ids[local].view(x.shape[:-1])

    def _exact_search(self) -> ExactSearch:
        if self._exact is None or self._exact.rows is not self.normed:  # made again after .to()
            self._exact = ExactSearch(self.normed)
        return self._exact

    def _nearest_exact(self, flat: torch.Tensor) -> torch.Tensor:
        """The search without bf16: exact from float32 scores on a CPU, the float32 argmax elsewhere."""
        if flat.device.type == "cpu":
            return self._exact_search().nearest(flat)
        return self._nearest_float32_argmax(flat)

    def _nearest_float32_argmax(self, flat: torch.Tensor) -> torch.Tensor:
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

    def _nearest_rescored(self, flat: torch.Tensor) -> torch.Tensor:
        # Token chunks bound the (tokens x V) bf16 score matrix: ~1.6 GB at V = 50k on CUDA, ~120 MB on a CPU.
        rows_per_step = 16384 if flat.is_cuda else 2048
        out = []
        with torch.autocast(flat.device.type, enabled=False):
            for part in flat.split(rows_per_step):
                scores = part.to(torch.bfloat16) @ self.normed_bf16.T
                candidates = scores.topk(self.rescore_top_k, dim=1).indices.sort(dim=1).values  # (n, k), by row
                exact = torch.einsum("nd,nkd->nk", part, self.normed[candidates])
                out.append(candidates.gather(1, exact.argmax(dim=1, keepdim=True)).squeeze(1))
        return torch.cat(out)

    def forward(self, x: torch.Tensor, codebook: torch.Tensor, normalize_latents: bool = False):
        """Quantize ``x`` (B, T, D).

        With ``normalize_latents``, ``x`` is first rescaled to the norm of its
        chosen row. The search is by cosine already, so this removes the one
        degree of freedom, the latent's length, that nothing else constrains.

        Parameters
        ----------
        x : torch.Tensor
            Encoder outputs (B, T, D).
        codebook : torch.Tensor
            The embedding matrix (V, D) to take the rows from.
        normalize_latents : bool, default=False
            Rescale ``x`` to its chosen row's norm first.

        Returns
        -------
        quantized : torch.Tensor
            The raw codebook rows (float32) with a straight-through gradient to ``x``.
        ids : torch.Tensor
            Their vocabulary ids (B, T).
        codebook_loss : torch.Tensor
            The term that trains the codebook side (see :meth:`losses`): 0 here,
            as the codebook is frozen.
        commitment : torch.Tensor
            The commitment loss ``mse(x, sg(q))``.
        """
        ids = self.nearest(x)
        q = F.embedding(ids, codebook).float()
        # float32 on purpose: in bf16, x + (q - x) is not q once |x| >> |q|.
        x = x.float()
        if normalize_latents:
            x = F.normalize(x, dim=-1) * q.norm(dim=-1, keepdim=True)
        codebook_loss, commitment = self.losses(x, q)
        return x + (q - x).detach(), ids, codebook_loss, commitment

    def losses(self, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codebook term and the commitment term for latents ``x`` and their rows ``q``.

        The codebook is frozen, so a VQ-VAE's codebook term ``mse(sg(x), q)`` has
        no gradient and is 0 here; the commitment term is ``mse(x, sg(q))``.

        Parameters
        ----------
        x : torch.Tensor
            Encoder outputs (B, T, D), float32 (rescaled with ``normalize_latents``).
        q : torch.Tensor
            Their chosen rows (B, T, D), float32, without gradient.

        Returns
        -------
        codebook_loss : torch.Tensor
            0 (float32 scalar).
        commitment : torch.Tensor
            ``mse(x, q)``, with a gradient to ``x``.
        """
        return x.new_zeros(()), F.mse_loss(x, q)


@functools.cache
def cpu_search() -> str:
    """The CPU search that ``$LQAE_CPU_SEARCH`` asks for, resolved once per process.

    Returns
    -------
    str
        ``"int8"`` or ``"float32"`` (the exact search from int8 or float32 scores) or
        ``"bf16"`` (bf16 scores, top ``rescore_top_k`` rescored). The setting is ``auto``
        (default: int8 where :func:`~lqae_sklearn.model._search.cpu_int8_is_faster`,
        float32 elsewhere), ``float32``, ``int8`` or ``bf16``.
    """
    setting = os.environ.get("LQAE_CPU_SEARCH", "auto").strip().lower()
    if setting not in ("auto", "float32", "int8", "bf16"):
        raise ValueError(f"LQAE_CPU_SEARCH must be auto, float32, int8 or bf16, got {setting!r}")
    if setting == "int8" and not int8_kernel_is_exact():
        raise RuntimeError(
            "LQAE_CPU_SEARCH=int8, but this torch build's oneDNN int8 GEMM is missing or gave wrong sums "
            "on this CPU; use LQAE_CPU_SEARCH=float32 (or auto)")
    if setting == "auto":
        return "int8" if cpu_int8_is_faster() else "float32"
    return setting

"""Exact nearest-row search by cosine on the CPU: float32 or int8 scores, one exact decision.

**What is computed.** For a query ``q`` (a row of the float32 unit vectors that
:meth:`LanguageQuantizer.nearest` makes) and the float32 unit rows ``W`` of the codebook,
let ``s(r) = sum_i q_i W_ri`` be the *real* dot product of these float32 numbers. The
nearest row is ``r* = the lowest r with s(r) = max_r' s(r')``. This is defined by exact
arithmetic, not by a kernel; both searches here return ``r*`` for every query, so they
return the same ids by construction, whatever their kernels round. (A float32 matmul and
an argmax, the search this replaces, can miss ``r*`` when two rows' float32 scores round to
the same value or the wrong way round: a Fashion-MNIST token had two rows at 0.23955218 in
float32, the higher one ahead by 9.4e-9 in float64.) Each search has three steps.

**1. Scores with a proven bound.** A fast kernel scores a block of queries ``t`` against
every row, with ``|H(t, r) - c_t s(t, r)| <= e(t, r) = alpha_t u_r + beta_t v_r + const_t``
for a per-query scale ``c_t > 0`` (which orders the rows as ``s`` does):

- *float32* (:meth:`ExactSearch.nearest` with ``"float32"``): ``H = q @ W.T`` in float32,
  ``c_t = 1``. In any order of summation, with or without fused multiply-adds, a float32 dot
  product of D terms is off by at most ``gamma_D sum_i |q_i W_ri| <= gamma_D ||q|| ||W_r||``,
  ``gamma_D = D u / (1 - D u)``, ``u = 2**-24`` (Higham, *Accuracy and Stability of Numerical
  Algorithms*, 2nd ed., eq. 3.5). So ``alpha_t = gamma_D ||q_t||``, ``u_r = ||W_r||``, and
  ``const_t = (D + 1) 2**-125`` covers underflow, even flushed to zero. This needs IEEE
  float32 arithmetic: the products run with autocast off and with oneDNN's bf16/tf32 modes
  for float32 matmuls switched off (:func:`_ieee_float32_matmuls`).
- *int8* (:class:`Int8Codebook`): each row is quantized once, symmetrically,
  ``w^_r = sw_r wq_r`` with integers ``wq_r`` in [-63, 63]; each query of a block too,
  ``x^_t = sx_t xq_t`` with ``xq_t`` in [-127, 127] (uint8 with zero point 128). oneDNN's int8
  GEMM (``torch.ops.onednn.qlinear_pointwise``: the kernel that torchao's x86 int8 flow
  lowers to) gives ``H(t, r) = sw_r A(t, r)``, ``A = xq_t . wq_r``, with ``c_t = 1 / sx_t``.
  As ``q.W_r - x^_t.w^_r = q.(W_r - w^_r) + (q - x^_t).w^_r``, Cauchy-Schwarz gives
  ``|s - sx_t sw_r A| <= ||q|| ||W_r - w^_r|| + ||q - x^_t|| ||w^_r||``; the kernel's float32
  epilogue (``A`` times ``sw_r``) adds at most ``rho |sw_r A| <= rho ||xq_t|| ||w^_r||``, with
  ``rho = 2**-20`` (it rounds once or twice, ``<= 2**-23``; measured ``2**-24``). So
  ``u_r = ||W_r - w^_r||``, ``v_r = ||w^_r||``, ``alpha_t = ||q_t|| / sx_t`` and
  ``beta_t = ||q_t - x^_t|| / sx_t + rho ||xq_t||``, every norm computed per row and per query
  in float64 and enlarged past its rounding error. The premise is that ``A`` is exact. The integer sums
  are below 2**24, and a u8 x s8 pair sums to at most 2 * 255 * 63 < 2**15, so even x86
  kernels without VNNI, whose ``vpmaddubsw`` saturates pair sums at 16 bits, cannot
  saturate. (With 8-bit rows they would: oneDNN limited to AVX2 by
  ``ONEDNN_MAX_CPU_ISA=AVX2`` returns wrong sums then. Hence 7-bit rows.)
  :func:`int8_kernel_is_exact` checks the premise at the extremes on the running CPU
  before int8 is ever chosen.

**2. Candidates** (:func:`candidate_pairs`). Rows are grouped in blocks of
:data:`ROW_BLOCK`. With ``Hb(t, j)`` the largest score in block ``j`` and ``E(t, j)`` the
largest bound there, the row attaining ``Hb(t, j)`` has ``c_t s >= Hb(t, j) - E(t, j)``, so
``L_t = max_j (Hb(t, j) - E(t, j)) <= c_t s(t, r*)``. And ``c_t s(t, r*) <= H(t, r*) +
e(t, r*) <= H(t, r*) + E(t, j*)`` in the block ``j*`` of ``r*``: that block has
``Hb + E >= L_t`` and ``r*`` has ``H >= L_t - E(t, j*)``, so the candidates (every row of
such a block with ``H >= L_t - E``) contain ``r*``. For int8, rows are sorted by ``u_r``, so
that a block's largest bound is close to each of its rows'. The bounds are computed in
float64, ``L_t`` lowered by ``2**-40 (max |Hb| + max E)`` (far more than their rounding), and
the threshold ``L_t - E`` is rounded down to float32 for the comparison with ``H``.

**3. The decision** (:meth:`ExactSearch.decide`, the same for both searches). Candidates
are rescored in float32, with the float32 bound of step 1, then the survivors in float64,
where the products of float32 numbers are exact and the sum is off by at most
``gamma_D(2**-53) sum_i |q_i W_ri|``. At each stage a candidate whose score plus bound is
below another's score minus bound has a smaller ``s``, so it is not ``r*`` and is dropped.
Where one candidate is left, it is ``r*``. Where several are (equal to ~1e-13: duplicate
rows, true ties), they are compared exactly: ``math.fsum`` of the exact float64 products
``q_i W_ai`` and ``-q_i W_bi`` is the correctly rounded ``s(a) - s(b)``, so its sign is exact;
the lowest row wins exact ties.

Since the candidates of either search contain ``r*`` and the decision finds ``r*`` in any
set that contains it, the float32 and int8 searches return ``r*``: the same row.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager

import torch

#: Codebook rows per block of the candidate filter (blocks of 64 reduce fast on AVX2/AVX512).
ROW_BLOCK = 64
#: Queries scored at once by float32 and by int8 products: they bound the (queries x rows)
#: scores kept (29.5k rows: 120 MB and 30 MB); float32 products need tall blocks to run fast.
TOKEN_BLOCK = {"float32": 1024, "int8": 256}
#: Codebook rows per float32 product (a multiple of :data:`ROW_BLOCK`).
ROW_CHUNK = 8192
#: Largest query magnitude of the int8 search (8 bits; uint8 with zero point 128).
QUERY_LEVELS = 127
#: Largest row magnitude of the int8 search: 7 bits, so that no x86 kernel saturates.
ROW_LEVELS = 63
#: Candidate blocks above which a query of the int8 search is scored in float32 instead.
MAX_INT8_BLOCKS = 64
#: Relative error allowed for the int8 kernel's float32 epilogue (it makes <= 2**-23).
EPILOGUE_REL_ERR = 2.0**-20


def _gamma(n: int, unit: float) -> float:
    return n * unit / (1 - n * unit)


def _round_up(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Float64 norms or sums over ``dim`` terms, enlarged past their own rounding error."""
    return values * (1 + 2 * _gamma(dim + 2, 2.0**-53))


def _block_max(scores: torch.Tensor) -> torch.Tensor:
    """Largest score in each block of :data:`ROW_BLOCK` columns (the last one may be short)."""
    m, n = scores.shape
    full = n // ROW_BLOCK * ROW_BLOCK
    parts = [scores[:, :full].view(m, full // ROW_BLOCK, ROW_BLOCK).amax(-1)] if full else []
    if full < n:
        parts.append(scores[:, full:].amax(-1, keepdim=True))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def candidate_pairs(scores, alpha, beta, const, u, v, max_blocks=None):
    """Every (query, row) pair that may hold a query's exact nearest row (step 2 of the notes).

    Parameters
    ----------
    scores : list of torch.Tensor
        Scores ``H`` (M, N) as column chunks (M, N_i), float32, every chunk but the last a
        multiple of :data:`ROW_BLOCK` wide, with ``|H(t, r) - c_t s(t, r)| <= e(t, r)``.
    alpha, beta, const : torch.Tensor
        Per-query coefficients (M,) of ``e``, float64.
    u, v : torch.Tensor
        Per-row terms (N,) of ``e = alpha_t u_r + beta_t v_r + const_t``, float64, >= 0.
    max_blocks : int, optional
        Queries with more candidate blocks than this are left out (see ``loose``).

    Returns
    -------
    queries, rows : torch.Tensor
        The candidate pairs (int64); every query that is not loose has at least one.
    loose : torch.Tensor
        The queries left out (M,), bool.
    """
    m = scores[0].shape[0]
    block_scores = torch.cat([_block_max(chunk) for chunk in scores], dim=1).double()
    block_u, block_v = _block_max(u[None])[0], _block_max(v[None])[0]
    block_err = alpha[:, None] * block_u + beta[:, None] * block_v + const[:, None]
    lower = (block_scores - block_err).amax(1)
    lower -= 2.0**-40 * (block_scores.abs().amax(1) + block_err.amax(1))  # past float64 rounding
    inside_bound = block_scores + block_err >= lower[:, None]
    loose = torch.zeros(m, dtype=torch.bool)
    if max_blocks is not None:
        loose = inside_bound.sum(1) > max_blocks
        inside_bound[loose] = False
    queries, blocks = inside_bound.nonzero(as_tuple=True)
    # Within a block, H + E(t, j) >= L_t: compared in float32 against the float64 threshold
    # rounded down, so that no row that passes in float64 fails here.
    threshold = lower[queries] - block_err[queries, blocks]
    threshold32 = threshold.float()
    threshold32 = torch.where(threshold32.double() > threshold, torch.nextafter(threshold32, torch.tensor(-torch.inf)),
                              threshold32)
    found_queries, found_rows, first_row = [], [], 0
    for chunk in scores:
        width = chunk.shape[1]
        first_block, end_block = first_row // ROW_BLOCK, (first_row + width + ROW_BLOCK - 1) // ROW_BLOCK
        here = (blocks >= first_block) & (blocks < end_block)
        cols = (blocks[here] - first_block)[:, None] * ROW_BLOCK + torch.arange(ROW_BLOCK)
        inside = cols < width  # the last block may be short
        cols.clamp_(max=width - 1)
        keep = inside & (chunk[queries[here][:, None], cols] >= threshold32[here][:, None])
        found_queries.append(queries[here][:, None].expand_as(cols)[keep])
        found_rows.append(cols[keep] + first_row)
        first_row += width
    return torch.cat(found_queries), torch.cat(found_rows), loose


def _contenders(queries, candidates, score, err, num_queries):
    """The pairs whose ``score + err`` reaches their query's best ``score - err``: the others lose."""
    best_lower = torch.full((num_queries,), -torch.inf, dtype=torch.float64)
    best_lower.scatter_reduce_(0, queries, score - err, reduce="amax")
    keep = score + err >= best_lower[queries]
    return queries[keep], candidates[keep]


def _exact_sign_of_difference(q, a, b) -> int:
    """Sign of ``q.a - q.b`` in exact arithmetic (float32 inputs: every product is exact in float64)."""
    difference = math.fsum([qi * ai for qi, ai in zip(q, a)] + [-qi * bi for qi, bi in zip(q, b)])
    return (difference > 0) - (difference < 0)


@contextmanager
def _ieee_float32_matmuls():
    """float32 matmuls in IEEE float32, whatever ``torch.set_float32_matmul_precision`` says."""
    saved = torch.backends.mkldnn.matmul.fp32_precision
    if saved == "ieee":
        yield
        return
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved


class ExactSearch:
    """Exact nearest rows of a frozen codebook by cosine, from float32 or int8 scores.

    See the module notes for the definition and the proof that both score kinds give the
    same rows.

    Parameters
    ----------
    rows : torch.Tensor
        Unit codebook rows (N, D), float32, on the CPU. Frozen: what is derived from
        them (norms, the int8 copy) is computed once.
    """

    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self.dim = rows.shape[1]
        self.row_norms = _round_up(rows.double().norm(dim=1), self.dim)
        self._int8 = None  # made on first use

    def nearest(self, flat: torch.Tensor, scores: str = "float32") -> torch.Tensor:
        """Index of each query's exact nearest row.

        Parameters
        ----------
        flat : torch.Tensor
            Unit queries (Q, D), float32, on the CPU.
        scores : {"float32", "int8"}, default="float32"
            The kernel that scores every row; the result does not depend on it.

        Returns
        -------
        torch.Tensor
            Row index per query (Q,), int64.
        """
        if scores == "int8" and self._int8 is None:
            self._int8 = Int8Codebook(self.rows)
        candidates_of = {"float32": self._float32_candidates, "int8": self._int8_candidates}[scores]
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("nearest: the vectors to quantize contain NaN or infinite values")
        out = torch.zeros(flat.shape[0], dtype=torch.long)  # a zero query scores 0 everywhere: row 0
        nonzero = torch.nonzero(flat.abs().amax(1) > 0).flatten()
        with torch.autocast("cpu", enabled=False):
            for block in nonzero.split(TOKEN_BLOCK[scores]) if len(nonzero) else ():  # split(empty) gives one
                q = flat[block]
                queries, candidates = candidates_of(q)
                out[block] = self.decide(q, queries, candidates)
        return out

    def _float32_candidates(self, q: torch.Tensor):
        with _ieee_float32_matmuls():
            scores = [q @ chunk.T for chunk in self.rows.split(ROW_CHUNK)]
        alpha = _gamma(self.dim, 2.0**-24) * _round_up(q.double().norm(dim=1), self.dim)
        const = torch.full_like(alpha, (self.dim + 1) * 2.0**-125)
        zeros = torch.zeros_like(self.row_norms)
        queries, rows, _ = candidate_pairs(scores, alpha, torch.zeros_like(alpha), const, self.row_norms, zeros)
        return queries, rows

    def _int8_candidates(self, q: torch.Tensor):
        queries, candidates, loose = self._int8.candidates(q)
        # A query whose int8 bound is loose (a few huge components make its scale coarse) may have
        # candidates in hundreds of blocks: it takes float32 scores instead, whose candidates
        # contain r* as well. (Measured: 7 of 4,096 encoder outputs of the shipped checkpoint.)
        if loose.any():
            again = torch.nonzero(loose).flatten()
            more_queries, more_candidates = self._float32_candidates(q[again])
            queries = torch.cat([queries, again[more_queries]])
            candidates = torch.cat([candidates, more_candidates])
        return queries, candidates

    def decide(self, q: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The candidate of largest exact score for each query, lowest row on exact ties.

        Parameters
        ----------
        q : torch.Tensor
            Queries (M, D), float32.
        queries, candidates : torch.Tensor
            Candidate pairs (int64): query index into ``q`` and row index; every query at
            least once.

        Returns
        -------
        torch.Tensor
            Row index per query (M,), int64.
        """
        num_queries, dim = q.shape
        # float32 first (cheap), with the float32 search's bound, to drop the clear losers.
        score = torch.linalg.vecdot(q[queries], self.rows[candidates]).double()
        query_norms = _round_up(q.double().norm(dim=1), dim)
        err = _gamma(dim, 2.0**-24) * query_norms[queries] * self.row_norms[candidates]
        err += (dim + 1) * 2.0**-125 + 2.0**-50 * score.abs()  # underflow; rounding of score +- err
        queries, candidates = _contenders(queries, candidates, score, err, num_queries)
        # float64: products of float32 numbers are exact; the sum is off by gamma_D(2**-53) sum |q_i W_ri|.
        products = q[queries].double() * self.rows[candidates].double()
        score = products.sum(1)
        err = _round_up(_gamma(dim, 2.0**-53) * products.abs().sum(1), dim) + 2.0**-50 * score.abs()
        queries, candidates = _contenders(queries, candidates, score, err, num_queries)
        count = torch.bincount(queries, minlength=num_queries)
        out = torch.empty(num_queries, dtype=torch.long)
        single = count[queries] == 1
        out[queries[single]] = candidates[single]
        for query in torch.nonzero(count > 1).flatten().tolist():  # within ~1e-13: exact arithmetic
            tied = sorted(candidates[queries == query].tolist())
            values = q[query].double().tolist()
            best = tied[0]
            for row in tied[1:]:
                a, b = self.rows[row].double().tolist(), self.rows[best].double().tolist()
                if _exact_sign_of_difference(values, a, b) > 0:
                    best = row
            out[query] = best
        return out


class Int8Codebook:
    """A codebook's rows quantized to int8 for oneDNN, with their exact quantization errors.

    Parameters
    ----------
    rows : torch.Tensor
        Unit codebook rows (N, D), float32, on the CPU.
    """

    def __init__(self, rows: torch.Tensor):
        self.dim = rows.shape[1]
        scale = rows.abs().amax(1) / ROW_LEVELS
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: wq = 0
        quantized = torch.round(rows / scale[:, None]).clamp_(-ROW_LEVELS, ROW_LEVELS)
        dequantized = quantized.double() * scale.double()[:, None]  # exact: 7 + 24 bits
        error = _round_up((rows.double() - dequantized).norm(dim=1), self.dim)
        # Sorted by error, so that each row block's largest bound is close to each of its rows'.
        self.order = torch.argsort(error)
        self.error = error[self.order]
        self.norm = _round_up(dequantized.norm(dim=1), self.dim)[self.order]
        self.scale = scale[self.order].contiguous()
        self.weights = quantized[self.order].to(torch.int8).contiguous()
        self.zero_points = torch.zeros(len(self.weights), dtype=torch.long)
        self._packed = None

    def __getstate__(self):
        # oneDNN's packed weights can be neither copied nor pickled; they are made again on use.
        return {**self.__dict__, "_packed": None}

    def scores(self, q: torch.Tensor):
        """int8 scores of queries ``q`` against every row (in the order of :attr:`order`).

        Parameters
        ----------
        q : torch.Tensor
            Queries (M, D), float32.

        Returns
        -------
        scores : torch.Tensor
            ``sw_r (xq_t . wq_r)`` (M, N), float32.
        quantized : torch.Tensor
            ``xq`` (M, D), float32 holding integers in [-127, 127].
        scale : torch.Tensor
            ``sx`` (M,), float32.
        """
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weights, None)
        scale = q.abs().amax(1) / QUERY_LEVELS
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized = torch.round(q / scale[:, None]).clamp_(-QUERY_LEVELS, QUERY_LEVELS)
        as_uint8 = (quantized + (QUERY_LEVELS + 1)).to(torch.uint8)  # zero point 128: 1..255
        scores = torch.ops.onednn.qlinear_pointwise(
            as_uint8, 1.0, QUERY_LEVELS + 1, self._packed, self.scale, self.zero_points,
            None, 1.0, 0, torch.float32, "none", [], "")
        return scores, quantized, scale

    def candidates(self, q: torch.Tensor):
        """Candidate pairs (query, row) from int8 scores: step 2 of the module notes.

        Parameters
        ----------
        q : torch.Tensor
            Unit queries (M, D), float32.

        Returns
        -------
        queries, rows : torch.Tensor
            The candidate pairs (int64), rows in the codebook's own order.
        loose : torch.Tensor
            Queries (M,), bool, with more than :data:`MAX_INT8_BLOCKS` candidate blocks:
            left out of the pairs.
        """
        scores, quantized, scale = self.scores(q)
        q64, scale64 = q.double(), scale.double()
        query_error = _round_up((q64 - quantized.double() * scale64[:, None]).norm(dim=1), self.dim)
        alpha = _round_up(q64.norm(dim=1), self.dim) / scale64
        beta = query_error / scale64 + EPILOGUE_REL_ERR * _round_up(quantized.double().norm(dim=1), self.dim)
        alpha, beta = alpha * (1 + 2.0**-50), beta * (1 + 2.0**-50)  # the divisions' rounding
        queries, sorted_rows, loose = candidate_pairs(
            [scores], alpha, beta, torch.zeros_like(alpha), self.error, self.norm, max_blocks=MAX_INT8_BLOCKS)
        return queries, self.order[sorted_rows], loose


@functools.cache
def int8_kernel_is_exact() -> bool:
    """Whether oneDNN's int8 GEMM gives exact integer sums here at the search's extremes.

    Returns
    -------
    bool
        False where the sums are wrong (a kernel that saturates) or this build of torch
        has no oneDNN int8 kernels.
    """
    try:
        width = 384
        rows = torch.tensor([[ROW_LEVELS] * width, [-ROW_LEVELS] * width, [ROW_LEVELS, -ROW_LEVELS] * (width // 2)],
                            dtype=torch.int8)
        queries = torch.tensor([[QUERY_LEVELS] * width, [-QUERY_LEVELS] * width, [QUERY_LEVELS, 0] * (width // 2)] * 6)
        packed = torch.ops.onednn.qlinear_prepack(rows, None)
        for m in (1, 3, 18):  # a vector, a small and a larger block: oneDNN may pick different kernels
            got = torch.ops.onednn.qlinear_pointwise(
                (queries[:m] + QUERY_LEVELS + 1).to(torch.uint8), 1.0, QUERY_LEVELS + 1, packed,
                torch.ones(3), torch.zeros(3, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
            if not torch.equal(got.long(), queries[:m] @ rows.long().T):  # |sums| < 2**24: exact in float32
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError):  # no oneDNN int8 kernels in this build
        return False


@functools.cache
def cpu_int8_is_faster() -> bool:
    """Whether the int8 search beats the float32 one here by a clear margin (measured once per process, ~1 s).

    Returns
    -------
    bool
        True where :func:`int8_kernel_is_exact` and the whole int8 search (scores,
        candidates, decision) of 256 random queries against 16,384 random rows of width 384
        takes under 1/1.25 of the float32 search's time (best of 3 alternating runs each).
    """
    if not int8_kernel_is_exact():
        return False
    g = torch.Generator().manual_seed(0)
    search = ExactSearch(torch.nn.functional.normalize(torch.randn(16384, 384, generator=g), dim=1))
    queries = torch.nn.functional.normalize(torch.randn(256, 384, generator=g), dim=1)
    seconds = {"float32": [], "int8": []}
    for _ in range(4):  # the first round warms up (and makes the int8 rows)
        for scores in seconds:
            start = time.perf_counter()
            search.nearest(queries, scores)
            seconds[scores].append(time.perf_counter() - start)
    return min(seconds["int8"][1:]) * 1.25 < min(seconds["float32"][1:])

"""The exact CPU search (``model/_search.py``): float32 and int8 scores give the exact nearest row.

The reference is exact integer arithmetic: every float32 number is an integer times 2**-149, so
``s(r) = q . W_r`` is computed exactly with Python integers, and the nearest row is the lowest
``r`` of largest ``s``. Codebooks are small and random (plus constructed near-ties) so that
the reference stays fast; one test runs the shipped checkpoint on the 500 shipped test images.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lqae_sklearn.model import LanguageQuantizer, _quantizer, _search
from lqae_sklearn.model._search import ExactSearch, Int8Codebook

from conftest import fashion_mnist_subset

SCORES = ("float32", "int8")


def exact_ints(t: torch.Tensor) -> list:
    """float32 values as exact integers in units of 2**-149 (float32's smallest step)."""
    return [[int(v) for v in row] for row in (t.double() * 2.0**149).tolist()]


def exact_nearest(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The lowest row of largest exact dot product, by integer arithmetic."""
    rows_int = exact_ints(rows)
    out = []
    for q in exact_ints(flat):
        scores = [sum(a * b for a, b in zip(q, w)) for w in rows_int]
        out.append(scores.index(max(scores)))  # index() finds the lowest on ties
    return torch.tensor(out)


def unit(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t.float(), dim=-1)


def nudge(t: torch.Tensor, steps: int) -> torch.Tensor:
    """``t`` moved by ``steps`` float32 ulps, element-wise."""
    out = t.clone()
    for _ in range(abs(steps)):
        out = torch.nextafter(out, torch.full_like(out, np.inf if steps > 0 else -np.inf))
    return out


@pytest.fixture(scope="module")
def random_case():
    g = torch.Generator().manual_seed(0)
    rows = unit(torch.randn(300, 24, generator=g))
    flat = unit(torch.randn(60, 24, generator=g))
    return flat, rows


@pytest.mark.parametrize("scores", SCORES)
def test_random_queries_get_the_exact_nearest_row(random_case, scores):
    flat, rows = random_case
    expected = exact_nearest(flat, rows)
    assert torch.equal(ExactSearch(rows).nearest(flat, scores), expected)


def near_tie_case():
    """Rows built to tie with others: duplicates, 1-ulp differences both ways, exact ties that
    float32 sums in different orders, and plain random rows around them."""
    g = torch.Generator().manual_seed(1)
    dim = 32
    rows = unit(torch.randn(256, dim, generator=g))
    queries = []
    # Duplicates: rows 10, 40 and 200 are the same vector; the query is that vector.
    rows[40] = rows[10]
    rows[200] = rows[10]
    queries.append(rows[10])
    # Rows one float32 ulp apart in one component: the scores differ by ~1e-9, far below
    # float32's resolution of a score near 1; the greater one sits below and above the other.
    for low, high, step in ((50, 60, 1), (70, 80, -1)):
        base = rows[low].clone()
        rows[high] = base
        rows[high][3] = nudge(base[3:4], step)[0]
        q = base.clone()
        queries.append(q)
    # Permuted rows and a query with equal components: the exact scores tie (same products,
    # another order), their float32 sums need not.
    q = unit(torch.ones(dim))
    permuted = unit(torch.rand(dim, generator=g) + 1)  # all positive: the largest sums, so the best rows
    rows[90], rows[91], rows[95] = permuted.flip(0), permuted, permuted.roll(5)
    queries.append(q)
    # Queries right between two rows: equal exact distance in theory, float32 decides.
    for a, b in ((120, 121), (130, 131)):
        queries.append(unit(rows[a] + rows[b]))
    # Many rows within 1e-7 of each other around a query: the multi-candidate path.
    centre = unit(torch.randn(dim, generator=g))
    for r in range(150, 170):
        rows[r] = unit(centre + 1e-7 * torch.randn(dim, generator=g))
    queries.append(centre)
    # Fifteen copies of a query, each one ulp off in one component (either way): exact scores
    # ~1e-9 apart, below float32's rounding of the scores, so their float32 order is noise.
    for first in (210, 225, 240):
        q = unit(torch.randn(dim, generator=g))
        for k in range(15):
            rows[first + k] = q
            rows[first + k][k] = nudge(q[k : k + 1], 1 if k % 2 else -1)[0]
        queries.append(q)
    queries += list(unit(torch.randn(20, dim, generator=g)))
    return torch.stack(queries), rows


@pytest.mark.parametrize("scores", SCORES)
def test_adversarial_near_ties_get_the_exact_nearest_row(scores):
    flat, rows = near_tie_case()
    expected = exact_nearest(flat, rows)
    assert expected[0] == 10  # duplicates: the lowest row
    assert {int(expected[3])} <= {90, 91, 95} and expected[3] == 90  # exact tie: the lowest row
    assert torch.equal(ExactSearch(rows).nearest(flat, scores), expected)


def test_the_near_tie_case_defeats_a_float32_argmax():
    """Control: the constructed near-ties are ones that a float32 argmax gets wrong, so the
    test above checks something a plain search fails."""
    flat, rows = near_tie_case()
    argmax = (flat @ rows.T).argmax(1)
    assert (argmax != exact_nearest(flat, rows)).any()


def reordering_case():
    """Rows just apart from the best one, so that int8 rounding reorders many of them."""
    g = torch.Generator().manual_seed(2)
    dim = 64
    centres = unit(torch.randn(40, dim, generator=g))
    rows = unit(centres.repeat_interleave(8, 0) + 0.01 * torch.randn(320, dim, generator=g))
    flat = unit(centres + 0.01 * torch.randn(40, dim, generator=g))
    return flat, rows


def test_int8_rounding_alone_reorders_rows_and_the_search_still_is_exact():
    flat, rows = reordering_case()
    expected = exact_nearest(flat, rows)
    codebook = Int8Codebook(rows)
    int8_scores, _, _ = codebook.scores(flat)
    int8_argmax = codebook.order[int8_scores.argmax(1)]
    assert (int8_argmax != expected).sum() >= 3  # int8 scores alone pick other rows
    assert torch.equal(ExactSearch(rows).nearest(flat, "int8"), expected)
    assert torch.equal(ExactSearch(rows).nearest(flat, "float32"), expected)


def test_the_int8_error_bound_holds_for_every_pair(monkeypatch):
    """|H - s / sx| <= e for every (query, row): the bound of the module notes, checked in float64
    (whose own error, ~1e-16, is far below the bound's ~1e-2 scale)."""
    flat, rows = reordering_case()
    codebook = Int8Codebook(rows)
    captured = {}
    original = _search.candidate_pairs

    def capture(scores, alpha, beta, const, u, v, **kwargs):
        captured.update(scores=scores, alpha=alpha, beta=beta, const=const, u=u, v=v)
        return original(scores, alpha, beta, const, u, v, **kwargs)

    monkeypatch.setattr(_search, "candidate_pairs", capture)
    codebook.candidates(flat)
    _, _, scale = codebook.scores(flat)
    exact = (flat.double() @ rows.double()[codebook.order].T) / scale.double()[:, None]
    c = captured
    bound = c["alpha"][:, None] * c["u"] + c["beta"][:, None] * c["v"] + c["const"][:, None]
    error = (torch.cat(c["scores"], dim=1).double() - exact).abs()
    assert (error <= bound).all()
    assert (error / bound).max() > 0.05  # and is not vacuous


def test_with_rows_int8_holds_exactly_the_whole_error_is_the_querys():
    """Rows of integers times 2**-6 with a largest entry of 63: int8 holds them exactly, so the row term
    of the bound is 0 and only the query term can cover the error (the search does not need unit rows)."""
    g = torch.Generator().manual_seed(8)
    ints = torch.randint(-62, 63, (2000, 16), generator=g)
    ints[torch.arange(2000), torch.randint(0, 16, (2000,), generator=g)] = 63
    rows = ints.float() * 2.0**-6
    flat = unit(rows[:300] + 0.5 * torch.randn(300, 16, generator=g))
    search = ExactSearch(rows)
    search.nearest(flat[:1], "int8")
    assert search._int8.error.max() == 0  # exact in int8
    expected = exact_nearest(flat, rows)
    scores, _, _ = search._int8.scores(flat)
    scores_of_expected = scores.gather(1, torch.argsort(search._int8.order)[expected][:, None])[:, 0]
    assert (scores.amax(1) > scores_of_expected).sum() >= 3  # int8 scores alone rank another row first
    assert torch.equal(search.nearest(flat, "int8"), expected)


def test_the_float32_error_bound_holds_for_every_pair(monkeypatch):
    """|H - s| <= e for every (query, row) of the float32 scores, s in float64 (error ~1e-16)."""
    flat, rows = reordering_case()
    captured = {}
    original = _search.candidate_pairs

    def capture(scores, alpha, beta, const, u, v, **kwargs):
        captured.update(scores=scores, alpha=alpha, beta=beta, const=const, u=u, v=v)
        return original(scores, alpha, beta, const, u, v, **kwargs)

    monkeypatch.setattr(_search, "candidate_pairs", capture)
    ExactSearch(rows).nearest(flat, "float32")
    c = captured
    bound = c["alpha"][:, None] * c["u"] + c["beta"][:, None] * c["v"] + c["const"][:, None]
    error = (torch.cat(c["scores"], dim=1).double() - flat.double() @ rows.double().T).abs()
    assert (error <= bound).all()
    assert error.max() > 0  # float32 rounding is there to bound


@pytest.mark.parametrize("scores", SCORES)
def test_random_data_at_scale_both_searches_agree_with_float64(scores):
    """4,096 queries against 5,000 rows of width 96: every id equals the float64 argmax (no near-ties
    at 1e-12 in such data: asserted), and the int8 search's equal the float32 search's."""
    g = torch.Generator().manual_seed(3)
    rows = unit(torch.randn(5000, 96, generator=g))
    flat = unit(torch.randn(4096, 96, generator=g))
    scores64 = flat.double() @ rows.double().T
    top2 = scores64.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-12
    got = ExactSearch(rows).nearest(flat, scores)
    assert torch.equal(got, scores64.argmax(1))


def test_zero_queries_get_the_first_row_no_queries_no_ids_and_bad_values_are_refused():
    rows = unit(torch.randn(50, 16, generator=torch.Generator().manual_seed(4)))
    search = ExactSearch(rows)
    flat = torch.zeros(3, 16)
    flat[1] = rows[7]
    for scores in SCORES:
        assert search.nearest(flat, scores).tolist() == [0, 7, 0]  # a zero query scores 0 with every row
        with pytest.raises(ValueError, match="NaN or infinite"):
            search.nearest(torch.full((2, 16), float("nan")), scores)
        assert search.nearest(torch.zeros(0, 16), scores).shape == (0,)  # no queries, no ids


def test_the_float32_search_ignores_reduced_precision_matmul_settings():
    flat, rows = near_tie_case()
    expected = exact_nearest(flat, rows)
    saved = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        assert torch.equal(ExactSearch(rows).nearest(flat, "float32"), expected)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # restored after the search
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved


def test_the_int8_kernel_premise_holds_here_and_fails_where_sums_saturate(monkeypatch):
    """On this CPU the int8 sums at the extremes are exact. The probe itself catches wrong sums:
    with 8-bit rows a kernel without VNNI saturates, which we imitate with a kernel that clips."""
    assert _search.int8_kernel_is_exact()
    real = torch.ops.onednn.qlinear_pointwise

    class Ops:  # qlinear_pointwise whose float sums are clipped as a saturating kernel's are
        @staticmethod
        def qlinear_pointwise(*args):
            return real(*args).clamp(-2.0**18, 2.0**18)

        qlinear_prepack = staticmethod(torch.ops.onednn.qlinear_prepack)

    monkeypatch.setattr(_search.torch.ops, "onednn", Ops)
    _search.int8_kernel_is_exact.cache_clear()
    try:
        assert not _search.int8_kernel_is_exact()
    finally:
        monkeypatch.undo()
        _search.int8_kernel_is_exact.cache_clear()


def test_the_quantizer_copies_and_pickles_after_an_int8_search():
    rows = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
    quantizer = LanguageQuantizer(rows, excluded_ids=[0])
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(6))
    ids = quantizer._exact_search().nearest(unit(x), "int8")
    for other in (copy.deepcopy(quantizer), pickle.loads(pickle.dumps(quantizer))):
        assert torch.equal(other._exact_search().nearest(unit(x), "int8"), ids)


def test_the_shipped_checkpoint_gives_the_same_ids_with_either_search(monkeypatch):
    """The 500 shipped test images through the shipped checkpoint, encoded with the int8 search
    (``LQAE_CPU_SEARCH=int8``): the float32 search gives the same ids on the same encoder
    outputs, and on 20 images both equal a float64 argmax over every row."""
    from lqae_sklearn import LQAETokenizer

    images, _ = fashion_mnist_subset("test")
    tok = LQAETokenizer(output="ids", batch_size=250).fit()
    quantizer = tok.model_.quantizer
    real_nearest = quantizer.nearest
    latents = []

    def recording(x):
        latents.append(x.detach().clone())
        return real_nearest(x)

    monkeypatch.setattr(quantizer, "nearest", recording)
    monkeypatch.setenv("LQAE_CPU_SEARCH", "int8")
    _quantizer.cpu_search.cache_clear()
    int8_ids = tok.transform(images)
    monkeypatch.setenv("LQAE_CPU_SEARCH", "float32")
    _quantizer.cpu_search.cache_clear()
    try:
        float32_ids = torch.cat([real_nearest(z).reshape(-1) for z in latents]).numpy()
    finally:
        _quantizer.cpu_search.cache_clear()
    assert int8_ids.shape == (500, 49)
    np.testing.assert_array_equal(float32_ids, int8_ids.reshape(-1))
    flat = unit(torch.cat([z.reshape(-1, z.shape[-1]) for z in latents])[: 20 * 49])
    expected = quantizer.allowed_ids[(flat.double() @ quantizer.normed.double().T).argmax(1)].numpy()
    np.testing.assert_array_equal(float32_ids[: 20 * 49], expected)


def test_a_query_with_a_loose_int8_bound_is_scored_in_float32_and_stays_exact(monkeypatch):
    """A query inside a tight cluster of 4,500 rows (all within the int8 bound of each other) has
    candidates in more than MAX_INT8_BLOCKS blocks, so it takes float32 scores. The answer is the
    exact one either way."""
    g = torch.Generator().manual_seed(7)
    centre = torch.randn(32, generator=g)
    rows = unit(torch.cat([centre + 1e-3 * torch.randn(4500, 32, generator=g), torch.randn(500, 32, generator=g)]))
    flat = unit(torch.cat([(centre + 1e-3 * torch.randn(32, generator=g))[None], torch.randn(5, 32, generator=g)]))
    search = ExactSearch(rows)
    rescored = []
    real = search._float32_candidates
    monkeypatch.setattr(search, "_float32_candidates", lambda q: rescored.append(len(q)) or real(q))
    assert torch.equal(search.nearest(flat, "int8"), exact_nearest(flat, rows))
    assert rescored == [1]  # the query in the cluster, and only it

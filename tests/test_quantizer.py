"""The frozen-codebook quantizer: cosine search (exact from float32 or int8 scores, and bf16 + rescoring), exclusions,
chunking, straight-through. The exact search's proofs are tested in test_search.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lqae_sklearn import LQAE
from lqae_sklearn.model import LanguageQuantizer, _quantizer, _search

from conftest import tiny_config


@pytest.fixture(autouse=True, params=["float32", "int8", "bf16"])
def cpu_search(request, monkeypatch):
    """Every test runs with each CPU search: exact from float32 or int8 scores, and bf16 with float32 rescoring."""
    monkeypatch.setenv("LQAE_CPU_SEARCH", request.param)
    _quantizer.cpu_search.cache_clear()
    yield request.param
    _quantizer.cpu_search.cache_clear()


def brute_force_nearest(x: torch.Tensor, codebook: torch.Tensor, excluded) -> torch.Tensor:
    """float64 cosine argmax over the allowed rows, independently of the quantizer's code."""
    xs = F.normalize(x.reshape(-1, x.shape[-1]).double(), dim=-1)
    rows = F.normalize(codebook.double(), dim=-1)
    scores = xs @ rows.T
    scores[:, list(excluded)] = -np.inf
    return scores.argmax(dim=1).view(x.shape[:-1])


def assert_same_or_tied(ids, expected, x, codebook, tol=1e-6):
    """Equal ids, except where the two rows score within ``tol`` in float64 (a genuine tie)."""
    differ = ids != expected
    if differ.any():
        xs = F.normalize(x[differ].double(), dim=-1)
        rows = F.normalize(codebook.double(), dim=-1)
        gap = (xs * rows[expected[differ]]).sum(-1) - (xs * rows[ids[differ]]).sum(-1)
        assert gap.abs().max() < tol, f"{int(differ.sum())} ids differ from the float64 argmax (score gap {gap.max():.2e})"
    # Near-ties are rare: nearly all vectors must match exactly.
    assert differ.float().mean() < 0.01


def test_nearest_matches_float64_bruteforce_on_random_codebook():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(700, 24, generator=g) * torch.rand(700, 1, generator=g) * 3  # uneven row norms
    excluded = torch.randperm(700, generator=g)[:60].tolist()
    x = torch.randn(3, 50, 24, generator=g) * 5
    quantizer = LanguageQuantizer(codebook, excluded, chunk_size=128)
    ids = quantizer.nearest(x)
    assert ids.shape == (3, 50) and ids.dtype == torch.int64
    expected = brute_force_nearest(x, codebook, excluded)
    assert_same_or_tied(ids, expected, x, codebook)
    # Cosine, not Euclidean: scaling a vector never changes its word.
    assert torch.equal(quantizer.nearest(x * 1e-3), ids)


def test_nearest_matches_float64_bruteforce_on_minilm_codebook(minilm):
    codebook = minilm.codebook.detach()
    excluded = minilm.excluded_token_ids()
    quantizer = LanguageQuantizer(codebook, excluded)
    x = torch.randn(64, codebook.shape[1], generator=torch.Generator().manual_seed(1))
    assert_same_or_tied(quantizer.nearest(x), brute_force_nearest(x, codebook, excluded), x, codebook)


def test_nearest_is_the_exact_nearest_row_on_near_ties(cpu_search):
    """Duplicate rows, rows one ulp apart, exact ties that float32 sums round apart: the ids are the
    exact nearest rows (lowest on exact ties) with either exact search. (The float32 argmax used
    before got 9 of these 30 queries wrong; the bf16 search is not exact by construction.)"""
    if cpu_search == "bf16":
        pytest.skip("the bf16 search is not exact by construction")
    from test_search import exact_nearest, near_tie_case

    x, codebook = near_tie_case()
    quantizer = LanguageQuantizer(codebook)
    expected = exact_nearest(F.normalize(x, dim=-1), quantizer.normed)
    assert torch.equal(quantizer.nearest(x), expected)


def test_excluded_ids_are_never_produced(minilm):
    codebook = minilm.codebook.detach()
    excluded = minilm.excluded_token_ids()
    tokens = minilm.tokenizer.convert_ids_to_tokens(excluded)
    assert {"[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[unused0]"} <= set(tokens)
    # The hardest input: the excluded rows themselves (cosine 1 with a forbidden word).
    quantizer = LanguageQuantizer(codebook, excluded)
    ids = quantizer.nearest(codebook[excluded])
    assert not set(ids.tolist()) & set(excluded)
    assert quantizer.codebook_size == minilm.vocab_size - len(excluded)
    # Control: without the exclusion the same inputs do pick special rows.
    unrestricted = LanguageQuantizer(codebook, [])
    assert minilm.mask_token_id in set(unrestricted.nearest(codebook[excluded]).tolist())


def test_model_codebook_exclude_setting(minilm, fmnist_batch):
    torch.manual_seed(0)
    special = LQAE(tiny_config(), minilm).eval()
    assert special.quantizer.codebook_size == minilm.vocab_size - len(minilm.excluded_token_ids())
    ids = special.encode(fmnist_batch)
    assert not set(ids.unique().tolist()) & set(minilm.excluded_token_ids())
    everything = LQAE(tiny_config(codebook_exclude="none"), minilm)
    assert everything.quantizer.codebook_size == minilm.vocab_size


def test_chunk_size_does_not_change_ids():
    chunk_sizes = (13, 64, 700, 5000)  # uneven split, exact fit, larger than the codebook
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(700, 16, generator=g)
    excluded = [0, 5, 699]
    x = torch.randn(40, 16, generator=g)
    results = [LanguageQuantizer(codebook, excluded, chunk_size=c).nearest(x) for c in chunk_sizes]
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_chunk_size_does_not_change_ids_on_minilm(minilm, fmnist_batch):
    codebook = minilm.codebook.detach()
    excluded = minilm.excluded_token_ids()
    # Real encoder outputs from a tiny model, so the query vectors are not just Gaussian noise.
    torch.manual_seed(0)
    with torch.no_grad():
        z = LQAE(tiny_config(), minilm).encoder(fmnist_batch[:4])
    small = LanguageQuantizer(codebook, excluded, chunk_size=1000).nearest(z)
    whole = LanguageQuantizer(codebook, excluded, chunk_size=50_000).nearest(z)
    assert torch.equal(small, whole)


def test_bfloat16_latents_get_float64_nearest_rows_and_an_exact_straight_through():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(300, 32, generator=g)
    # bf16 encoder outputs far longer than the word rows, as under autocast in training.
    x = (torch.randn(4, 20, 32, generator=g) * 300).to(torch.bfloat16)
    quantizer = LanguageQuantizer(codebook, excluded_ids=[0, 1])
    # Reference: cosine in float64 over the allowed rows, by brute force.
    cosine = F.normalize(x.double(), dim=-1) @ F.normalize(codebook.double(), dim=-1).T
    cosine[..., :2] = -2
    expected = cosine.argmax(dim=-1)
    assert torch.equal(quantizer.nearest(x), expected)
    out, ids, _, _ = quantizer(x, codebook)
    assert torch.equal(ids, expected)
    # x + (q - x) computed in bf16 would miss q by up to ~|x| * 2**-8 (about 1 here); in float32 it is q.
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, codebook[expected], rtol=0, atol=1e-4)


def test_straight_through_forward_is_codebook_rows_and_gradient_is_identity():
    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(200, 12, generator=g)
    quantizer = LanguageQuantizer(codebook, [3])
    x = (torch.randn(2, 9, 12, generator=g) * 4).requires_grad_()
    out, ids, codebook_loss, commitment = quantizer(x, codebook)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, codebook[ids], rtol=0, atol=1e-6)
    assert torch.equal(ids, quantizer.nearest(x))
    torch.testing.assert_close(commitment, F.mse_loss(x, codebook[ids]))
    assert codebook_loss == 0 and not codebook_loss.requires_grad  # the codebook is frozen: no codebook term
    upstream = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(grad, upstream)  # straight through: d out / d x = identity
    # The commitment loss pulls x towards its (fixed) word: gradient 2 (x - q) / N.
    (grad_commit,) = torch.autograd.grad(commitment, x)
    torch.testing.assert_close(grad_commit, 2 * (x - codebook[ids]).detach() / x.numel())


def test_straight_through_with_normalized_latents_ignores_length():
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(200, 12, generator=g)
    quantizer = LanguageQuantizer(codebook)
    x = (torch.randn(2, 9, 12, generator=g) * 4).requires_grad_()
    out, ids, _, commitment = quantizer(x, codebook, normalize_latents=True)
    torch.testing.assert_close(out, codebook[ids], rtol=0, atol=1e-5)
    rescaled = F.normalize(x, dim=-1) * codebook[ids].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(commitment, F.mse_loss(rescaled, codebook[ids]))
    (grad,) = torch.autograd.grad(out, x, torch.randn(out.shape, generator=g))
    # A function of x's direction only has a gradient orthogonal to x, and a non-zero one.
    radial = (grad * x).sum(-1) / (grad.norm(dim=-1) * x.norm(dim=-1))
    assert radial.abs().max() < 1e-4
    assert grad.norm(dim=-1).min() > 0


def test_quantizer_owns_no_trainable_or_saved_state():
    quantizer = LanguageQuantizer(torch.randn(50, 8), [1, 2])
    assert list(quantizer.parameters()) == []
    assert quantizer.state_dict() == {}  # derived from the LM, never written to checkpoints


def test_rescore_top_k_comes_from_the_config(minilm):
    assert LQAE(tiny_config(rescore_top_k=3), minilm).quantizer.rescore_top_k == 3
    assert LQAE(tiny_config(), minilm).quantizer.rescore_top_k == 8
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="rescore_top_k must be an int >= 0"):
            tiny_config(rescore_top_k=bad)


def test_bf16_search_with_float32_rescoring_finds_the_exact_rows():
    """The CUDA search path (bf16 scores, top-k rescored in float32), run on CPU tensors: with k = 8 it
    agrees with the exact search on every one of 4,096 latents; with k = 1 (no rescoring) it does not."""
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(5000, 64, generator=g)
    x = F.normalize(torch.randn(4096, 64, generator=g), dim=-1)
    quantizer = LanguageQuantizer(codebook)
    exact = quantizer._exact_search().nearest(x)
    assert torch.equal(quantizer._nearest_rescored(x), exact)
    quantizer.rescore_top_k = 1
    assert (quantizer._nearest_rescored(x) != exact).sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_search_equals_the_cpu_float32_search():
    g = torch.Generator().manual_seed(6)
    codebook = torch.randn(30000, 384, generator=g)
    x = torch.randn(8192, 384, generator=g)
    cpu = LanguageQuantizer(codebook).nearest(x)
    cuda = LanguageQuantizer(codebook.cuda()).cuda()
    assert torch.equal(cuda.nearest(x.cuda()).cpu(), cpu)
    cuda.rescore_top_k = 0  # the all-float32 search on the GPU
    assert torch.equal(cuda.nearest(x.cuda()).cpu(), cpu)


def test_the_cpu_search_follows_the_setting(monkeypatch):
    calls = []
    codebook = torch.randn(300, 32, generator=torch.Generator().manual_seed(7))
    quantizer = LanguageQuantizer(codebook)
    search = quantizer._exact_search()
    monkeypatch.setattr(quantizer, "_nearest_rescored", lambda flat: calls.append("bf16") or search.nearest(flat))
    monkeypatch.setattr(search, "nearest", lambda flat, scores="float32": calls.append(scores) or torch.zeros(
        len(flat), dtype=torch.long))

    def searches(setting, top_k=8):
        if setting is None:
            monkeypatch.delenv("LQAE_CPU_SEARCH", raising=False)
        else:
            monkeypatch.setenv("LQAE_CPU_SEARCH", setting)
        _quantizer.cpu_search.cache_clear()
        calls.clear()
        quantizer.rescore_top_k = top_k
        quantizer.nearest(torch.randn(4, 32))
        return calls[0]

    measured = "int8" if _search.cpu_int8_is_faster() else "float32"
    assert searches(None) == measured  # auto by default: the measured choice
    assert searches("auto") == measured
    assert searches("float32") == "float32" and searches("int8") == "int8" and searches(" INT8 ") == "int8"
    assert searches("bf16") == "bf16"
    assert searches("bf16", top_k=0) == "float32"  # rescore_top_k=0: the exact search
    with pytest.raises(ValueError, match="LQAE_CPU_SEARCH must be auto, float32, int8 or bf16, got 'fast'"):
        searches("fast")
    # Where the int8 kernel's sums are not exact, auto falls back to float32 and int8 is refused.
    monkeypatch.setattr(_quantizer, "int8_kernel_is_exact", lambda: False)
    monkeypatch.setattr(_quantizer, "cpu_int8_is_faster", lambda: False)
    assert searches("auto") == "float32"
    with pytest.raises(RuntimeError, match="LQAE_CPU_SEARCH=int8, but this torch build's oneDNN int8 GEMM"):
        searches("int8")

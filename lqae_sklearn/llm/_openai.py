"""Scoring through an OpenAI-compatible HTTP server (``/v1/completions``, ``echo`` + ``logprobs``).

A server that follows the legacy OpenAI completions API returns the
log-probability of every *prompt* token when asked for ``echo=true`` and
``logprobs``; ``max_tokens=1`` is sent (vLLM refuses 0, and llama-cpp-python reads
0 as "no limit"), and the one generated token is ignored. Which servers do it:

* vLLM: since 0.5.2, by its tracker (vllm-project/vllm issue 6508); not run here.
* llama-cpp-python's server: see ``docs/llm-servers.md`` for the run that checked it.
* llama.cpp's own ``llama-server``: no. It returns log-probs for the generated
  token only (ggml-org/llama.cpp issue 27174, open as of 2026-11), and older
  builds reject ``echo``. Such a reply is refused with an error, never read as a
  score.

That is all a few-shot classifier needs: each prompt is
``prefix + query + label``, and the label's score is the sum of the log-probs of the
tokens that cover the label's characters. The server tokenises the whole prompt, so a
token that straddles the query/label boundary counts as a label token.

Prefix reuse is the server's job here (vLLM's automatic prefix caching): every
prompt of a request starts with the same demonstrations.

Only the standard library is used (``urllib``). Errors:

* HTTP 429 and 5xx, and failures to connect, are retried up to ``max_retries`` times,
  waiting ``Retry-After`` when the server sends a valid one (seconds or an HTTP
  date), else ``backoff * 2**attempt`` seconds (at most ``max_backoff``).
* Any other HTTP status (400, 401, 404, ...) fails at once with the server's message.
* A server that does not answer within ``timeout`` seconds raises
  :class:`LLMServerTimeout` at once: retrying a hung server would multiply the wait.
* A body that is not JSON, or a completion without prompt log-probs, raises
  :class:`LLMServerError` naming the problem.

Redirects. The API key goes to the configured server only. urllib's own redirect
handler copies the request's headers, ``Authorization`` included, to wherever a ``Location``
points, and turns a redirected POST (301, 302, 303) into a GET without its body. So
redirects are followed only within the configured origin (same scheme, host and
port): ``GET`` on any redirect status, ``POST`` on 307 and 308, re-sent with its body
as those statuses require. Anything else raises :class:`LLMServerError` at once,
before a byte goes to the new location: a redirect to another origin names
both origins (the key is never sent there, nor anything else; if the new address is
right, pass it as ``base_url``), and a 301/302/303 answer to a ``POST`` says the
request would have lost its body.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

import numpy as np

from ._base import ContinuationScores, LanguageModelBackend, LLMBackendError, check_score_arguments

_RETRIED_STATUS = "429 and 5xx"
#: How the backend waits between attempts (a module attribute, so that tests can record the waits).
_sleep = time.sleep


class LLMServerError(LLMBackendError):
    """An OpenAI-compatible server failed to score prompts.

    Parameters
    ----------
    message : str
        What went wrong.
    status : int or None, default=None
        The HTTP status, when the server answered with one.

    Attributes
    ----------
    status : int or None
        The HTTP status, when the server answered with one.

    Examples
    --------
    >>> from lqae_sklearn.llm import LLMServerError
    >>> LLMServerError("HTTP 500 from the server", status=500).status
    500
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LLMServerTimeout(LLMServerError, TimeoutError):
    """The server did not answer within the backend's ``timeout``.

    Parameters
    ----------
    message : str
        What timed out.
    status : int or None, default=None
        Always None (no HTTP status came back).

    Examples
    --------
    >>> from lqae_sklearn.llm import LLMServerTimeout
    >>> isinstance(LLMServerTimeout("no answer in 60 s"), TimeoutError)
    True
    """


class OpenAICompatibleBackend(LanguageModelBackend):
    """Label scoring by an OpenAI-compatible ``/v1/completions`` endpoint.

    Parameters
    ----------
    base_url : str or None, default=None
        The API root, e.g. ``"http://127.0.0.1:8000/v1"``. None reads
        ``$OPENAI_BASE_URL``.
    api_key_env : str, default="OPENAI_API_KEY"
        The environment variable that holds the API key, read at each request and
        sent as ``Authorization: Bearer <key>`` (no header when it is unset). The
        key itself is never an attribute, so no repr, ``get_params`` or pickle
        can show it.
    model : str or None, default=None
        The ``model`` field of each request. None asks ``GET {base_url}/models``
        once and uses the first model listed (omitting the field if that fails).
    timeout : float, default=60.0
        Seconds (> 0) to wait for the server on each connection attempt and read.
    max_retries : int, default=3
        Retries after a 429, a 5xx or a connection failure.
    backoff : float, default=0.5
        First wait between retries, doubled on each retry, unless ``Retry-After`` says.
    max_backoff : float, default=30.0
        Longest wait between two attempts.
    batch_size : int, default=16
        Prompts per request.

    Notes
    -----
    Redirects are followed within the origin of ``base_url`` only (same scheme,
    host and port); a redirect anywhere else raises :class:`LLMServerError`
    naming both origins, and nothing, the API key included, is sent to the new
    location. A ``POST`` follows 307 and 308 with its body and refuses 301, 302
    and 303, which would turn it into a ``GET`` without one. See the module notes.

    Examples
    --------
    >>> from lqae_sklearn import LLMFewShotClassifier
    >>> from lqae_sklearn.llm import OpenAICompatibleBackend
    >>> backend = OpenAICompatibleBackend("http://127.0.0.1:8000/v1", batch_size=1)
    >>> classifier = LLMFewShotClassifier(llm=backend)  # or llm="http://127.0.0.1:8000/v1"
    """

    def __init__(
        self,
        base_url=None,
        *,
        api_key_env="OPENAI_API_KEY",
        model=None,
        timeout=60.0,
        max_retries=3,
        backoff=0.5,
        max_backoff=30.0,
        batch_size=16,
    ):
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.batch_size = batch_size
        self._served_model = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_served_model"] = None
        return state

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}({self.identity!r}, model={self.model!r})"

    @property
    def identity(self) -> str:
        return self._base_url() if (self.base_url or os.environ.get("OPENAI_BASE_URL")) else "<no base_url>"

    # -- configuration -----------------------------------------------------------------------------
    def _base_url(self) -> str:
        url = self.base_url if self.base_url is not None else os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise ValueError(
                "OpenAICompatibleBackend needs a server: pass base_url (e.g. 'http://127.0.0.1:8000/v1') "
                "or set $OPENAI_BASE_URL"
            )
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {url!r}")
        return url.rstrip("/")

    def _api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def load(self) -> "OpenAICompatibleBackend":
        self._base_url()
        if not isinstance(self.api_key_env, str) or not self.api_key_env:
            raise ValueError(f"api_key_env must name an environment variable, got {self.api_key_env!r}")
        for name, strict in (("timeout", True), ("backoff", False), ("max_backoff", False)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (strict and value == 0):
                raise ValueError(f"{name} must be a {'positive' if strict else 'non-negative'} number of seconds, "
                                 f"got {value!r}")
        for name, low in (("max_retries", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        return self

    # -- HTTP ---------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """Send one request with the retry policy; return the decoded JSON object."""
        url = self._base_url() + path
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        opener = urllib.request.build_opener(_SameOriginRedirects(url))
        attempts = int(self.max_retries) + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                    status = response.status
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code == 429 or 500 <= error.code < 600:
                    if not last:
                        _sleep(self._wait(attempt, error.headers.get("Retry-After")))
                        continue
                    raise LLMServerError(
                        f"{method} {url} failed with HTTP {error.code} ({message}) on all {attempts} attempts",
                        status=error.code,
                    ) from error
                raise LLMServerError(
                    f"{method} {url} failed with HTTP {error.code}: {message} "
                    f"(not retried: only {_RETRIED_STATUS} and connection errors are)",
                    status=error.code,
                ) from error
            except (TimeoutError, socket.timeout) as error:
                raise LLMServerTimeout(f"{method} {url}: no answer within timeout={self.timeout} s") from error
            except (urllib.error.URLError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise LLMServerTimeout(
                        f"{method} {url}: no answer within timeout={self.timeout} s"
                    ) from error
                if not last:
                    _sleep(self._wait(attempt, None))
                    continue
                raise LLMServerError(
                    f"{method} {url}: could not connect ({reason}) on all {attempts} attempts"
                ) from error
            try:
                decoded = json.loads(raw)
            except ValueError as error:
                raise LLMServerError(
                    f"{method} {url} answered HTTP {status} with a body that is not JSON: {raw[:200]!r}",
                    status=status,
                ) from error
            if not isinstance(decoded, dict):
                raise LLMServerError(
                    f"{method} {url} answered JSON that is not an object: {raw[:200]!r}", status=status
                )
            return decoded
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before the next attempt: ``Retry-After`` when valid, else exponential backoff.

        A valid ``Retry-After`` (RFC 9110, section 10.2.3) is a number of seconds,
        written in digits (whole in the RFC; a decimal fraction is accepted too, but
        not "-3", "1e3" or "nan"), or an HTTP date, which waits until then (not at
        all when it has passed). Either is capped at ``max_backoff``.
        """
        wait = float(self.backoff) * 2.0**attempt
        value = (retry_after or "").strip()
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
            wait = float(value)
        elif value:
            try:
                wait = max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
            except (TypeError, ValueError, IndexError, OverflowError):
                pass  # malformed: keep the backoff
        return min(wait, float(self.max_backoff))

    def served_model(self) -> str | None:
        """The ``model`` field sent with each request (asks the server once when not given).

        Returns
        -------
        str or None
            The model name, or None when the server lists none.
        """
        if self.model is not None:
            return self.model
        if self._served_model is None:
            try:
                listing = self._request("GET", "/models")
                self._served_model = listing["data"][0]["id"]
            except LLMServerError as error:
                if error.status not in (404, 405, 501):
                    raise  # a bad key, a timeout, a server down: the scoring requests would fail the same way
                self._served_model = ""  # the server has no model listing: omit the field
            except (KeyError, IndexError, TypeError):
                self._served_model = ""  # a listing without models: omit the field
        return self._served_model or None

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, prefix, queries, continuations) -> ContinuationScores:
        prefix, queries, continuations = check_score_arguments(prefix, queries, continuations)
        self.load()
        prompts, starts = [], []
        for query in queries:
            for continuation in continuations:
                prompts.append(prefix + query + continuation)
                starts.append(len(prefix) + len(query))
        logprob = np.zeros(len(prompts))
        n_tokens = np.zeros(len(prompts), dtype=np.int64)
        model = self.served_model()
        for begin in range(0, len(prompts), int(self.batch_size)):
            chunk = slice(begin, begin + int(self.batch_size))
            body = {
                "prompt": prompts[chunk],
                "max_tokens": 1,  # the generated token is ignored: see the module notes
                "echo": True,
                "logprobs": 1,
                "temperature": 0.0,
            }
            if model is not None:
                body["model"] = model
            reply = self._request("POST", "/completions", body)
            for offset, (lp, n) in enumerate(self._parse(reply, prompts[chunk], starts[chunk])):
                logprob[begin + offset] = lp
                n_tokens[begin + offset] = n
        shape = (len(queries), len(continuations))
        return ContinuationScores(logprob=logprob.reshape(shape), n_tokens=n_tokens.reshape(shape))

    def _parse(self, reply: dict, prompts: Sequence[str], starts: Sequence[int]):
        where = f"{self._base_url()}/completions"
        choices = reply.get("choices")
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise LLMServerError(
                f"{where} returned {len(choices) if isinstance(choices, list) else 'no'} choices "
                f"for {len(prompts)} prompts"
            )
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        for choice, prompt, start in zip(choices, prompts, starts):
            yield _label_logprob(choice, prompt, start, where)


def _origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, the port made explicit: what decides where a request goes."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


def _show_origin(origin: tuple[str, str, int | None]) -> str:
    scheme, host, port = origin
    return f"{scheme}://{host}:{port}"


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, kept within the configured server's origin.

    The stock handler re-sends the request's headers (``Authorization`` too) to any
    ``Location`` and turns a redirected POST into a GET; see the module notes.
    """

    def __init__(self, configured_url: str):
        super().__init__()
        self.origin = _origin(configured_url)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        method = req.get_method()
        target = _origin(newurl)
        if target != self.origin:
            fp.close()
            raise LLMServerError(
                f"{method} {req.full_url} was redirected (HTTP {code}) to {newurl}, on another origin: "
                f"{_show_origin(target)} is not the configured {_show_origin(self.origin)}. Redirects are "
                f"followed only within the configured origin, so that the API key never goes elsewhere; "
                f"if the new address is the right server, pass it as base_url",
                status=code,
            )
        if method == "POST":
            if code not in (307, 308):
                fp.close()
                raise LLMServerError(
                    f"POST {req.full_url} was redirected (HTTP {code}) to {newurl}; following a {code} would "
                    f"turn the POST into a GET without its request body. Pass the new address as base_url",
                    status=code,
                )
            # 307 and 308 keep the method and the body (RFC 9110 15.4.8-9); urllib would refuse them.
            return urllib.request.Request(newurl, data=req.data, headers=dict(req.headers), method="POST",
                                          origin_req_host=req.origin_req_host, unverifiable=True)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _label_logprob(choice, prompt: str, start: int, where: str) -> tuple[float, int]:
    """Sum of the log-probs of the echoed tokens that cover ``prompt[start:]``."""
    cannot = (
        f"{where} cannot score prompts: it returned no log-probabilities for the prompt's tokens. "
        "The server must return prompt log-probabilities for echo=true with logprobs on /v1/completions "
        "(vLLM and llama-cpp-python's server do; llama.cpp's llama-server and chat APIs do not)"
    )
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(logprobs, dict):
        raise LLMServerError(cannot)
    tokens = logprobs.get("tokens")
    values = logprobs.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values) or not tokens:
        raise LLMServerError(cannot)
    offsets = logprobs.get("text_offset")
    if not isinstance(offsets, list) or len(offsets) != len(tokens):
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])[:-1]]).tolist()
    total, count = 0.0, 0
    for token, value, offset in zip(tokens, values, offsets):
        # Tokens past the prompt would be generated ones; a token counts for the label
        # when it ends inside the label's characters.
        if offset >= len(prompt) or offset + len(token) <= start:
            continue
        if value is None:
            raise LLMServerError(f"{where} returned no log-probability for the label token {token!r}")
        total += float(value)
        count += 1
    if count == 0:
        raise LLMServerError(cannot.replace("no log-probabilities for the prompt's tokens",
                                            "log-probabilities for generated tokens only, none for the prompt's"))
    return total, count


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI style ``{"error": {"message": ...}}``) or its body."""
    try:
        raw = error.read()
    except OSError:
        return error.reason or ""
    try:
        payload = json.loads(raw)
        detail = payload.get("error", payload)
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return str(detail)[:300]
    except (ValueError, AttributeError):
        return raw[:300].decode("utf-8", "replace")

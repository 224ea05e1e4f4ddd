"""Real HTTP servers on loopback addresses for the OpenAI-compatible backend tests.

* :class:`ModelServer` serves ``/v1/completions`` with ``echo`` and ``logprobs`` the
  way the OpenAI API defines it, scoring each prompt with a local Hugging Face model
  in one plain forward pass over the whole prompt (its own code, independent of the
  backend), then one "generated" token after it, which a client must ignore.
* :class:`FaultServer` follows a script of failures (429 with Retry-After, 5xx, a
  hang, a dropped connection, malformed JSON, a 400, a reply without log-probs, a
  reply with the generated token's log-prob only, as llama.cpp's llama-server gives)
  and otherwise answers with synthetic log-probs: each character of the prompt is
  one token whose log-prob is ``-(ord(char) % 7 + 1) / 10``.

Both count the requests they receive, so tests can assert what was retried. Both
listen on 127.0.0.1 unless told another loopback address (Linux routes all of
127.0.0.0/8 to ``lo``), and can answer the paths under one prefix with a redirect
(``moved=(status, old_prefix, new_prefix)``), to this server or to another one.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class _Server:
    """A ThreadingHTTPServer on an ephemeral port of ``host`` (a loopback address), in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", moved: tuple | None = None):
        owner = self
        self.moved = moved

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                owner._handle(self, "GET", None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                owner._handle(self, "POST", self.rfile.read(length))

        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def root(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def completion_requests(self) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["path"] == "/v1/completions"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self, handler, method, raw):
        record = {"method": method, "path": handler.path, "time": time.monotonic(), "headers": dict(handler.headers)}
        try:
            record["body"] = json.loads(raw) if raw else None
        except ValueError:
            record["body"] = raw
        with self._lock:
            self.requests.append(record)
        if self.moved is not None and handler.path.startswith(self.moved[1]):
            status, old, new = self.moved
            return self.send(handler, status, {"error": {"message": "moved"}},
                             {"Location": new + handler.path[len(old):]})
        self.respond(handler, method, handler.path, record["body"])

    @staticmethod
    def send(handler, status: int, payload, headers: dict | None = None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to do

    def respond(self, handler, method, path, body):  # pragma: no cover - overridden
        raise NotImplementedError


def _completion_payload(prompts, scored):
    return {
        "object": "text_completion",
        "choices": [
            {"index": i, "text": prompt, "finish_reason": "length", "logprobs": logprobs}
            for i, (prompt, logprobs) in enumerate(zip(prompts, scored))
        ],
    }


class ModelServer(_Server):
    """``/v1/completions`` backed by a Hugging Face causal LM in a folder with a ``tokenizer.json``."""

    def __init__(self, model, tokenizer_file: str, bos_token_id: int | None, name: str = "local-model", **server):
        from tokenizers import Tokenizer

        self.model = model
        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.bos_token_id = bos_token_id
        self.name = name
        self._model_lock = threading.Lock()
        super().__init__(**server)

    def respond(self, handler, method, path, body):
        if method == "GET" and path == "/v1/models":
            return self.send(handler, 200, {"object": "list", "data": [{"id": self.name, "object": "model"}]})
        if method != "POST" or path != "/v1/completions":
            return self.send(handler, 404, {"error": {"message": f"no route {method} {path}"}})
        if not isinstance(body, dict) or body.get("model") != self.name:
            return self.send(handler, 404, {"error": {"message": f"model {body.get('model')!r} is not served"}})
        if not body.get("echo") or body.get("logprobs") is None or body.get("max_tokens", 16) < 1:
            return self.send(handler, 400, {"error": {"message": "echo and logprobs are needed, and max_tokens >= 1"}})
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        with self._model_lock:
            scored = [self._score(prompt) for prompt in prompts]
        return self.send(handler, 200, _completion_payload(prompts, scored))

    def _score(self, prompt: str) -> dict:
        encoding = self.tokenizer.encode(prompt, add_special_tokens=False)
        ids = ([self.bos_token_id] if self.bos_token_id is not None else []) + encoding.ids
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        # logp[t] scores ids[t + 1]; with a BOS token that is the prompt's token t.
        values = logp if self.bos_token_id is not None else [None] + logp
        return {  # the echoed prompt, then one generated token (" zz", at the prompt's end)
            "tokens": [prompt[s:e] for s, e in encoding.offsets] + [" zz"],
            "token_logprobs": [None] + values[1:] + [-0.25],  # OpenAI style: the first prompt token gets null
            "text_offset": [s for s, _ in encoding.offsets] + [len(prompt)],
            "top_logprobs": None,
        }


def synthetic_logprob(text: str) -> float:
    """What :class:`FaultServer` says the log-probability of ``text`` is."""
    return sum(-(ord(ch) % 7 + 1) / 10 for ch in text)


class FaultServer(_Server):
    """Answers ``/v1/completions`` following ``script`` (one action per request), then "ok".

    Actions: ``"ok"``, ``("429", retry_after_header)``, ``"500"``, ``"503"``,
    ``"400"``, ``("hang", seconds)``, ``"drop"`` (close without answering),
    ``"badjson"``, ``"nologprobs"``, ``"generated_only"``. ``models`` is what
    ``GET /v1/models`` answers: an HTTP status (404 by default), a model name to list, or
    ``("hang", seconds)``.
    ``host`` and ``moved`` are :class:`_Server`'s.
    """

    def __init__(self, script=(), models=404, **server):
        self.script = list(script)
        self.models = models
        super().__init__(**server)

    def respond(self, handler, method, path, body):
        if path == "/v1/models" and self.models != 404:
            if isinstance(self.models, str):
                return self.send(handler, 200, {"object": "list", "data": [{"id": self.models, "object": "model"}]})
            if isinstance(self.models, tuple):
                time.sleep(self.models[1])
                return self.send(handler, 200, {"data": [{"id": "m"}]})
            return self.send(handler, self.models, {"error": {"message": "invalid api key"}})
        if path != "/v1/completions":
            return self.send(handler, 404, {"error": {"message": "not found"}})
        action = self.script.pop(0) if self.script else "ok"
        kind, arg = (action if isinstance(action, tuple) else (action, None))
        prompts = body["prompt"] if isinstance(body, dict) else []
        if kind == "429":
            return self.send(handler, 429, {"error": {"message": "rate limited"}}, {"Retry-After": str(arg)})
        if kind in ("500", "503"):
            return self.send(handler, int(kind), {"error": {"message": "server fell over"}})
        if kind == "400":
            return self.send(handler, 400, {"error": {"message": "prompt is too long for the context window"}})
        if kind == "hang":
            time.sleep(arg)
            return self.send(handler, 200, _completion_payload(prompts, [self._logprobs(p) for p in prompts]))
        if kind == "drop":
            handler.close_connection = True
            return None
        if kind == "badjson":
            return self.send(handler, 200, b'{"choices": [{"index": 0, "logprobs": ')
        if kind == "nologprobs":
            return self.send(handler, 200, _completion_payload(prompts, [None] * len(prompts)))
        if kind == "generated_only":  # echo ignored: the one generated token's log-prob, after the prompt
            generated = [{"tokens": [" zz"], "token_logprobs": [-0.25], "text_offset": [len(p)], "top_logprobs": None}
                         for p in prompts]
            return self.send(handler, 200, _completion_payload(prompts, generated))
        return self.send(handler, 200, _completion_payload(prompts, [self._logprobs(p) for p in prompts]))

    @staticmethod
    def _logprobs(prompt: str) -> dict:
        return {
            "tokens": list(prompt),
            "token_logprobs": [None] + [-(ord(ch) % 7 + 1) / 10 for ch in prompt[1:]],
            "text_offset": list(range(len(prompt))),
            "top_logprobs": None,
        }

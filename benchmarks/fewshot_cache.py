"""What the few-shot option benchmarks share: Fashion-MNIST token texts encoded once, LLM scores computed once.

* :func:`token_texts`: ``LQAETokenizer(output="text")`` (shipped checkpoint, its text grid: 3 x 3 tokens) over
  the whole test split and the first ``train_per_class`` training images of each class, written to an .npz the
  first time and read back afterwards (checked against the checkpoint's weights and the grid).
* :class:`MemoBackend`: wraps the LLM backend and keeps every score it computes, one (prefix, query,
  continuation) cell at a time, in memory and appended to a JSON-lines file. A classifier run under other options
  that asks for a cell already scored (the same prompt) gets it back without the LLM; an interrupted benchmark
  rerun with the same file resumes where it stopped. Each cell also keeps the LLM seconds it cost (its call's time
  divided evenly among the call's cells), so every method is charged what its scores would cost it alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lqae_sklearn.llm import ContinuationScores, LanguageModelBackend


def token_texts(path, train_per_class=50, device="cpu", token_grid="auto"):
    """``(test_texts, test_labels, train_texts, train_labels, train_index)`` of Fashion-MNIST, cached in ``path``.

    The training images are the first ``train_per_class`` of each class, in split order (``train_index``);
    ``token_grid`` is ``LQAETokenizer``'s (``"auto"``: the checkpoint's text grid, 3 x 3).
    """
    from lqae_sklearn import LQAETokenizer
    from lqae_sklearn.datasets import fetch_fashion_mnist

    tokenizer = LQAETokenizer(output="text", device=device, token_grid=token_grid).fit()
    key = f'{tokenizer.checkpoint_config_["weights_sha256"]}/grid{tokenizer.token_grid_}/train{train_per_class}'
    if path is not None and Path(path).exists():
        with np.load(path) as cached:
            if str(cached["key"]) == key:
                return (cached["test_texts"].astype(object), cached["test_labels"],
                        cached["train_texts"].astype(object), cached["train_labels"], cached["train_index"])
        print(f"{path} holds texts of another checkpoint, grid or training subset; encoding again", file=sys.stderr)
    test_x, test_y = fetch_fashion_mnist(subset="test", return_X_y=True)
    train_x, train_y = fetch_fashion_mnist(subset="train", return_X_y=True)
    train_index = np.sort(np.concatenate([np.flatnonzero(train_y == c)[:train_per_class] for c in np.unique(train_y)]))
    start = time.perf_counter()
    test_texts = np.asarray(tokenizer.transform(test_x), dtype=object)
    train_texts = np.asarray(tokenizer.transform(train_x[train_index]), dtype=object)
    print(f"encoded {len(test_texts) + len(train_texts)} images in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{path}.partial.npz")
        np.savez(partial, test_texts=test_texts.astype(str), test_labels=test_y, train_texts=train_texts.astype(str),
                 train_labels=train_y[train_index], train_index=train_index, key=np.array(key))
        os.replace(partial, path)  # never a half-written cache
    return test_texts, test_y, train_texts, train_y[train_index], train_index


def token_codes(texts) -> np.ndarray:
    """Texts of equally many whitespace tokens as an int array (n, T): one code per distinct token.

    ``token_overlap_predict`` reads token ids; a token text's pieces stand for its ids one to one.
    """
    pieces = [text.split() for text in texts]
    if len({len(p) for p in pieces}) != 1:
        raise ValueError("token_codes needs texts of equally many tokens")
    _, codes = np.unique(np.array(pieces, dtype=object).astype(str), return_inverse=True)
    return codes.reshape(len(pieces), -1)


def _cell_key(prefix_hash: str, query: str, continuation: str) -> str:
    return hashlib.sha1(f"{prefix_hash}\x00{query}\x00{continuation}".encode()).hexdigest()[:24]


class MemoBackend(LanguageModelBackend):
    """A backend that scores each (prefix, query, continuation) cell once; see the module notes.

    ``meter["name"]`` names the method being run; ``meter["seconds"][name]`` adds up the LLM seconds of the cells
    it asked for, computed now or before. Copies (the classifier copies its backend object) share the cells, the
    file and the meter.
    """

    def __init__(self, inner, path=None):
        self.inner = inner
        self.path = path
        self.cells: dict[str, tuple[float, int, float]] = {}
        self.meter = {"name": None, "seconds": defaultdict(float), "computed": defaultdict(float)}
        self.calls = 0
        if path is not None and Path(path).exists():
            records = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        continue  # the last line of an interrupted run
            for call in _calls(records):
                for record, seconds in zip(call, _shares(sum(r["s"] for r in call), [r["n"] for r in call])):
                    self.cells[record["k"]] = (record["lp"], record["n"], seconds)

    def load(self):
        self.inner.load()
        return self

    @property
    def identity(self):
        return self.inner.identity

    def prompt_length(self, prefix, queries, continuations):
        return self.inner.prompt_length(prefix, queries, continuations)

    @property
    def context_length(self):
        return self.inner.context_length

    def score(self, prefix, queries, continuations):
        queries, continuations = list(queries), list(continuations)
        prefix_hash = hashlib.sha1(prefix.encode()).hexdigest()
        keys = [[_cell_key(prefix_hash, q, c) for c in continuations] for q in queries]
        rows = sorted({i for i, row in enumerate(keys) for key in row if key not in self.cells})
        if rows:
            columns = sorted({j for i in rows for j, key in enumerate(keys[i]) if key not in self.cells})
            start = time.perf_counter()
            result = self.inner.score(prefix, [queries[i] for i in rows], [continuations[j] for j in columns])
            elapsed = time.perf_counter() - start
            self.meter["computed"][self.meter["name"]] += elapsed
            self.calls += 1
            computed = [(keys[i][j], float(result.logprob[a, b]), int(result.n_tokens[a, b]))
                        for a, i in enumerate(rows) for b, j in enumerate(columns)]
            lines = []
            for (key, logprob, n), seconds in zip(computed, _shares(elapsed, [n for _, _, n in computed])):
                self.cells[key] = (logprob, n, seconds)
                # "s": the call's seconds spread evenly, "c": the call (see _calls), "t": the call's seconds.
                lines.append(json.dumps({"k": key, "lp": logprob, "n": n, "s": elapsed / len(computed),
                                         "c": f"{os.getpid()}.{self.calls}", "t": elapsed}))
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
        cells = [[self.cells[key] for key in row] for row in keys]
        self.meter["seconds"][self.meter["name"]] += sum(cell[2] for row in cells for cell in row)
        return ContinuationScores(logprob=np.array([[c[0] for c in row] for row in cells], dtype=np.float64),
                                  n_tokens=np.array([[c[1] for c in row] for row in cells], dtype=np.int64))


def _shares(seconds: float, n_tokens) -> list[float]:
    """A call's seconds shared among its cells in proportion to their scored tokens.

    A call's cost is mostly the LLM's pass over the scored continuations (vocabulary-wide log-probabilities at
    each of their tokens); a 2-token content-free continuation costs far less than an 18-token query text.
    """
    weights = np.maximum(np.asarray(n_tokens, dtype=np.float64), 1.0)
    return (seconds * weights / weights.sum()).tolist()


def _calls(records):
    """Records grouped by the call that computed them: the "c" field, or (older files) consecutive equal "s"."""
    group, marker = [], None
    for record in records:
        this = record.get("c", ("s", record["s"]))
        if group and this != marker:
            yield group
            group = []
        group.append(record)
        marker = this
    if group:
        yield group


def write_results(out, lines, record: dict) -> None:
    """``out``.md (the table ``lines``) and ``out``.json (``record`` with this machine's threads and load)."""
    import platform

    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    record = {**record, "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "load_average": load}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1), encoding="utf-8")


def write_table(out, script, argv, description, columns, rows, record: dict) -> None:
    """``out``.md: the command as run, ``description`` and a Markdown table of ``rows`` (lists of cells) under
    ``columns``; ``out``.json: ``record`` with the command (``write_results``)."""
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{command}`", "", description, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    write_results(out, lines, {"command": command, **record})

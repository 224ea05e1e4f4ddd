"""A pooled few-shot task: more labelled images than a prompt holds; random or nearest demonstrations (issue 23).

Ten Fashion-MNIST classes, named with the ten nonsense words of the episodes (dax, blicket, ...). The labelled pool is the first ``P`` training images of each class (``--per-class``,
e.g. 20 and 50); the queries are ``--queries`` test images, as many per class, drawn with ``--seed``. Every method
sees the same pool and queries (the first ``--queries / 10`` of each class's test images in an order fixed by
``--seed``, so the queries of a smaller run are among those of a larger one):

* ``random``: ``LLMFewShotClassifier(demonstrations="random")`` (embedded Gemma 3 270M, the classifier's defaults
  otherwise, ``random_state=--seed``): the same ``n_examples_per_class`` random images of each class for every query;
* ``nearest``: ``demonstrations="nearest"``: for each query, the ``n_examples_per_class`` images of each class whose
  token texts are nearest to its own (TF-IDF cosine, ``NearestNeighbors``);
* ``knn_tokens``: no LLM, a k-nearest-neighbour classifier on the same similarity (the classifier's
  ``text_vectorizer()`` then ``KNeighborsClassifier(metric="cosine")``), k in ``--k``;
* ``knn_pixels``: no LLM, ``KNeighborsClassifier`` on raw pixels / 255 (Euclidean), k in ``--k``.

Token texts are ``LQAETokenizer(output="text")`` with the shipped checkpoint (3 x 3 tokens), encoded once
(``fewshot_cache.token_texts``); LLM scores are kept in ``--scores`` (``fewshot_cache.MemoBackend``), so a rerun
resumes and methods sharing prompts share their cost. "LLM s/query" charges each method the scores it used at the
rate they were computed; "wall s" is the method's own wall time in this run (cached scores cost nothing there).

Example (the command of ``docs/benchmarks.md``, "Few-shot options", pooled task)::

    python benchmarks/fewshot_pooled.py --per-class 20,50 --queries 500 --texts texts_g3.npz --scores scores.jsonl \\
        --out pooled
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from fewshot_cache import MemoBackend, token_texts, write_results  # noqa: E402

from lqae_sklearn import LLMFewShotClassifier  # noqa: E402
from lqae_sklearn.datasets import fetch_fashion_mnist  # noqa: E402
from lqae_sklearn.evaluation import NONSENSE_LABELS  # noqa: E402
from lqae_sklearn.llm import HuggingFaceBackend  # noqa: E402
from lqae_sklearn.llm._demonstrations import text_vectorizer  # noqa: E402


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def _params(text):
    """``a=1,b=x`` -> {"a": 1, "b": "x"} (ints, None and strings)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        out[key] = None if value == "None" else int(value) if value.lstrip("-").isdigit() else value
    return out


def pooled_task(texts_cache, train_per_class, queries, seed):
    """The task's data: every class's first ``train_per_class`` training images (texts, pixels / 255, nonsense
    names) and ``queries`` test images, as many per class (texts, pixels / 255, names), fixed by ``seed``."""
    test_texts, test_y, train_texts, train_y, train_index = token_texts(texts_cache, train_per_class=train_per_class)
    test_images, _ = fetch_fashion_mnist(subset="test", return_X_y=True)
    train_images, _ = fetch_fashion_mnist(subset="train", return_X_y=True)
    classes = np.unique(test_y)
    rng = np.random.default_rng(seed)
    # Each class's test images in one seeded order, whatever the number of queries: a run with more queries holds
    # every query of a run with fewer, so it reuses their cached scores (a run can grow to 500 queries step by step).
    shuffled = [rng.permutation(np.flatnonzero(test_y == c)) for c in classes]
    query = np.sort(np.concatenate([order[: queries // len(classes)] for order in shuffled]))
    # Nonsense names, as in the episodes: the LLM must bind them from the demonstrations.
    names = np.array(NONSENSE_LABELS[: len(classes)], dtype=object)
    test_y, train_y = names[np.searchsorted(classes, test_y)], names[np.searchsorted(classes, train_y)]
    return SimpleNamespace(
        classes=names, train_y=train_y, train_texts=train_texts,
        train_pixels=train_images[train_index].reshape(len(train_index), -1) / 255.0,
        query_texts=list(test_texts[query]), query_y=test_y[query],
        query_pixels=test_images[query].reshape(len(query), -1) / 255.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=_ints, default=[20, 50], help="labelled training images per class")
    parser.add_argument("--queries", type=int, default=500, help="test queries (as many per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="knn_tokens,knn_pixels,nearest,random")
    parser.add_argument("--k", type=_ints, default=[1, 5], help="neighbours of the kNN baselines")
    parser.add_argument("--llm-params", type=_params, default={},
                        help="extra LLMFewShotClassifier parameters, e.g. n_orders=1,calibration=batch")
    parser.add_argument("--chunk", type=int, default=50, help="queries per progress step")
    parser.add_argument("--texts", default="texts_g3.npz")
    parser.add_argument("--scores", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="fewshot_pooled")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]

    if args.queries % 10:
        parser.error(f"--queries {args.queries}: give a multiple of 10 (as many queries per class)")
    task = pooled_task(args.texts, max([50, *args.per_class]), args.queries, args.seed)
    classes, train_y, train_texts, train_pixels = task.classes, task.train_y, task.train_texts, task.train_pixels
    query_texts, query_y, query_pixels = task.query_texts, task.query_y, task.query_pixels
    backend = MemoBackend(HuggingFaceBackend(device="cpu"), args.scores)

    rows, started = [], time.perf_counter()
    for per_class in args.per_class:
        pool = np.concatenate([np.flatnonzero(train_y == c)[:per_class] for c in classes])
        pool_texts, pool_y = list(train_texts[pool]), train_y[pool]
        for method in methods:
            if method.startswith("knn"):
                for k in args.k:
                    tic = time.perf_counter()
                    if method == "knn_tokens":
                        model = make_pipeline(text_vectorizer(), KNeighborsClassifier(k, metric="cosine"))
                        predicted = model.fit(pool_texts, pool_y).predict(query_texts)
                    else:
                        model = KNeighborsClassifier(k)
                        predicted = model.fit(train_pixels[pool], pool_y).predict(query_pixels)
                    rows.append(_row(per_class, f"{method} (k={k})", predicted, query_y, None,
                                     time.perf_counter() - tic))
                continue
            params = {"demonstrations": method, "random_state": args.seed, **args.llm_params}
            backend.meter["name"] = f"{method}/{per_class}"
            tic = time.perf_counter()
            clf = LLMFewShotClassifier(backend, **params).fit(pool_texts, pool_y)
            for begin in range(0, len(query_texts), args.chunk):  # warms the score cache chunk by chunk
                clf.decision_function(query_texts[begin:begin + args.chunk])
                print(f"{method}, {per_class} per class: {min(begin + args.chunk, len(query_texts))}/"
                      f"{len(query_texts)} queries, {time.perf_counter() - started:.0f} s", file=sys.stderr,
                      flush=True)
            # The chunks above used every score once: that is the method's charge. predict reads them all again
            # from the cache (one call, so that batch calibration sees every query); it must not charge them twice.
            seconds = backend.meter["seconds"].pop(backend.meter["name"], 0.0)
            predicted = clf.predict(query_texts)
            backend.meter["seconds"].pop(backend.meter["name"], 0.0)
            rows.append(_row(per_class, method, predicted, query_y, seconds / len(query_texts),
                             time.perf_counter() - tic, params=clf.get_params() | {"llm": "embedded Gemma 3 270M"}))
            write(args, argv, rows)
    write(args, argv, rows)


def _row(per_class, method, predicted, truth, llm_per_query, wall, params=None):
    right = np.asarray(predicted) == np.asarray(truth)
    # 95% interval of a proportion (normal approximation; 500 queries).
    half = 1.96 * np.sqrt(right.mean() * (1 - right.mean()) / len(right))
    return {"per_class": per_class, "method": method, "accuracy": float(right.mean()), "ci95": float(half),
            "right": right.astype(int).tolist(), "llm_seconds_per_query": llm_per_query, "wall_seconds": wall,
            "params": {k: v for k, v in (params or {}).items() if isinstance(v, (int, str, type(None)))}}


def write(args, argv, rows):
    command = "python benchmarks/fewshot_pooled.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{command}`", "", f"10 classes, {args.queries} test queries, seed {args.seed}; accuracy ± 95% CI "
             "(normal approximation)", "", "| labelled per class | method | accuracy | LLM s/query | wall s |",
             "|---|---|---|---|---|"]
    for r in rows:
        cost = "" if r["llm_seconds_per_query"] is None else f"{r['llm_seconds_per_query']:.2f}"
        lines.append(f"| {r['per_class']} | {r['method']} | {r['accuracy']:.3f} ± {r['ci95']:.3f} | {cost} | "
                     f"{r['wall_seconds']:.0f} |")
    write_results(args.out, lines, {"command": command, "args": vars(args), "rows": rows})

if __name__ == "__main__":
    main()

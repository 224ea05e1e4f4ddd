"""LLM time per query of few-shot settings on the pooled 10-way task, measured in one run.

The pooled task of ``fewshot_pooled.py`` (ten Fashion-MNIST classes with nonsense names, the first ``--per-class``
training images of each as the labelled pool, ``--queries`` test images): each setting ``DEMONSTRATIONS:N``
(``demonstrations`` and ``n_examples_per_class`` of ``LLMFewShotClassifier``, the embedded Gemma 3 270M, every other
parameter at its default) is fitted on the pool once, then predicts the queries in batches of ``--batch``. The
settings take turns batch by batch, the first of each turn rotating, nothing cached, so that they share the
machine's load; the table gives each setting's seconds per query (predict only) and its ratio to the first setting.

Example (the command of ``docs/benchmarks.md``, "Nearest demonstrations by default")::

    python benchmarks/fewshot_pooled_cost.py --settings random:1,nearest:1,nearest:3,nearest:5 --per-class 20 \\
        --queries 50 --texts texts_g3.npz --out pooled_cost
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fewshot_cache import write_table  # noqa: E402
from fewshot_pooled import pooled_task  # noqa: E402

from lqae_sklearn import LLMFewShotClassifier  # noqa: E402
from lqae_sklearn.llm import HuggingFaceBackend  # noqa: E402


def _settings(text):
    out = []
    for item in filter(None, text.split(",")):
        kind, n = item.split(":")
        out.append((kind, int(n)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=_settings, default=_settings("random:1,nearest:1,nearest:3,nearest:5"),
                        help="DEMONSTRATIONS:N pairs; the first is the reference of the ratios")
    parser.add_argument("--per-class", type=int, default=20, help="labelled training images per class")
    parser.add_argument("--queries", type=int, default=50, help="test queries (a multiple of 10)")
    parser.add_argument("--batch", type=int, default=10, help="queries per predict call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texts", default="texts_g3.npz")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="pooled_cost", help="output stem: writes STEM.md and STEM.json")
    args = parser.parse_args(argv)
    if args.queries % 10:
        parser.error(f"--queries {args.queries}: give a multiple of 10 (as many queries per class)")
    torch.set_num_threads(args.threads)
    # The texts cache holds 50 training images per class, as fewshot_pooled.py's does, so the two share it.
    task = pooled_task(args.texts, max(50, args.per_class), args.queries, args.seed)
    pool = np.concatenate([np.flatnonzero(task.train_y == c)[: args.per_class] for c in task.classes])
    backend = HuggingFaceBackend(device="cpu").load()
    fitted = [LLMFewShotClassifier(backend, demonstrations=kind, n_examples_per_class=n, random_state=args.seed)
              .fit(list(task.train_texts[pool]), task.train_y[pool]) for kind, n in args.settings]
    seconds = [0.0] * len(fitted)
    for b, begin in enumerate(range(0, args.queries, args.batch)):
        batch = task.query_texts[begin:begin + args.batch]
        for i in np.roll(np.arange(len(fitted)), -b):  # rotate who goes first
            tic = time.perf_counter()
            fitted[i].predict(batch)
            seconds[i] += time.perf_counter() - tic
        print(f"{begin + len(batch)}/{args.queries} queries: "
              f"{ {f'{k}:{n}': round(s) for (k, n), s in zip(args.settings, seconds)} }", file=sys.stderr, flush=True)

    rows = [{"demonstrations": kind, "n_examples_per_class": n, "seconds_per_query": s / args.queries,
             "ratio": s / seconds[0]} for (kind, n), s in zip(args.settings, seconds)]
    write_table(args.out, "fewshot_pooled_cost.py", argv,
                f"{args.per_class} labelled images per class, {args.queries} queries in batches of {args.batch}, "
                f"settings taking turns; {args.threads} torch thread(s), CPU",
                ["demonstrations", "n_examples_per_class", "s/query", "ratio to the first"],
                [[r["demonstrations"], r["n_examples_per_class"], f"{r['seconds_per_query']:.2f}", f"{r['ratio']:.2f}"]
                 for r in rows],
                {"args": {**vars(args), "settings": args.settings}, "rows": rows})


if __name__ == "__main__":
    main()

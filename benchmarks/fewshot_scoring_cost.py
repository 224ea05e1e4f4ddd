"""LLM time of the two channel scorings on the same episodes: one prompt of every class, or one prompt per class.

``label_scoring="channel"`` writes every class's demonstrations into one prompt and scores each query after each
label; ``"channel_per_class"`` writes each class's demonstrations into a prompt of its own and scores each query
after it. Both score one query text per class; they differ in the prompts the LLM reads first (one long one, or
one shorter one per class). For each (way, shot) cell this script runs the same Fashion-MNIST episodes (seed 0, one
query per class, the token texts of ``fewshot_cache.token_texts``) through ``LLMFewShotClassifier`` with the
embedded Gemma 3 270M under both scorings, alternating which goes first from episode to episode, nothing cached,
and reports each scoring's seconds per episode (fit and predict) and the ratio of their totals, measured in one run.

Example (the command of ``docs/benchmarks.md``, "Channel per class")::

    python benchmarks/fewshot_scoring_cost.py --cells 2x1,5x1,2x5 --episodes 20 --texts texts_g3.npz \\
        --out scoring_cost
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fewshot_cache import token_texts, write_table  # noqa: E402

from lqae_sklearn import LLMFewShotClassifier  # noqa: E402
from lqae_sklearn.evaluation import sample_episodes  # noqa: E402
from lqae_sklearn.llm import HuggingFaceBackend  # noqa: E402

SCORINGS = ("channel", "channel_per_class")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="2x1,5x1,2x5,5x5", help="WAYxSHOT cells")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--texts", default="texts_g3.npz", help="cache of the token texts (made if missing)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="scoring_cost", help="output stem: writes STEM.md and STEM.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    texts, labels, *_ = token_texts(args.texts)
    backend = HuggingFaceBackend(device="cpu").load()
    cells = []
    for spec in args.cells.split(","):
        way, shot = (int(v) for v in spec.split("x"))
        seconds = {s: [] for s in SCORINGS}
        for e, episode in enumerate(sample_episodes(labels, way, shot, 1, args.episodes, seed=0)):
            support, query = list(texts[episode.support]), list(texts[episode.query])
            for scoring in SCORINGS if e % 2 == 0 else SCORINGS[::-1]:
                tic = time.perf_counter()
                LLMFewShotClassifier(backend, n_examples_per_class=shot, label_scoring=scoring,
                                     random_state=episode.seed).fit(support, episode.support_y).predict(query)
                seconds[scoring].append(time.perf_counter() - tic)
        totals = {s: float(np.sum(v)) for s, v in seconds.items()}
        cells.append({"way": way, "shot": shot, "episodes": args.episodes, "seconds": seconds,
                      "per_episode": {s: t / args.episodes for s, t in totals.items()},
                      "ratio_per_class_to_channel": totals["channel_per_class"] / totals["channel"]})
        print(f"{way}-way {shot}-shot: {cells[-1]['per_episode']}", file=sys.stderr, flush=True)
    write_table(args.out, "fewshot_scoring_cost.py", argv,
                f"{args.episodes} episodes per cell, both scorings on each, alternating first; {args.threads} torch "
                f"thread(s), CPU",
                ["cell", "channel s/episode", "channel_per_class s/episode", "per class / channel"],
                [[f"{c['way']}-way {c['shot']}-shot", f"{c['per_episode']['channel']:.2f}",
                  f"{c['per_episode']['channel_per_class']:.2f}", f"{c['ratio_per_class_to_channel']:.2f}"]
                 for c in cells],
                {"args": vars(args), "cells": cells})


if __name__ == "__main__":
    main()

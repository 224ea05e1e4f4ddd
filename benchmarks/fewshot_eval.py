"""Fashion-MNIST few-shot episodes with the shipped LQAE tokenizer and the embedded LLM (issue #4, part 4).

Every (way, shot) cell runs the same episodes (fixed by --seed) through:

* ``llm``: LQAE token text + LLMFewShotClassifier (embedded Gemma 3 270M), nonsense labels,
  direct scoring (``--scoring``: the label's log-likelihood after the query); the same
  call also scores an empty input, which ``calibrated`` (contextual calibration) and
  ``other_scoring`` (mean instead of sum over label tokens, or the reverse) read at no extra cost;
* ``channel``: the same classifier with ``label_scoring="channel"`` (label-first demonstrations,
  the query's log-likelihood after each label);
* ``shuffled`` / ``channel_shuffled``: ``llm`` / ``channel`` with the episode's tokens dealt
  out at random between its images (``shuffle_tokens(mode="across")``): the text no longer
  depends on the image, so these controls should score chance;
* ``within`` (optional): ``llm`` with each image's own tokens in a random order: the bag of
  tokens survives, only the patch order is lost;
* ``token_overlap``: no LLM; the class whose support images share the most tokens with the
  query (``token_overlap_predict``): how much class evidence the token text carries as word overlap;
* ``pixels``: nearest class mean of raw pixels, squared L2 (the non-LLM baseline).

Episodes draw from the first ``--pool-per-class`` test images of each class; that pool
is encoded once (``LQAETokenizer(output="ids", token_grid=...)``, cached with ``--ids-cache``) and the
text of each episode is written from the ids. All queries of an episode
go to one ``predict_proba`` call, so the demonstrations are run through the LLM once.

Writes a Markdown table and a JSON file (per-episode accuracies, seconds per method,
the largest deviation of a ``predict_proba`` row sum from 1). Results and the exact
commands: ``docs/benchmarks.md``, "Few-shot classification (Fashion-MNIST episodes)". Example::

    python benchmarks/fewshot_eval.py --ways 2,5 --shots 1,3,5 --episodes 200 --queries 1 --token-grid 3 \\
        --pool-per-class 1000 --methods channel,llm,calibrated,other_scoring,pixels --ids-cache ids_g3.npz \\
        --out results/fewshot
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lqae_sklearn import LLMFewShotClassifier, LQAETokenizer
from lqae_sklearn.evaluation import (
    LLMEpisodeRunner, evaluate_grid, format_table, prototype_predict, token_overlap_predict,
)
from lqae_sklearn.datasets import fetch_fashion_mnist
from lqae_sklearn.llm import HuggingFaceBackend, LanguageModelBackend

TITLES = {"llm": "LLM, direct", "other_scoring": "direct, other label scoring",
          "calibrated": "direct, calibrated", "channel": "LLM, channel", "shuffled": "direct, shuffled tokens",
          "channel_shuffled": "channel, shuffled tokens", "within": "direct, shuffled within image",
          "token_overlap": "token overlap (no LLM)", "pixels": "pixel prototypes"}


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


class _RecordingBackend(LanguageModelBackend):
    """Delegates to a backend and keeps its last scores, to read them under another label scoring."""

    def __init__(self, inner):
        self.inner = inner
        self.last = None

    def load(self):
        self.inner.load()
        return self

    def score(self, prefix, queries, continuations):
        self.last = self.inner.score(prefix, queries, continuations)
        return self.last

    @property
    def identity(self):
        return self.inner.identity


def _cached_ids(tokenizer, images, pool, path):
    """Token ids of ``images``, read from (or written to) the .npz ``path`` for this checkpoint, grid and pool."""
    key = f'{tokenizer.checkpoint_config_["weights_sha256"]}/{tokenizer.n_tokens_}'
    if path is not None and Path(path).exists():
        with np.load(path) as cached:
            if str(cached["key"]) == key and np.array_equal(cached["pool"], pool):
                return cached["ids"]
        print(f"{path} is for another checkpoint, token grid or pool; encoding again", file=sys.stderr)
    ids = tokenizer.transform(images)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=ids, pool=pool, key=np.array(key))
    return ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=_ints, default=[2, 5])
    parser.add_argument("--shots", type=_ints, default=[1, 3, 5])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--queries", type=int, default=2, help="query images per class per episode")
    parser.add_argument("--methods", default="channel,channel_shuffled,llm,calibrated,pixels",
                        help="comma-separated: llm, other_scoring, calibrated, channel, shuffled, channel_shuffled, "
                             "within, token_overlap, pixels (other_scoring and calibrated read the llm call of "
                             "the same episode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scoring", default="loglik", choices=["loglik", "mean_loglik"],
                        help="label scoring of the direct methods (llm, shuffled, within)")
    parser.add_argument("--instruction", default=None)
    parser.add_argument("--prompt", default=None, help="direct demonstration template (default: the classifier's)")
    parser.add_argument("--channel-prompt", default=None, help="channel demonstration template (default: the classifier's)")
    parser.add_argument("--token-grid", type=int, default=None,
                        help="LQAETokenizer(token_grid=...): g x g tokens per image (default: one per patch)")
    parser.add_argument("--max-tokens-per-item", type=int, default=None)
    parser.add_argument("--pool-per-class", type=int, default=200,
                        help="episodes draw from the first P test images of each class (encoding is the slow part)")
    parser.add_argument("--ids-cache", default=None, help=".npz holding the pool's token ids (made if missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-every", type=int, default=10, help="progress line every N episodes")
    parser.add_argument("--out", default="fewshot", help="output stem: writes STEM.md and STEM.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]

    images, labels = fetch_fashion_mnist(subset="test", return_X_y=True)
    pool = np.sort(np.concatenate([np.flatnonzero(labels == c)[: args.pool_per_class] for c in np.unique(labels)]))
    images, labels = images[pool], labels[pool]

    start = time.perf_counter()
    tokenizer = LQAETokenizer(output="ids", device="cpu", token_grid=args.token_grid).fit()
    ids = _cached_ids(tokenizer, images, pool, args.ids_cache)
    encode_seconds = time.perf_counter() - start
    print(f"token ids of {len(pool)} images ready in {encode_seconds:.1f} s", file=sys.stderr, flush=True)
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0

    options = {"label_scoring": args.scoring, "instruction": args.instruction,
               "max_tokens_per_item": args.max_tokens_per_item}
    if args.prompt is not None:
        options["prompt"] = args.prompt.encode().decode("unicode_escape")
    backend = HuggingFaceBackend(device="cpu")
    classifier = LLMFewShotClassifier(_RecordingBackend(backend), **options)
    channel_options = dict(options, label_scoring="channel")
    channel_options.pop("prompt", None)
    if args.channel_prompt is not None:
        channel_options["prompt"] = args.channel_prompt.encode().decode("unicode_escape")
    channel_classifier = LLMFewShotClassifier(backend, **channel_options)
    worst_row_sum = [0.0]
    llm_scores = {}  # the unshuffled llm call of the current episode

    # The "llm" call also scores a content-free query (""), last; these read its scores other ways.
    def other_scoring(episode):  # noqa: ARG001 - reads the scores of the episode's llm call
        # "loglik" (sum over label tokens) <-> "mean_loglik", uncalibrated.
        last = llm_scores["last"]
        scores = last.mean() if args.scoring == "loglik" else last.logprob
        return classifier.classes_[np.argmax(scores[:-1], axis=1)]

    def calibrated(episode):  # noqa: ARG001 - reads the scores of the episode's llm call
        # Contextual calibration: log p(label | query) - log p(label | ""), with the classifier's scoring.
        last = llm_scores["last"]
        scores = last.logprob if args.scoring == "loglik" else last.mean()
        return classifier.classes_[np.argmax(scores[:-1] - scores[-1:], axis=1)]

    def llm_method(shuffle):
        # Every LLM call also scores the content-free query "" (last row), for "calibrated"; the
        # predictions returned here are the classifier's own, uncalibrated.
        runner = LLMEpisodeRunner(classifier, tokenizer.ids_to_text, shuffle=shuffle, content_free="")

        def predict(episode):
            runner(episode, ids)
            rows = runner.last_proba_.sum(axis=1)  # the classifier's own predict_proba, content-free row included
            worst_row_sum[0] = max(worst_row_sum[0], float(np.abs(rows - 1).max()))
            last = classifier.backend_.last  # the fitted classifier scores through its own copy of the recorder
            if shuffle is None:
                llm_scores["last"] = last
            scores = last.logprob if args.scoring == "loglik" else last.mean()
            return classifier.classes_[np.argmax(scores[:-1], axis=1)]
        return predict

    def channel_method(shuffle):
        runner = LLMEpisodeRunner(channel_classifier, tokenizer.ids_to_text, shuffle=shuffle)

        def predict(episode):
            predicted, _ = runner(episode, ids)
            rows = runner.last_proba_.sum(axis=1)
            worst_row_sum[0] = max(worst_row_sum[0], float(np.abs(rows - 1).max()))
            return predicted
        return predict

    available = {
        "llm": llm_method(None),
        "channel": channel_method(None),
        "shuffled": llm_method("across"),
        "channel_shuffled": channel_method("across"),
        "within": llm_method("within"),
        "other_scoring": other_scoring,  # these two read the LLM method listed before them
        "calibrated": calibrated,
        "token_overlap": lambda e: token_overlap_predict(ids[e.support], e.support_y, ids[e.query]),
        "pixels": lambda e: prototype_predict(pixels[e.support], e.support_y, pixels[e.query]),
    }
    unknown = set(methods) - set(available)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {sorted(available)}")
    for reader in ("other_scoring", "calibrated"):
        if reader in methods and ("llm" not in methods or methods.index("llm") > methods.index(reader)):
            parser.error(f"{reader} reads the scores of the llm method: list llm before it")

    started = time.perf_counter()

    def progress(cell, episode):
        if (episode + 1) % args.report_every == 0 or episode + 1 == args.episodes:
            print(f"cell {cell + 1}/{len(plan)}: {episode + 1}/{args.episodes} episodes, "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    plan = [(w, k) for w in args.ways for k in args.shots]
    cells = evaluate_grid(labels, {m: available[m] for m in methods}, ways=args.ways, shots=args.shots,
                          n_query=args.queries, n_episodes=args.episodes, seed=args.seed, on_episode=progress)
    table = format_table(cells, TITLES)
    command = "python benchmarks/fewshot_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"Fashion-MNIST test split, {args.episodes} episodes per cell, {args.queries} queries per class, "
              f"seed {args.seed}, {tokenizer.n_tokens_} tokens per image, direct scoring {args.scoring}, "
              f"instruction {args.instruction!r}, max_tokens_per_item {args.max_tokens_per_item}; "
              f"mean ± 95% CI (t over episodes)")
    print(header)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"`{command}`\n\n{header}\n\n{table}\n", encoding="utf-8")
    record = {
        "command": command, "args": vars(args), "encode_seconds": encode_seconds,
        "pool_images": int(len(pool)), "max_abs_proba_row_sum_error": worst_row_sum[0],
        "checkpoint": tokenizer.checkpoint_, "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "cells": cells,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()

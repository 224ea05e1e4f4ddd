"""Every figure of a model card, for any checkpoint, from one command.

On Fashion-MNIST (train split for the probe's training, test split for everything
scored):

- **reconstruction**: PSNR over all test images (pixels in [0, 1], no masking, as at
  inference), and the codebook usage and perplexity of their token ids;
- **linear probe**: StandardScaler + LogisticRegression (lbfgs, run to convergence:
  the iterations are reported, and a fit that hits ``--max-iter`` says so) on the
  train split, scored on the test split, for raw pixels, the encoder features
  (every encoder block, token-averaged: ``LQAETokenizer``'s default) and the LM-layer
  features (every hidden state of the frozen LM over the tokens: the paper's probe);
- **token overlap** few-shot: each query takes the class whose support images share
  the most token ids with it (no LLM), against nearest pixel prototypes, on seeded
  episodes of the test split;
- **LLM few-shot**: ``LQAETokenizer(output="text")`` + ``LLMFewShotClassifier()`` with
  every default (the embedded Gemma 3 270M, channel scoring, the checkpoint's text
  token grid) on the first ``--llm-episodes`` of the same episodes.

Every cell reports a mean and the half-width of its 95% interval (Student t over
per-episode accuracies). The episodes are those of ``benchmarks/fewshot_eval.py``
(first ``--pool-per-class`` test images of each class, ``--seed``), so runs on two
checkpoints are paired. A checkpoint with a learned codebook (a VQ-VAE) has no LM: its
LM-layer and LLM rows are reported as not applicable.

    python benchmarks/evaluate_checkpoint.py                              # the shipped checkpoint, full size
    python benchmarks/evaluate_checkpoint.py runs/x/checkpoint --out docs/results/eval_x
    python benchmarks/evaluate_checkpoint.py CKPT --train-limit 5000 --test-limit 2000 --llm-episodes 0

Writes ``OUT.json`` and ``OUT.md`` (default OUT: ``evaluation``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lqae_sklearn import LLMFewShotClassifier, LQAETokenizer, load_checkpoint
from lqae_sklearn._images import image_source
from lqae_sklearn.datasets import fetch_fashion_mnist
from lqae_sklearn.evaluation import (
    LLMEpisodeRunner,
    episode_accuracies,
    mean_confidence_interval,
    prototype_predict,
    sample_episodes,
    token_overlap_predict,
)
from lqae_sklearn.model import DEFAULT_CHECKPOINT
from lqae_sklearn.training._report import code_statistics, psnr


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@torch.inference_mode()
def encode(model, images, preprocessing, layers, batch_size, reconstruct=False) -> dict:
    """Token ids, features of ``layers`` and (optionally) the reconstruction error, in one pass."""
    device = next(model.parameters()).device
    source = image_source(images, preprocessing)
    ids, features, squared_error, pixels = [], [], 0.0, 0
    for start in range(0, len(source), batch_size):
        x = torch.from_numpy(source.batch(start, start + batch_size)).to(device)
        batch_ids, batch_features = model.encode_with_features(x, layers)
        ids.append(batch_ids.cpu().numpy())
        if batch_features is not None:
            features.append(batch_features.float().cpu().numpy())
        if reconstruct:
            squared_error += float(((model.decode(batch_ids).float() - x) ** 2).sum())
            pixels += x.numel()
    out = {"ids": np.concatenate(ids)}
    if features:
        out["features"] = np.concatenate(features)
    if reconstruct:
        out["mse"] = squared_error / pixels
    return out


def fit_probe(train, y_train, test, y_test, C, max_iter) -> dict:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(train, y_train)
    return {"accuracy": float(model.score(test, y_test)), "width": int(train.shape[1]),
            "iterations": int(np.max(model[-1].n_iter_)),
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
            "fit_seconds": round(time.perf_counter() - start, 1)}


def interval(accuracies) -> dict:
    mean, half = mean_confidence_interval(accuracies)
    return {"mean": mean, "ci95_half_width": half, "episodes": len(accuracies)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images (default: 60,000)")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test images (default: 10,000)")
    parser.add_argument("--C", type=float, default=0.1, help="inverse regularisation of every probe")
    parser.add_argument("--max-iter", type=int, default=5000, help="lbfgs iteration cap of each probe")
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per token-overlap cell")
    parser.add_argument("--llm-episodes", type=int, default=200, help="episodes per LLM cell (0: skip the LLM)")
    parser.add_argument("--ways", default="2,5", help="comma-separated ways of the few-shot cells (1-shot)")
    parser.add_argument("--pool-per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device of the autoencoder and the LLM")
    parser.add_argument("--out", default="evaluation", help="output stem: writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model = load_checkpoint(args.checkpoint, device=args.device)
    config = model.checkpoint_config
    preprocessing = config["preprocessing"]
    has_lm = getattr(model, "language_model", None) is not None
    encoder_layers = [n for n in model.feature_layer_names() if n.startswith("encoder.")]
    lm_layers = [n for n in model.feature_layer_names() if n.startswith("lm.")]
    layers = encoder_layers + lm_layers
    X_train, y_train = fetch_fashion_mnist(subset="train", return_X_y=True)
    X_pool_all, y_pool_all = fetch_fashion_mnist(subset="test", return_X_y=True)  # the episodes' pool too
    X_train, y_train = X_train[: args.train_limit], y_train[: args.train_limit]
    X_test, y_test = X_pool_all[: args.test_limit], y_pool_all[: args.test_limit]
    result = {"checkpoint": str(args.checkpoint), "model": config["model"],
              "training_steps": config.get("training", {}).get("steps"),
              "train_images": len(X_train), "test_images": len(X_test)}

    log(f"encoding {len(X_test)} test images (ids, {len(layers)} layers, reconstructions)")
    test = encode(model, X_test, preprocessing, layers, args.batch_size, reconstruct=True)
    counts = torch.bincount(torch.from_numpy(test["ids"]).flatten(), minlength=int(test["ids"].max()) + 1)
    result["reconstruction"] = {"psnr_db": psnr(test["mse"]), "distinct_tokens": int((counts > 0).sum()),
                                "codebook_size": model.quantizer.codebook_size,
                                **code_statistics(counts.float(), model.quantizer.codebook_size)}
    log(f"test PSNR {result['reconstruction']['psnr_db']:.2f} dB; encoding {len(X_train)} training images")
    train = encode(model, X_train, preprocessing, layers, args.batch_size)

    widths = {}
    offset = 0
    for name in layers:  # features are the layers' token means, concatenated in this order
        width = model.config.encoder_dim if name.startswith("encoder.") else model.language_model.hidden_size
        widths[name] = slice(offset, offset + width)
        offset += width
    assert offset == train["features"].shape[1], (offset, train["features"].shape)

    def columns(names):
        return np.concatenate([np.arange(widths[n].start, widths[n].stop) for n in names])

    probes = {"raw pixels": (X_train.reshape(len(X_train), -1) / 255.0, X_test.reshape(len(X_test), -1) / 255.0),
              "encoder features (every block)": tuple(f[:, columns(encoder_layers)]
                                                      for f in (train["features"], test["features"]))}
    if has_lm:
        probes["LM-layer features (every hidden state)"] = tuple(f[:, columns(lm_layers)]
                                                                  for f in (train["features"], test["features"]))
    result["linear_probe"] = {}
    for name, (a, b) in probes.items():
        result["linear_probe"][name] = fit_probe(a, y_train, b, y_test, args.C, args.max_iter)
        log(f"probe {name}: {result['linear_probe'][name]}")
    if not has_lm:
        result["linear_probe"]["LM-layer features (every hidden state)"] = None

    # Few-shot cells: the test split's first pool-per-class images of each class, as in fewshot_eval.py.
    pool = np.sort(np.concatenate([np.flatnonzero(y_pool_all == c)[: args.pool_per_class]
                                   for c in np.unique(y_pool_all)]))
    pool_images, pool_labels = X_pool_all[pool], y_pool_all[pool]
    pool_pixels = pool_images.reshape(len(pool), -1).astype(np.float32) / 255.0
    if len(X_test) == len(X_pool_all) and len(pool) == len(X_pool_all):
        pool_ids = test["ids"]  # the pool is the whole test split, already encoded
    else:
        pool_ids = encode(model, pool_images, preprocessing, [], args.batch_size)["ids"]
    ways = [int(w) for w in args.ways.split(",")]
    cells = {n_way: sample_episodes(pool_labels, n_way, 1, 1, args.episodes, seed=args.seed) for n_way in ways}
    result["few_shot"] = []
    tokenizer = runner = None
    if args.llm_episodes and has_lm:
        log("loading the default few-shot pipeline (LQAETokenizer(output='text') + LLMFewShotClassifier())")
        tokenizer = LQAETokenizer(checkpoint=args.checkpoint, output="text", device=args.device).fit()
        # The text grid may be coarser than the patch grid: encode the images the LLM episodes use, at it.
        used = np.unique(np.concatenate([np.concatenate([e.support, e.query])
                                         for episodes in cells.values() for e in episodes[: args.llm_episodes]]))
        text_ids = np.zeros((len(pool), tokenizer.n_tokens_), dtype=np.int64)
        text_ids[used] = tokenizer.encode(pool_images[used], ("ids",))["ids"]
        runner = LLMEpisodeRunner(LLMFewShotClassifier(device=args.device), tokenizer.ids_to_text)
    for n_way, episodes in cells.items():
        cell = {"ways": n_way, "shots": 1, "chance": 1 / n_way,
                "token overlap": interval(episode_accuracies(episodes, lambda e: token_overlap_predict(
                    pool_ids[e.support], e.support_y, pool_ids[e.query]))),
                "pixel prototypes": interval(episode_accuracies(episodes, lambda e: prototype_predict(
                    pool_pixels[e.support], e.support_y, pool_pixels[e.query])))}
        if runner is not None:
            llm_episodes = episodes[: args.llm_episodes]
            start = time.perf_counter()
            llm = episode_accuracies(llm_episodes, lambda e: runner(e, text_ids)[0])
            cell["LLM, default pipeline"] = interval(llm)
            cell["LLM, default pipeline"]["tokens_per_image"] = tokenizer.n_tokens_
            cell["LLM, default pipeline"]["seconds_per_episode"] = (time.perf_counter() - start) / len(llm_episodes)
            cell["pixel prototypes, LLM episodes"] = interval(episode_accuracies(llm_episodes, lambda e: (
                prototype_predict(pool_pixels[e.support], e.support_y, pool_pixels[e.query]))))
        else:
            cell["LLM, default pipeline"] = None
        log(f"few-shot {n_way}-way 1-shot: {cell}")
        result["few_shot"].append(cell)

    result["seconds"] = round(time.perf_counter() - started, 1)
    result["torch_threads"] = torch.get_num_threads()
    result["device"] = args.device
    result["command"] = " ".join(["python", "benchmarks/evaluate_checkpoint.py", *(argv or sys.argv[1:])])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def _ci(cell) -> str:
    return "n/a" if cell is None else f"{cell['mean']:.3f} ± {cell['ci95_half_width']:.3f} ({cell['episodes']} ep.)"


def markdown(result: dict) -> str:
    r = result["reconstruction"]
    lines = [f"Checkpoint `{result['checkpoint']}` ({result['training_steps']} training steps); "
             f"{result['train_images']:,} train / {result['test_images']:,} test images.", "",
             "| test PSNR | distinct tokens | codebook usage | code perplexity |", "|---|---|---|---|",
             f"| {r['psnr_db']:.2f} dB | {r['distinct_tokens']:,} of {r['codebook_size']:,} | "
             f"{100 * r['codebook_usage']:.1f}% | {r['perplexity']:.0f} |", "",
             "| linear probe (StandardScaler + LogisticRegression) | width | test accuracy | lbfgs iterations |",
             "|---|---|---|---|"]
    for name, p in result["linear_probe"].items():
        if p is None:
            lines.append(f"| {name} | n/a (no language model) | | |")
        else:
            note = "" if p["converged"] else " (hit the cap)"
            lines.append(f"| {name} | {p['width']:,} | {p['accuracy']:.4f} | {p['iterations']}{note} |")
    lines += ["", "| few-shot, 1-shot | chance | token overlap | pixel prototypes | LLM, default pipeline | "
              "pixel prototypes, LLM episodes |", "|---|---|---|---|---|---|"]
    for c in result["few_shot"]:
        lines.append(f"| {c['ways']}-way | {c['chance']:.2f} | {_ci(c['token overlap'])} | "
                     f"{_ci(c['pixel prototypes'])} | {_ci(c['LLM, default pipeline'])} | "
                     f"{_ci(c.get('pixel prototypes, LLM episodes'))} |")
    lines += ["", f"`{result['command']}` ({result['seconds']:.0f} s, {result['torch_threads']} torch threads)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

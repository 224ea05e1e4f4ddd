"""The library's two headline lines, with every default, against raw pixels.

``probe``: ``Pipeline([LQAETokenizer(), LogisticRegression()])`` against the same
``LogisticRegression()`` on raw pixels, on ``--splits`` disjoint Fashion-MNIST splits of
``--train`` training and ``--test`` test images (split *i* takes the *i*-th block of each
subset). Both columns see the same images, so the per-split differences are paired; their
mean gets a Student-t 95% interval. Pixels are scored both as the fetcher returns them
(uint8, 0-255) and divided by 255. Split 0 also scores ``output="ids"``, the default
before 2026-11-30.

``fewshot``: ``make_pipeline(LQAETokenizer(output="text"), LLMFewShotClassifier())``
fitted on each episode's support images and asked to predict its queries, on the
episodes of ``benchmarks/fewshot_eval.py`` (Fashion-MNIST test split, the first
``--pool-per-class`` images of each class, seed 0): so episode *i* here is episode *i*
of the grid in ``docs/benchmarks.md``, and the accuracies are paired with it. Pixel
prototypes are scored on the same episodes.

    python benchmarks/default_pipeline.py probe --out docs/results/default_probe.json
    python benchmarks/default_pipeline.py fewshot --ways 2 --shots 1 --episodes 200 \\
        --out docs/results/default_fewshot_2w1s.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from lqae_sklearn import LLMFewShotClassifier, LQAETokenizer
from lqae_sklearn.datasets import fetch_fashion_mnist
from lqae_sklearn.evaluation import episode_accuracies, mean_confidence_interval, prototype_predict, sample_episodes


def _fit_score(model, X_train, y_train, X_test, y_test) -> dict:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X_train, y_train)
        accuracy = float(model.score(X_test, y_test))
    classifier = model[-1] if isinstance(model, Pipeline) else model
    return {"accuracy": accuracy, "seconds": round(time.perf_counter() - start, 1),
            "lbfgs_iterations": int(np.max(classifier.n_iter_)),
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught)}


def probe(args) -> dict:
    X_train, y_train = fetch_fashion_mnist(subset="train", return_X_y=True)
    X_test, y_test = fetch_fashion_mnist(subset="test", return_X_y=True)
    if args.splits * args.train > len(X_train) or args.splits * args.test > len(X_test):
        raise SystemExit(f"{args.splits} disjoint splits of {args.train}/{args.test} do not fit 60,000/10,000")
    splits = []
    for i in range(args.splits):
        tr, te = slice(i * args.train, (i + 1) * args.train), slice(i * args.test, (i + 1) * args.test)
        Xa, ya, Xb, yb = X_train[tr], y_train[tr], X_test[te], y_test[te]
        flat_a, flat_b = Xa.reshape(len(Xa), -1), Xb.reshape(len(Xb), -1)
        row = {
            "split": i,
            "default pipeline": _fit_score(Pipeline([("lqae", LQAETokenizer()), ("logreg", LogisticRegression())]),
                                           Xa, ya, Xb, yb),
            "pixels (uint8)": _fit_score(LogisticRegression(), flat_a, ya, flat_b, yb),
            "pixels / 255": _fit_score(LogisticRegression(), flat_a / 255.0, ya, flat_b / 255.0, yb),
        }
        if i == 0:
            row['output="ids" (old default)'] = _fit_score(
                Pipeline([("lqae", LQAETokenizer(output="ids")), ("logreg", LogisticRegression())]), Xa, ya, Xb, yb)
        print(json.dumps(row), file=sys.stderr, flush=True)
        splits.append(row)
    summary = {}
    for pixels in ("pixels (uint8)", "pixels / 255"):
        diff = [s["default pipeline"]["accuracy"] - s[pixels]["accuracy"] for s in splits]
        mean, half = mean_confidence_interval(diff)
        summary[f"default pipeline - {pixels}"] = {"mean": mean, "ci95_half_width": half,
                                                   "wins": int(sum(d > 0 for d in diff)), "splits": len(diff)}
    for name in ("default pipeline", "pixels (uint8)", "pixels / 255"):
        mean, half = mean_confidence_interval([s[name]["accuracy"] for s in splits])
        summary[name] = {"mean": mean, "ci95_half_width": half}
    return {"splits": splits, "summary": summary}


def fewshot(args) -> dict:
    images, labels = fetch_fashion_mnist(subset="test", return_X_y=True)
    pool = np.sort(np.concatenate([np.flatnonzero(labels == c)[: args.pool_per_class] for c in np.unique(labels)]))
    images, labels = images[pool], labels[pool]
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
    cells = []
    for n_way in args.ways:
        for n_shot in args.shots:
            episodes = sample_episodes(labels, n_way, n_shot, args.queries, args.episodes, seed=args.seed)
            start = time.perf_counter()

            def default_pipeline(episode):
                # Exactly the documented usage: every parameter at its default but the seed of the draw.
                pipe = make_pipeline(LQAETokenizer(output="text"), LLMFewShotClassifier(random_state=episode.seed))
                pipe.fit(images[episode.support], episode.support_y)
                return pipe.predict(images[episode.query])

            llm = episode_accuracies(episodes, default_pipeline)
            seconds = time.perf_counter() - start
            proto = episode_accuracies(episodes, lambda e: prototype_predict(pixels[e.support], e.support_y,
                                                                             pixels[e.query]))
            cell = {"ways": n_way, "shots": n_shot, "episodes": len(episodes), "chance": 1 / n_way,
                    "default pipeline": dict(zip(("mean", "ci95_half_width"), mean_confidence_interval(llm))),
                    "pixel prototypes": dict(zip(("mean", "ci95_half_width"), mean_confidence_interval(proto))),
                    "seconds_per_episode": seconds / len(episodes),
                    "per_episode": {"default pipeline": llm.tolist(), "pixel prototypes": proto.tolist()}}
            print(json.dumps({k: v for k, v in cell.items() if k != "per_episode"}), file=sys.stderr, flush=True)
            cells.append(cell)
    return {"cells": cells}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True)
    p = sub.add_parser("probe", help="the default linear-probe pipeline against raw pixels")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--test", type=int, default=2000)
    f = sub.add_parser("fewshot", help="the default few-shot pipeline on seeded episodes")
    f.add_argument("--ways", type=lambda s: [int(v) for v in s.split(",")], default=[2])
    f.add_argument("--shots", type=lambda s: [int(v) for v in s.split(",")], default=[1])
    f.add_argument("--episodes", type=int, default=200)
    f.add_argument("--queries", type=int, default=1)
    f.add_argument("--pool-per-class", type=int, default=1000)
    f.add_argument("--seed", type=int, default=0)
    for q in (p, f):
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        q.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = probe(args) if args.task == "probe" else fewshot(args)
    result.update(command=" ".join(["python", "benchmarks/default_pipeline.py", *(argv or sys.argv[1:])]),
                  seconds=round(time.perf_counter() - start, 1), torch_threads=torch.get_num_threads())
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps(result.get("summary", [{k: v for k, v in c.items() if k != "per_episode"}
                                            for c in result.get("cells", [])]), indent=1))
    return result


if __name__ == "__main__":
    main()

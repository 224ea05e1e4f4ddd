"""Few-shot options on Fashion-MNIST episodes: demonstration orders, calibration, nearest demonstrations (issue 23).

Every (way, shot) cell runs the same episodes (``sample_episodes``, fixed by ``--seed``; with ``--seed 0`` and one
query per class they are the episodes of ``benchmarks/fewshot_eval.py``'s grid in ``docs/benchmarks.md``) through
``LLMFewShotClassifier`` with the embedded Gemma 3 270M, channel scoring and the token text of
``LQAETokenizer(output="text")`` (shipped checkpoint: 3 x 3 tokens per image), under each variant:

* ``o{N}``: ``n_orders=N``, no calibration (``o1``: one order of the demonstrations), ``label_scoring="channel"``,
  ``demonstrations="random"``; ``o{N}@nearest`` (and every name ending ``@nearest``): the same under
  ``demonstrations="nearest"`` (``--demonstrations``; with all ``shot`` examples of a class in each prompt, the two
  show the same images and differ only in their order: nearest last);
  ``pc:o{N}`` (and every other name with ``pc:``): the same under ``label_scoring="channel_per_class"`` (one prompt
  per class, holding that class's demonstrations; ``--scorings``);
* ``o{N}+cf`` / ``o{N}+bc`` / ``o{N}+oc``: the same with ``calibration="content_free"`` / ``"batch"`` (the batch
  is the episode's queries, one per class) / ``"other_classes"`` (references: the support images themselves);
* ``near{K}`` / ``rand{K}`` (5-shot cells, ``--subset K``): ``K`` of the ``shot`` support images per class in each
  prompt, the nearest to each query (``demonstrations="nearest"``) or random ones, with ``n_orders=--subset-orders``;
* ``before`` (``--before-commit``, only in the cells of ``--before-cells``): the classifier as it was at that commit
  (one random order from ``random_state``), for the spread across ``random_state``.

Each episode fits on its support images with ``n_examples_per_class=shot`` and ``random_state=episode seed + s``
(``s = 0`` for the grid; ``s`` in ``--states`` for the spread) and predicts its queries in one call. Next to them,
without an LLM: ``overlap`` (``token_overlap_predict`` on the same 9-token texts) and ``pixels`` (nearest class mean of
raw pixels). ``--reference FILE`` adds per-episode columns from an earlier JSON of ``fewshot_eval.py`` on the same
episodes (checked: its pixel column must equal this run's, episode for episode).

LLM scores go through ``fewshot_cache.MemoBackend`` (``--scores FILE``): a prompt scored once is never scored again,
so the variants cost what their distinct prompts cost, and a rerun resumes. A method's "LLM s/episode" is the time
of the scores it used, each charged at the rate it was computed at.

Example (the commands of ``docs/benchmarks.md``, "Few-shot options")::

    python benchmarks/fewshot_options.py --ways 2 --shots 1 --episodes 200 --orders 2,1 --states 0,1,2,3,4 \\
        --before-commit 1bc21a5 --before-cells 2x1 --texts texts_g3.npz --scores scores.jsonl --out options_2w1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fewshot_cache import MemoBackend, token_codes, token_texts, write_results  # noqa: E402

from lqae_sklearn import LLMFewShotClassifier  # noqa: E402
from lqae_sklearn.datasets import fetch_fashion_mnist  # noqa: E402
from lqae_sklearn.evaluation import (  # noqa: E402
    mean_confidence_interval, prototype_predict, sample_episodes, token_overlap_predict,
)
from lqae_sklearn.llm import HuggingFaceBackend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def before_classifier(commit):
    """``LLMFewShotClassifier`` as it was at ``commit`` (its _fewshot.py and llm/_prompt.py), imported from git."""
    folder = Path(tempfile.mkdtemp(prefix="fewshot-before-"))

    def source(path):
        return subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    (folder / "_before_prompt.py").write_text(source("lqae_sklearn/llm/_prompt.py"))
    code = (source("lqae_sklearn/_fewshot.py").replace("from ._loading import", "from lqae_sklearn._loading import")
            .replace("from .llm._prompt import", "from _before_prompt import")
            .replace("from .llm import", "from lqae_sklearn.llm import"))
    (folder / "_before_fewshot.py").write_text(code)
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("_before_fewshot", folder / "_before_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LLMFewShotClassifier


#: Calibration variants, content-free first: its calls hold every cell the others ask for.
CALIBRATION_VARIANTS = (("+cf", "content_free"), ("", None), ("+bc", "batch"), ("+oc", "other_classes"))
#: Variant names: the channel scoring's bare (``o1``), the per-class prompts' with ``pc:`` (``pc:o1``).
SCORING_TAGS = {"channel": "", "channel_per_class": "pc:"}


def variants(args):
    """(name, classifier class, parameters, n_examples_per_class or None for the shot) in the order they run.

    The variant with the most orders and content-free calibration runs first: its calls hold every cell the others
    ask for, so the others read them back.
    """
    out = []
    for scoring in args.scorings:
        tag = SCORING_TAGS[scoring]
        for n in sorted(args.orders, reverse=True):
            for suffix, calibration in CALIBRATION_VARIANTS:
                if (calibration or "none") not in args.calibrations:
                    continue
                for kind in args.demonstrations:
                    at = "" if kind == "random" else f"@{kind}"
                    out.append((f"{tag}o{n}{suffix}{at}", LLMFewShotClassifier,
                                {"label_scoring": scoring, "n_orders": n, "calibration": calibration,
                                 "demonstrations": kind}, None))
        for k in args.subset:
            for kind in ("nearest", "random"):
                out.append((f"{tag}{kind[:4]}{k}", LLMFewShotClassifier,
                            {"label_scoring": scoring, "n_orders": args.subset_orders, "demonstrations": kind}, k))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=_ints, default=[2, 5])
    parser.add_argument("--shots", type=_ints, default=[1, 5])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--orders", type=_ints, default=[1], help="n_orders values, each run with every calibration")
    parser.add_argument("--scorings", type=lambda t: [v for v in t.split(",") if v], default=["channel"],
                        help=f"label_scoring values, each run with every variant: {', '.join(SCORING_TAGS)}")
    parser.add_argument("--calibrations", type=lambda t: [v for v in t.split(",") if v],
                        default=["content_free", "none", "batch"], help="calibration variants to run (none: off)")
    parser.add_argument("--demonstrations", type=lambda t: [v for v in t.split(",") if v], default=["random"],
                        help="demonstrations values of the o{N} variants: random, nearest")
    parser.add_argument("--subset", type=_ints, default=[],
                        help="K < shot: nearest vs random K demonstrations per class (cells with shot > K only)")
    parser.add_argument("--subset-orders", type=int, default=1, help="n_orders of the --subset variants")
    parser.add_argument("--states", type=_ints, default=[0],
                        help="s values: each variant also runs with random_state = episode seed + s (spread)")
    parser.add_argument("--spread-variants", default=None,
                        help="comma-separated variants run for every --states value (default: all)")
    parser.add_argument("--before-commit", default=None, help="also run the classifier of this commit ('before')")
    parser.add_argument("--before-cells", default="2x1", help="cells WAYxSHOT where 'before' runs")
    parser.add_argument("--reference", action="append", default=[],
                        help="NAME=FILE.json:METHOD: a per-episode column from fewshot_eval.py on the same episodes")
    parser.add_argument("--texts", default="texts_g3.npz", help="cache of the token texts (made if missing)")
    parser.add_argument("--token-grid", type=int, default=None,
                        help="LQAETokenizer token_grid of the texts (default: the checkpoint's text grid, 3)")
    parser.add_argument("--scores", default=None, help="JSON-lines cache of LLM scores (resumes a run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-every", type=int, default=20)
    parser.add_argument("--out", default="fewshot_options", help="output stem: writes STEM.md and STEM.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    texts, labels, *_ = token_texts(args.texts, token_grid=args.token_grid or "auto")
    codes = token_codes(texts)
    images, pixel_labels = fetch_fashion_mnist(subset="test", return_X_y=True)
    assert np.array_equal(pixel_labels, labels)
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
    backend = MemoBackend(HuggingFaceBackend(device="cpu"), args.scores)
    plan = variants(args)
    before = before_classifier(args.before_commit) if args.before_commit else None
    before_cells = {tuple(int(v) for v in c.split("x")) for c in args.before_cells.split(",") if c}
    spread_names = None if args.spread_variants is None else set(args.spread_variants.split(","))
    references = []
    for spec in args.reference:
        name, rest = spec.split("=", 1)
        file, method = rest.rsplit(":", 1)
        references.append((name, json.loads(Path(file).read_text()), method))

    cells, started = [], time.perf_counter()
    for way in args.ways:
        for shot in args.shots:
            episodes = sample_episodes(labels, way, shot, 1, args.episodes, seed=args.seed)
            names = [v for v in plan if v[3] is None or v[3] < shot]
            if before is not None and (way, shot) in before_cells:
                names = names + [("before", before, {}, None)]
            accuracy = {name: {s: [] for s in args.states} for name, *_ in names}
            accuracy.update({"overlap": {0: []}, "pixels": {0: []}})
            seconds = dict.fromkeys(accuracy, 0.0)
            wall = dict.fromkeys(accuracy, 0.0)
            for e, episode in enumerate(episodes):
                support, query = list(texts[episode.support]), list(texts[episode.query])
                for name, cls, params, k in names:
                    for s in args.states:
                        if s != args.states[0] and spread_names is not None and name not in spread_names:
                            continue
                        backend.meter["name"] = name
                        tic = time.perf_counter()
                        clf = cls(backend, n_examples_per_class=k or shot, random_state=episode.seed + s,
                                  **{"label_scoring": "channel", **params})
                        predicted = clf.fit(support, episode.support_y).predict(query)
                        wall[name] += time.perf_counter() - tic
                        accuracy[name][s].append(float(np.mean(predicted == episode.query_y)))
                accuracy["overlap"][0].append(float(np.mean(
                    token_overlap_predict(codes[episode.support], episode.support_y, codes[episode.query])
                    == episode.query_y)))
                accuracy["pixels"][0].append(float(np.mean(
                    prototype_predict(pixels[episode.support], episode.support_y, pixels[episode.query])
                    == episode.query_y)))
                if (e + 1) % args.report_every == 0 or e + 1 == len(episodes):
                    print(f"{way}-way {shot}-shot: {e + 1}/{len(episodes)} episodes, "
                          f"{time.perf_counter() - started:.0f} s, LLM s computed "
                          f"{ {k: round(v) for k, v in backend.meter['computed'].items()} }", file=sys.stderr,
                          flush=True)
            for name in seconds:
                seconds[name] = backend.meter["seconds"].pop(name, 0.0)
            cell = {"way": way, "shot": shot, "episodes": args.episodes, "chance": 1 / way, "methods": {}}
            for name, per_state in accuracy.items():
                runs = {s: v for s, v in per_state.items() if v}
                mean, half = mean_confidence_interval(runs[args.states[0]])
                state_means = {s: float(np.mean(v)) for s, v in runs.items()}
                cell["methods"][name] = {
                    "mean": mean, "ci95": half, "accuracies": runs[args.states[0]],
                    "state_means": state_means, "spread": max(state_means.values()) - min(state_means.values()),
                    "llm_seconds_per_episode": seconds[name] / (args.episodes * len(runs)),
                    "wall_seconds": wall[name],
                }
            for ref_name, record, method in references:
                match = [c for c in record["cells"] if c["way"] == way and c["shot"] == shot]
                if not match:
                    continue
                ref = match[0]
                if "pixels" in ref["methods"] and ref["methods"]["pixels"]["accuracies"][: args.episodes] != \
                        cell["methods"]["pixels"]["accuracies"]:
                    raise SystemExit(f"{ref_name}: its episodes are not this run's (pixel accuracies differ)")
                values = ref["methods"][method]["accuracies"][: args.episodes]
                mean, half = mean_confidence_interval(values)
                cell["methods"][ref_name] = {"mean": mean, "ci95": half, "accuracies": values, "reference": True}
            cells.append(cell)
            write(args, argv, cells)
    write(args, argv, cells)


def write(args, argv, cells):
    command = "python benchmarks/fewshot_options.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{command}`", "",
             f"Fashion-MNIST test split, {args.episodes} episodes per cell, 1 query per class, seed {args.seed}; "
             f"mean ± 95% CI (t over episodes); spread = max - min of the mean over random_state = seed + s, s in "
             f"{args.states}; LLM s/episode charged per method (cached scores at the rate they were computed)", "",
             "| cell | method | accuracy | spread over random_state | LLM s/episode |", "|---|---|---|---|---|"]
    for cell in cells:
        for name, m in cell["methods"].items():
            spread = "" if "spread" not in m or len(m["state_means"]) < 2 else f"{m['spread']:.3f}"
            cost = f"{m['llm_seconds_per_episode']:.2f}" if m.get("llm_seconds_per_episode") else ""
            lines.append(f"| {cell['way']}-way {cell['shot']}-shot | {name} | {m['mean']:.3f} ± {m['ci95']:.3f} | "
                         f"{spread} | {cost} |")
    write_results(args.out, lines, {"command": command, "args": vars(args), "cells": cells})


if __name__ == "__main__":
    main()

"""``lqae-fewshot``: the few-shot episode protocol on a labelled folder or Fashion-MNIST."""

from __future__ import annotations

import json
import os
import sys

import click
import numpy as np

from ._exit import EXIT_FAILED, EXIT_OK, UsageProblem, exit_with

METHOD_CHOICES = ("llm", "shuffled", "pixels")
METHOD_TITLES = {"llm": "LQAE tokens + LLM", "shuffled": "shuffled tokens + LLM", "pixels": "pixel prototypes"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

EPILOG = """\b
Protocol: each episode draws WAY classes, SHOT support and --queries query
images per class (all distinct), and names the classes with nonsense words
(dax, blicket, wug, ...) drawn afresh per episode. The LLM sees the support
images as LQAE token text (3 x 3 tokens per image by default), one
"<name>: <tokens>" line each. With --scoring channel_per_class (the default
and the most accurate in docs/benchmarks.md) each class gets a prompt of
its own support lines only, and the query goes to the class after whose
lines its tokens are likeliest; --scoring channel writes every class's
lines into one prompt and scores the query after each name; with --scoring
loglik the lines are "Input: <tokens>\\nOutput: <name>" pairs and the query
gets the name whose log-likelihood after it is highest. Images are
encoded once, before the first episode. The same episodes (fixed by
--seed) are given to every method:
  llm       LQAE tokens + the LLM (embedded Gemma 3 270M unless --llm)
  shuffled  control: the episode's tokens dealt out at random between its
            images, so the text no longer depends on the image (chance)
  pixels    non-LLM baseline: nearest class mean of raw pixels (squared L2)
Each cell prints the mean accuracy over episodes ± the half-width of its
95% confidence interval (Student t over per-episode accuracies).
Every support image of an episode is a demonstration, in the order
--demonstrations gives: nearest (the default) puts each class's examples
nearest to the query last, random keeps the support set's order for every
query; --orders N scores each query under up to N orders of them (a cost
of N). --calibration batch
subtracts each name's mean score over the episode's queries, which come in
equal numbers per class: an answer depends on the other queries, and in a
2-way episode with --queries 1 the two answers always differ (but for an
exact tie), so its accuracy uses what the protocol tells it (docs/benchmarks.md, "Few-shot
options").

\b
SOURCE is "fashion-mnist" (its test split, from fetch_fashion_mnist: the
scikit-learn data cache, $LQAE_FASHION_MNIST, Debian's package, or a
one-time download) or a folder with
one subfolder of images per class (the class is the name of the folder
holding the image, e.g. examples/fashion-mnist/sneaker/00012.png).

\b
Cost: with the defaults (channel, 3 x 3 tokens), the embedded LLM on one CPU
core scores a 2-way episode in about 1 s and a 5-way one in 3-4 s (one query
per class); one token per patch (--token-grid 7) costs several times more.
A GPU (--device cuda) or an LLM server (--llm URL) is faster still.
--method pixels loads no model at all.

\b
Exit status:
  0    table printed
  1    the LLM failed while scoring (stderr says why)
  2    usage error: bad option, unusable SOURCE (missing, not enough
       classes or images, an undecodable image), unusable checkpoint or LLM
  130  interrupted by Ctrl-C

\b
Examples:
  lqae-fewshot fashion-mnist --way 2 --way 5 --shot 1 --shot 5 --episodes 50
  lqae-fewshot examples/fashion-mnist --way 2 --shot 1 --episodes 10
  lqae-fewshot my-photos/ --method pixels --json results.json
"""


def _parse_methods(ctx, param, values):
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not names:
        return ("llm", "pixels")
    bad = [n for n in names if n not in METHOD_CHOICES]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)} not among {', '.join(METHOD_CHOICES)}")
    return tuple(dict.fromkeys(names))


def folder_items(root: str) -> tuple[list[str], np.ndarray]:
    """Image paths under ``root`` (sorted) and their classes (the name of the folder holding each)."""
    if not os.path.isdir(root):
        what = "does not exist" if not os.path.exists(root) else "is not a folder"
        raise UsageProblem(f"SOURCE {root!r} {what}; give a folder with one subfolder per class, or 'fashion-mnist'")
    paths, labels = [], []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if os.path.samefile(folder, root):
                raise UsageProblem(
                    f"{os.path.join(folder, name)!r} sits directly in SOURCE; put each image in a subfolder named "
                    f"after its class"
                )
            paths.append(os.path.join(folder, name))
            labels.append(os.path.basename(folder))
    if not paths:
        raise UsageProblem(
            f"SOURCE {root!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in class subfolders"
        )
    return paths, np.array(labels, dtype=object)


def _check_pool(labels, ways, shots, n_query, source) -> None:
    classes, counts = np.unique(labels, return_counts=True)
    need = max(shots) + n_query
    enough = int((counts >= need).sum())
    if enough < max(ways):
        raise UsageProblem(
            f"{source!r}: {max(ways)}-way {max(shots)}-shot episodes with {n_query} quer"
            f"{'y' if n_query == 1 else 'ies'} per class need {max(ways)} classes with at least {need} images "
            f"each; {enough} of its {len(classes)} classes have that many "
            f"(counts: {', '.join(f'{c}={n}' for c, n in zip(classes, counts))})"
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.argument("source", metavar="SOURCE")
@click.option("-n", "--way", "ways", type=click.IntRange(min=2), multiple=True, metavar="N",
              help="Classes per episode; repeat for several [default: 2 and 5].")
@click.option("-k", "--shot", "shots", type=click.IntRange(min=1), multiple=True, metavar="K",
              help="Support images per class; repeat for several [default: 1 and 5].")
@click.option("-q", "--queries", type=click.IntRange(min=1), default=1, show_default=True,
              help="Query images per class in each episode.")
@click.option("-e", "--episodes", type=click.IntRange(min=1), default=20, show_default=True,
              help="Episodes per (way, shot) cell.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed that fixes the episodes.")
@click.option("-m", "--method", "methods", multiple=True, callback=_parse_methods, metavar="LIST",
              help="Methods, comma-separated from llm, shuffled, pixels [default: llm,pixels].")
@click.option("-c", "--checkpoint", default=None, metavar="PATH",
              help="LQAE checkpoint folder or .safetensors file [default: the packaged Fashion-MNIST model].")
@click.option("--llm", default=None, metavar="NAME|URL",
              help="Hugging Face causal LM name or folder, or an OpenAI-compatible server root "
                   "(http://host:8000/v1) [default: the embedded Gemma 3 270M].")
@click.option("--scoring", type=click.Choice(["channel_per_class", "channel", "loglik", "mean_loglik"]),
              default="channel_per_class",
              show_default=True,
              help="Class score: channel_per_class, the query's log-likelihood after each class's own "
                   "demonstrations (one prompt per class); channel, after each label in one prompt of every "
                   "class (label-first demonstrations); or loglik / mean_loglik, the label's total / per-token "
                   "log-likelihood after the query.")
@click.option("--token-grid", type=click.IntRange(min=1), default=None, metavar="G",
              help="G x G tokens per image (LQAETokenizer(token_grid=G)); the checkpoint's patch grid (7 for "
                   "the packaged one) writes one token per patch, as the paper does [default: the grid the "
                   "checkpoint recommends for text, LQAETokenizer(output=\"text\")'s default: 3 for the "
                   "packaged one].")
@click.option("--instruction", default=None, metavar="TEXT",
              help='Task line before the demonstrations, e.g. "Answer with one of: {labels}." [default: none].')
@click.option("--demonstrations", type=click.Choice(["nearest", "random"]), default=None,
              help="Order of each class's support images in a query's prompt: nearest to the query last, or the "
                   "support set's order for every query (LLMFewShotClassifier(demonstrations=...)) [default: the "
                   "classifier's].")
@click.option("--orders", "n_orders", type=click.IntRange(min=1), default=None, metavar="N",
              help="Score each query under up to N orders of the demonstrations and average (all orders when "
                   "they are at most N, else rotations; LLMFewShotClassifier(n_orders=N)) [default: the "
                   "classifier's].")
@click.option("--calibration", type=click.Choice(["none", "content_free", "batch", "other_classes"]),
              default=None,
              help="Remove the LLM's label prior: content_free subtracts the scores of the inputs \"N/A\", \"\" "
                   "and \"[MASK]\"; batch subtracts each label's mean score over the episode's queries, so a "
                   "query's answer depends on the others; other_classes subtracts each label's mean score for one "
                   "support image of each other class (LLMFewShotClassifier(calibration=...)) [default: the "
                   "classifier's].")
@click.option("--max-tokens-per-item", type=click.IntRange(min=1), default=None, metavar="T",
              help="Keep only the first T tokens of each image [default: all].")
@click.option("--device", default=None,
              help="Torch device for the tokenizer and a local LLM [default: CUDA if present].")
@click.option("--json", "json_path", default=None, metavar="PATH",
              help="Also write the results (per-episode accuracies included) as JSON to PATH.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar over episodes [default: only when stderr is a terminal].")
def cli(source, ways, shots, queries, episodes, seed, methods, checkpoint, llm, scoring, token_grid, instruction,
        demonstrations, n_orders, calibration, max_tokens_per_item, device, json_path, progress):
    """Few-shot image classification with LQAE tokens and an LLM; prints an accuracy table.

    SOURCE is "fashion-mnist" or a folder of class subfolders (see below).
    """
    exit_with("lqae-fewshot", lambda: run(
        source, ways=ways or (2, 5), shots=shots or (1, 5), n_query=queries, n_episodes=episodes, seed=seed,
        methods=methods, checkpoint=checkpoint, llm=llm, scoring=scoring, token_grid=token_grid,
        instruction=instruction, demonstrations=demonstrations, n_orders=n_orders, calibration=calibration,
        max_tokens_per_item=max_tokens_per_item, device=device, json_path=json_path, progress=progress))


def run(source, *, ways, shots, n_query, n_episodes, seed, methods, checkpoint, llm, scoring, token_grid,
        instruction, demonstrations, n_orders, calibration, max_tokens_per_item, device, json_path,
        progress) -> int:
    """Load SOURCE, encode it once, run the grid and print the table; returns the exit status."""
    from lqae_sklearn.model import CheckpointError, read_checkpoint_config
    from lqae_sklearn.evaluation import (
        LLMEpisodeRunner, evaluate_grid, format_table, prototype_predict, sample_episodes,
    )
    from lqae_sklearn._images import ImageLoadError, load_image, to_model_input
    from lqae_sklearn._fewshot import LLMFewShotClassifier
    from lqae_sklearn._loading import resolve_checkpoint
    from lqae_sklearn._tokenizer import LQAETokenizer
    from lqae_sklearn.llm import LLMBackendError, make_backend

    if json_path is not None and os.path.isdir(json_path):
        raise UsageProblem(f"--json {json_path!r} is a folder; give a file path")
    if source == "fashion-mnist":
        from lqae_sklearn.datasets import fetch_fashion_mnist

        try:
            images, labels = fetch_fashion_mnist(subset="test", return_X_y=True)
        except OSError as exc:
            raise UsageProblem(str(exc)) from exc
        described = "Fashion-MNIST test split"
    else:
        paths, labels = folder_items(source)
        described = f"folder {source}"
    _check_pool(labels, ways, shots, n_query, source)

    uses_llm = "llm" in methods or "shuffled" in methods
    try:
        checkpoint_path = resolve_checkpoint(checkpoint)
        preprocessing = read_checkpoint_config(checkpoint_path)["preprocessing"]
        # The pixel baseline needs only the checkpoint's preprocessing, not its weights.
        tokenizer = None
        if uses_llm:
            # output="text" resolves the grid as the default text pipeline does; ids are read by encode.
            tokenizer = LQAETokenizer(checkpoint=checkpoint, output="text", device=device or "auto",
                                      token_grid="auto" if token_grid is None else token_grid).fit()
    except (CheckpointError, FileNotFoundError, ValueError, OSError, KeyError) as exc:
        raise UsageProblem(f"checkpoint {checkpoint or 'default'!r} cannot be used: {exc}") from exc

    if source != "fashion-mnist":
        # Every file is decoded, used or not, so that a bad file is reported whatever the seed.
        try:
            images = np.stack([to_model_input(load_image(p), preprocessing) for p in paths]).transpose(0, 2, 3, 1)
        except ImageLoadError as exc:
            raise UsageProblem(f"cannot read an image of SOURCE: {exc}") from exc
    plan = [sample_episodes(labels, w, k, n_query, n_episodes, seed=seed) for w in ways for k in shots]
    used = np.unique(np.concatenate([np.concatenate([e.support, e.query]) for cell in plan for e in cell]))
    ids = pixels = None
    if uses_llm:  # only the images some episode uses are encoded, once
        ids = np.zeros((len(labels), tokenizer.n_tokens_), dtype=np.int64)
        ids[used] = tokenizer.encode(images[used], ("ids",))["ids"]
    if "pixels" in methods:
        pixels = images.reshape(len(images), -1).astype(np.float32)

    predictors = {}
    if uses_llm:
        is_server = bool(llm) and llm.startswith(("http://", "https://"))
        try:  # load before the first episode, so that an unusable LLM is a usage error
            backend = make_backend(llm, **({} if is_server or device is None else {"device": device})).load()
        except (ImportError, OSError, ValueError, TypeError, LLMBackendError) as exc:
            raise UsageProblem(f"LLM {llm or 'embedded Gemma 3 270M'!r} cannot be loaded: {exc}") from exc
        options = {}
        if demonstrations is not None:
            options["demonstrations"] = demonstrations
        if n_orders is not None:
            options["n_orders"] = n_orders
        if calibration is not None:
            options["calibration"] = None if calibration == "none" else calibration
        classifier = LLMFewShotClassifier(backend, label_scoring=scoring, instruction=instruction,
                                          max_tokens_per_item=max_tokens_per_item, **options)
        # As run, for the JSON record.
        demonstrations, n_orders, calibration = (classifier.demonstrations, classifier.n_orders,
                                                 classifier.calibration)
        for name, shuffle in (("llm", None), ("shuffled", "across")):
            if name in methods:
                runner = LLMEpisodeRunner(classifier, tokenizer.ids_to_text, shuffle=shuffle)
                predictors[name] = lambda episode, runner=runner: runner(episode, ids)[0]
    if "pixels" in methods:
        predictors["pixels"] = lambda e: prototype_predict(pixels[e.support], e.support_y, pixels[e.query])
    predictors = {name: predictors[name] for name in methods}

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ways) * len(shots) * n_episodes, desc="episodes", unit="ep", file=sys.stderr)
    try:
        cells = evaluate_grid(labels, predictors, ways=ways, shots=shots, n_query=n_query, n_episodes=n_episodes,
                              seed=seed, on_episode=(lambda c, i: bar.update(1)) if bar else None)
    except (LLMBackendError, RuntimeError, OSError) as exc:  # a server gave up, out of memory, ...
        click.echo(f"lqae-fewshot: the LLM failed while scoring: {type(exc).__name__}: {exc}", err=True)
        return EXIT_FAILED
    finally:
        if bar is not None:
            bar.close()

    click.echo(f"Few-shot accuracy on the {described}: {n_episodes} episodes per cell, {n_query} "
               f"quer{'y' if n_query == 1 else 'ies'} per class, seed {seed}; mean ± 95% CI")
    click.echo(format_table(cells, METHOD_TITLES))
    if json_path is not None:
        record = {"source": source, "checkpoint": str(checkpoint_path), "llm": llm or "embedded Gemma 3 270M",
                  "scoring": scoring, "token_grid": tokenizer.token_grid_ if tokenizer is not None else token_grid,
                  "instruction": instruction, "demonstrations": demonstrations, "n_orders": n_orders,
                  "calibration": calibration,
                  "max_tokens_per_item": max_tokens_per_item, "seed": seed, "cells": cells}
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return EXIT_OK


def main(argv=None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="lqae-fewshot")


if __name__ == "__main__":
    main()

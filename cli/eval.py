"""``lqae-eval``: a checkpoint's model-card figures beside training-free baselines, as JSON and Markdown."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click

from ._exit import EXIT_OK, UsageProblem, exit_with

EPILOG = """\b
What it measures, all on the same train/test split (probes train on the
train split; everything else is scored on the test split), for the
checkpoint and, side by side, training-free tokenizers at its grid:
  - raw pixels;
  - PCA with as many coefficients as the checkpoint has tokens per image;
  - k-means patch tokens: the checkpoint's patch x patch squares, each the
    nearest of K centres of MiniBatchKMeans(K, batch_size=16384, n_init=1,
    max_iter=20, random_state=SEED) fitted on up to --kmeans-patches random
    train patches (K = 1,024 and 4,096 unless --kmeans).
Figures: test PSNR under two definitions, each named (the mean of per-image
PSNR, and the dataset-level 10 log10(1 / mean MSE)); codebook usage and
perplexity on the test split; converged linear probes (StandardScaler +
LogisticRegression(C), lbfgs until it converges, iterations reported and a
fit that hits --max-iter flagged) on pixels, PCA coefficients, the encoder's
features, the LM layers' features (n/a for a VQ-VAE) and one-hot (position,
token) k-means tokens (the smallest K, no scaler); and 1-shot few-shot
episodes of the test split: token overlap (checkpoint and k-means tokens)
against nearest pixel prototypes, mean ± 95% interval. --llm-episodes N adds
the default LLM pipeline on the first N episodes of each cell (slow: 1-3 s
per episode on a CPU).

\b
Data: "fashion-mnist" (the default; its 60,000 train and 10,000 test images,
from the scikit-learn data cache, $LQAE_FASHION_MNIST, Debian's package or
a one-time download), or a folder with one subfolder of images per class
(the class is the name of the folder holding an image). A folder is split
into train and test by --seed, stratified (--test-fraction of each class to
test), unless --test-data gives the test split as a second folder.

\b
Sizes: a full run uses every image, 1,000,000 k-means patches and 1,000
episodes per cell (about 1.5 hours on two CPU cores for Fashion-MNIST, most
of it encoding 70,000 images through the LM). --quick subsamples: 10,000
train / 2,000 test images, 100,000 patches, 200 episodes (13 minutes on one
thread of a loaded 2-core machine, most of it encoding); the outputs say the
run was quick and give every size. The same --seed gives the same
figures on the same device.

\b
Exit status:
  0    done: Markdown on stdout (and STEM.json, STEM.md with --out)
  2    usage error: a missing or unreadable checkpoint, a data folder that is
       missing, empty, unlabelled or has one class, an undecodable image, a
       bad option or output path
  130  interrupted by Ctrl-C

\b
Examples:
  lqae-eval fashion-mnist-small-28 --quick --out eval-quick
  lqae-eval runs/mine/checkpoint --out docs/results/evaluation/mine
  lqae-eval runs/mine/checkpoint --data my-photos/ --test-fraction 0.25
  lqae-eval runs/mine/checkpoint --data train/ --test-data test/ --device cuda
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--data", default="fashion-mnist", show_default=True, metavar="fashion-mnist|DIR",
              help="Fashion-MNIST, or a folder of class subfolders (split by --seed unless --test-data).")
@click.option("--test-data", default=None, metavar="DIR",
              help="A folder of class subfolders to score on; --data is then the train split only.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Fraction of each class of a --data folder that goes to the test split.")
@click.option("--quick", is_flag=True, help="Subsample for a shorter CPU run (see below).")
@click.option("--train-images", type=click.IntRange(min=2), default=None, metavar="N",
              help="Use at most N train images, a seeded random choice [default: all; 10,000 with --quick].")
@click.option("--test-images", type=click.IntRange(min=2), default=None, metavar="N",
              help="Use at most N test images, a seeded random choice [default: all; 2,000 with --quick].")
@click.option("--kmeans-patches", type=click.IntRange(min=2), default=None, metavar="N",
              help="Train patches the k-means are fitted on [default: 1,000,000; 100,000 with --quick].")
@click.option("-k", "--kmeans", "kmeans_sizes", type=click.IntRange(min=2), multiple=True, metavar="K",
              help="K of a k-means baseline; repeat for several; the smallest also gives the one-hot probe "
                   "and the token-overlap baseline [default: 1024 and 4096].")
@click.option("-n", "--way", "ways", type=click.IntRange(min=2), multiple=True, metavar="N",
              help="Classes per few-shot episode (1-shot); repeat for several [default: 2 and 5].")
@click.option("-e", "--episodes", type=click.IntRange(min=2), default=None, metavar="N",
              help="Episodes per few-shot cell [default: 1,000; 200 with --quick].")
@click.option("--llm-episodes", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also run the default LLM pipeline on the first N episodes of each cell (0: no LLM).")
@click.option("--C", "C", type=click.FloatRange(0, min_open=True), default=0.1, show_default=True,
              help="Inverse regularisation of every probe's LogisticRegression.")
@click.option("--max-iter", type=click.IntRange(min=1), default=5000, show_default=True,
              help="lbfgs iteration cap of each probe (a fit that reaches it is flagged).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the split, subsamples, k-means, PCA and episodes.")
@click.option("--device", default="auto", show_default=True,
              help="Torch device of the checkpoint and the LLM (auto: CUDA when present, else the CPU).")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass of the checkpoint.")
@click.option("-o", "--out", default=None, metavar="STEM",
              help="Write STEM.json and STEM.md (folders created as needed).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: only when stderr is a terminal].")
@click.pass_context
def cli(ctx, checkpoint, data, test_data, test_fraction, quick, train_images, test_images, kmeans_patches,
        kmeans_sizes, ways, episodes, llm_episodes, C, max_iter, seed, device, batch_size, out, progress):
    """Measure CHECKPOINT (LQAE or VQ-VAE) against raw pixels, PCA and k-means patch tokens.

    CHECKPOINT is a checkpoint folder, a .safetensors file, or the name of a
    shipped one (fashion-mnist-small-28). Prints Markdown tables.
    """
    exit_with("lqae-eval", lambda: run(
        checkpoint, data=data, test_data=test_data, test_fraction=test_fraction, quick=quick, n_train=train_images,
        n_test=test_images, kmeans_patches=kmeans_patches, kmeans_sizes=kmeans_sizes or (1024, 4096),
        ways=ways or (2, 5), n_episodes=episodes, llm_episodes=llm_episodes, C=C, max_iter=max_iter,
        random_state=seed, device=device, batch_size=batch_size, out=out,
        progress=sys.stderr.isatty() if progress is None else progress, command=_command(ctx)))


def run(checkpoint, *, out, command, **options) -> int:
    """Evaluate, print the Markdown and write ``out``.json / .md; returns the exit status."""
    from lqae_sklearn._atomic import atomic_write_bytes
    from lqae_sklearn.evaluation import evaluate_checkpoint, evaluation_markdown
    from lqae_sklearn.evaluation._data import InputError

    paths = _output_paths(out) if out is not None else None  # checked before the long run, not after it
    try:
        result = evaluate_checkpoint(checkpoint, **options)
    except InputError as exc:
        raise UsageProblem(str(exc)) from exc
    result["command"] = command
    markdown = evaluation_markdown(result)
    if paths is not None:
        atomic_write_bytes(paths[0], (json.dumps(result, indent=1) + "\n").encode())
        atomic_write_bytes(paths[1], markdown.encode())
    click.echo(markdown)
    return EXIT_OK


def _output_paths(stem: str) -> tuple[Path, Path]:
    """STEM.json and STEM.md (suffixes appended, so a stem with dots keeps them), their folder created."""
    if not stem or stem.endswith(("/", os.sep)) or os.path.isdir(stem):
        raise UsageProblem(f"--out {stem!r} must be a file stem such as results/eval (it writes STEM.json and "
                           f"STEM.md), not a folder")
    paths = (Path(stem + ".json"), Path(stem + ".md"))
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageProblem(f"--out {stem!r}: cannot create its folder: {exc}") from exc
    for path in paths:
        if path.is_dir():
            raise UsageProblem(f"--out {stem!r}: {str(path)!r} is a folder")
    if not os.access(paths[0].parent, os.W_OK):
        raise UsageProblem(f"--out {stem!r}: the folder {str(paths[0].parent)!r} is not writable")
    return paths


def _command(ctx) -> str:
    """The command line, canonical: the checkpoint, then every option that differs from its default."""
    words = ["lqae-eval", ctx.params["checkpoint"]]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name == "progress":
            continue
        value, default = ctx.params[param.name], param.get_default(ctx)
        if param.multiple:
            for item in value:
                words += [param.opts[-1], str(item)]
        elif param.is_flag:
            if value:
                words.append(param.opts[-1])
        elif value != default:
            words += [param.opts[-1], str(value)]
    return shlex.join(words)


def main(argv=None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="lqae-eval")


if __name__ == "__main__":
    main()

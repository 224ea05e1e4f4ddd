"""``lqae-encode``: turn a folder of images into language tokens, one JSON line or Parquet row per image.

The click front end of :class:`lqae_sklearn.encoding._run.EncodeRun`: it parses the
command line and turns the run's :class:`EncodeError` into click's usage errors.
"""

from __future__ import annotations

import os
import sys

import click

from lqae_sklearn.encoding import EncodeError
from lqae_sklearn.encoding._run import ENGINES, EXIT_INTERRUPTED, FORMATS, OUTPUT_CHOICES, EncodeOptions, EncodeRun

EPILOG = """\b
Records (one JSON object per line of OUT.jsonl):
  {"path": "images/sneaker/00012.png", "label": "sneaker",
   "ids": [2318, 1012, ...], "text": "##ria lang ...", "embeddings": [...]}
  "label" only with --labels-from-dirs, "embeddings" only with
  --output ids,text,embeddings. A file name that is not valid UTF-8 gets
  U+FFFD in "path" and its exact bytes in "path_bytes_b64".

\b
Tokens per image (--token-grid): one grid for every field of a record, so
"ids" and "text" are the same tokens. auto (the default) follows
LQAETokenizer's rule: with text in the record, the grid the checkpoint
recommends for text (3 x 3 = 9 tokens for the packaged one), exactly what
LQAETokenizer(output="text") writes; without text (-o ids, -o embeddings),
one token per patch (7 x 7 = 49), as LQAETokenizer(output="ids") does.
--token-grid 7 gives the packaged checkpoint's 49 tokens with text too.

\b
Errors: a file that cannot be decoded (not an image, truncated, unreadable,
over the decompression-bomb limit, a FIFO, a symlink loop, ...) never stops
the run: it gets a record {"path": ..., "reason": ...} in OUT.errors.jsonl
(next to OUT, ".jsonl" replaced) and is counted in the summary on stderr.
Failed files are retried on every run. A folder named like an image
("x.png/") is walked like any folder; a folder among stdin paths is an error.

\b
Resume: rerunning the same command after a crash, a kill or Ctrl-C skips the
images already in OUT (a torn last line is cut off first), so OUT ends up
holding every image exactly once. --overwrite starts afresh. The settings of
the first run are kept in OUT.meta.json; resuming with a different
checkpoint or outputs is refused. Records are appended a batch at a time,
complete lines only; a line without its final newline is still being
written (or was torn by a kill) and readers should ignore it.

\b
Parquet (--format parquet, or OUT a folder such as out/ or x.parquet): OUT/
holds part-RRRRR-SSSSSS.parquet files with the same columns (ids and
embeddings as fixed-size int32/float32 lists, path_bytes_b64 null for UTF-8
names), _meta.json, _errors.jsonl and _manifest.json. Each part is written
whole into the run's staging folder OUT/_runs/RRRRR/, then committed by
this process alone (a rename into OUT/), so readers (pandas.read_parquet(
"OUT/"), pyarrow, or any reader of OUT/part-*.parquet) see complete parts
only, and a resumed run redoes at most the parts not yet committed.
A second lqae-encode run on the same OUT is refused while one is running.

\b
Ray (--engine ray [--ray-address ADDR]): CPU tasks decode parts of
--part-size images, an actor pool (one GPU per actor where there are GPUs)
encodes them and stages each part; the driver commits it. A worker that
dies is retried by Ray and stages the same part again; a killed driver is
resumed by rerunning, and its workers' late parts are never committed.

\b
Sharding: --shard I/N keeps the files whose path (relative to the folder
given, or as given for files and stdin paths) hashes to I modulo N. The N
shards are disjoint, together cover the corpus, and adding files does not
move others between shards. Run each shard to its own OUT and concatenate.

\b
Exit status:
  0    every image encoded
  1    some inputs failed (see OUT.errors.jsonl and stderr)
  2    usage error (bad option, missing input, unusable checkpoint)
  130  interrupted by Ctrl-C (complete records kept; rerun to resume)
  143  terminated by SIGTERM (same)

\b
Examples:
  lqae-encode photos/ photos.jsonl
  lqae-encode --labels-from-dirs examples/fashion-mnist/ - | head -1
  find data -name '*.png' -print0 | lqae-encode -0 - data.jsonl
  lqae-encode --shard 0/4 corpus/ part-0.jsonl   # and 1/4, 2/4, 3/4
  lqae-encode photos/ photos.parquet/
  lqae-encode --engine ray --ray-address auto corpus/ tokens/
"""


class TokenGrid(click.ParamType):
    """``auto`` or a whole number of at least 1."""

    name = "auto|G"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            grid = int(value)
        except ValueError:
            self.fail(f"expected auto or a whole number such as 3, got {value!r}", param, ctx)
        if grid < 1:
            self.fail(f"expected auto or a whole number of at least 1, got {value!r}", param, ctx)
        return grid


def _default_workers() -> int:
    return min(4, max(1, (os.cpu_count() or 1) - 1))


def _parse_outputs(ctx, param, values):
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not names:
        return ("ids", "text")
    bad = [n for n in names if n not in OUTPUT_CHOICES]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)} not among {', '.join(OUTPUT_CHOICES)}")
    return tuple(dict.fromkeys(names))


def _parse_shard(ctx, param, value):
    if value is None:
        return (0, 1)
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N such as 0/4, got {value!r}") from None
    if count < 1 or not 0 <= index < count:
        raise click.BadParameter(f"need 0 <= I < N, got {value!r}")
    return (index, count)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.argument("images", nargs=-1, required=True, metavar="IMAGES...")
@click.argument("out", metavar="OUT")
@click.option("-c", "--checkpoint", default=None, metavar="PATH",
              help="Checkpoint folder or .safetensors file [default: the packaged Fashion-MNIST model].")
@click.option("-o", "--output", "outputs", multiple=True, callback=_parse_outputs, metavar="LIST",
              help="What each record holds, comma-separated from ids, text, embeddings [default: ids,text].")
@click.option("--layers", default=None, metavar="LIST",
              help="Layers whose features make the embeddings: names such as encoder.4, lm.0 ... lm.6, or one of "
                   "all, encoder, lm, last, default [default: default].")
@click.option("--token-grid", type=TokenGrid(), default="auto", show_default=True, metavar="auto|G",
              help="G x G tokens per image for every field; auto: the checkpoint's grid for text (3 for the "
                   "packaged one) when the records hold text, as LQAETokenizer(output=\"text\") writes, else "
                   "one token per patch (7 for the packaged one); see Tokens per image below.")
@click.option("--labels-from-dirs", is_flag=True, help="Add \"label\": the name of the folder holding each image.")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per model call (and per write to OUT).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps, ...")
@click.option("-j", "--workers", type=click.IntRange(min=0), default=_default_workers, show_default="CPUs - 1, at most 4",
              help="Processes decoding images in parallel; 0 decodes in the main process.")
@click.option("--shard", callback=_parse_shard, metavar="I/N",
              help="Encode only shard I of N (0-based), for splitting a corpus between processes or machines.")
@click.option("--overwrite", is_flag=True, help="Start afresh instead of resuming an existing OUT.")
@click.option("--ext", "extensions", multiple=True, metavar="EXT",
              help="Walk only files with this extension (repeatable, e.g. --ext png --ext jpg) [default: every file].")
@click.option("-0", "--null", "null_separated", is_flag=True,
              help="Paths on stdin are NUL-separated (find -print0) instead of one per line.")
@click.option("--errors", "errors_file", default=None, metavar="PATH",
              help="Where error records go [default: OUT.errors.jsonl; with OUT '-', stderr].")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar with images/s [default: only when stderr is a terminal].")
@click.option("--format", "output_format", type=click.Choice(FORMATS), default=None,
              help="jsonl: one file; parquet: a folder of parts [default: parquet if OUT is a folder, ends in / "
                   "or .parquet, else jsonl].")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: this machine; ray: a Ray cluster (Parquet output only).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="Ray cluster to join, e.g. auto or 10.0.0.1:6379 [default: start a local one].")
@click.option("--actors", type=click.IntRange(min=1), default=None, metavar="N",
              help="Ray encoder actors [default: one per GPU, or half the CPUs without GPUs].")
@click.option("--part-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Images per Parquet part file.")
def cli(images, out, checkpoint, outputs, layers, token_grid, labels_from_dirs, batch_size, device, workers, shard,
        overwrite, extensions, null_separated, errors_file, progress, output_format, engine, ray_address, actors,
        part_size):
    """Encode images into language-model tokens, one JSON line or Parquet row per image.

    IMAGES are folders (walked recursively, in sorted order), image files, or
    '-' to read paths from stdin, one per line. OUT is a .jsonl file, '-' for
    stdout (no resume), or a folder for Parquet parts. Rerun the same command
    to resume.
    """
    run = EncodeRun(EncodeOptions(
        images=images, out=out, checkpoint=checkpoint, outputs=outputs, layers=layers, token_grid=token_grid,
        labels_from_dirs=labels_from_dirs, batch_size=batch_size, device=device, workers=workers,
        shard=shard, overwrite=overwrite, extensions=extensions, null_separated=null_separated,
        errors_file=errors_file, progress=progress, format=output_format, engine=engine, part_size=part_size,
        ray_address=ray_address, actors=actors,
    ), echo=lambda message: click.echo(message, err=True))
    try:
        code = run.main()
    except EncodeError as exc:
        if exc.param:
            raise click.BadParameter(str(exc), param_hint=exc.param) from exc
        raise click.UsageError(str(exc)) from exc
    except KeyboardInterrupt:  # Ctrl-C while reading inputs or the checkpoint: nothing was written
        click.echo("lqae-encode: interrupted by Ctrl-C before encoding started", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)


def main(argv=None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="lqae-encode")


if __name__ == "__main__":
    main()

"""``lqae-encode``: turn a folder of images into language tokens, one JSON line per image."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from lqae_sklearn._atomic import atomic_write_bytes
from lqae_sklearn.model import DEFAULT_CHECKPOINT, CheckpointError, read_checkpoint_config

from ._decode import DecodePipeline
from ._discovery import discover, in_shard, label_of, path_fields, read_stdin_paths, record_key
from ._jsonl import CorruptJsonlError, JsonlAppender, dumps_lines, iter_records, repair_torn_tail

OUTPUT_CHOICES = ("ids", "text", "embeddings")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

EPILOG = """\b
Records (one JSON object per line of OUT.jsonl):
  {"path": "images/sneaker/00012.png", "label": "sneaker",
   "ids": [2318, 1012, ...], "text": "##ria lang ...", "embeddings": [...]}
  "label" only with --labels-from-dirs, "embeddings" only with
  --output ids,text,embeddings. A file name that is not valid UTF-8 gets
  U+FFFD in "path" and its exact bytes in "path_bytes_b64".

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
"""


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


def sidecar_path(out: str, suffix: str) -> str:
    """``out.jsonl`` -> ``out<suffix>`` (``out.errors.jsonl``); other names get the suffix appended."""
    return (out[: -len(".jsonl")] if out.endswith(".jsonl") else out) + suffix


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.argument("images", nargs=-1, required=True, metavar="IMAGES...")
@click.argument("out", metavar="OUT.jsonl")
@click.option("-c", "--checkpoint", default=None, metavar="PATH",
              help="Checkpoint folder or .safetensors file [default: the packaged Fashion-MNIST model].")
@click.option("-o", "--output", "outputs", multiple=True, callback=_parse_outputs, metavar="LIST",
              help="What each record holds, comma-separated from ids, text, embeddings [default: ids,text].")
@click.option("--layers", default=None, metavar="LIST",
              help="Layers whose features make the embeddings: names such as encoder.4, lm.0 ... lm.6, or one of "
                   "all, encoder, lm, last, default [default: default].")
@click.option("--token-grid", type=click.IntRange(min=1), default=None, metavar="G",
              help="G x G coarser tokens per image, e.g. 3 for short LLM prompts [default: one per patch].")
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
def cli(images, out, checkpoint, outputs, layers, token_grid, labels_from_dirs, batch_size, device, workers, shard,
        overwrite, extensions, null_separated, errors_file, progress):
    """Encode images into language-model tokens, one JSON line per image.

    IMAGES are folders (walked recursively, in sorted order), image files, or
    '-' to read paths from stdin, one per line. OUT.jsonl is the output file,
    or '-' for stdout (no resume). Rerun the same command to resume.
    """
    run = EncodeRun(EncodeOptions(
        images=images, out=out, checkpoint=checkpoint, outputs=outputs, layers=layers, token_grid=token_grid,
        labels_from_dirs=labels_from_dirs, batch_size=batch_size, device=device, workers=workers,
        shard=shard, overwrite=overwrite, extensions=extensions, null_separated=null_separated,
        errors_file=errors_file, progress=progress,
    ))
    try:
        code = run.main()
    except KeyboardInterrupt:  # Ctrl-C while reading inputs or the checkpoint: nothing was written
        click.echo("lqae-encode: interrupted by Ctrl-C before encoding started", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)


@dataclass(frozen=True)
class EncodeOptions:
    """What one ``lqae-encode`` command line asks for (see the command's help for each)."""

    images: tuple
    out: str
    checkpoint: str | None = None
    outputs: tuple = ("ids", "text")
    layers: str | None = None
    token_grid: int | None = None
    labels_from_dirs: bool = False
    batch_size: int = 64
    device: str = "auto"
    workers: int = 0
    shard: tuple = (0, 1)
    overwrite: bool = False
    extensions: tuple = ()
    null_separated: bool = False
    errors_file: str | None = None
    progress: bool | None = None


class EncodeRun:
    """One invocation of ``lqae-encode``: validation, resume state, the encode loop, the summary."""

    def __init__(self, options: EncodeOptions):
        self.opts = options
        self.stop_signal = None

    # -- setup ---------------------------------------------------------------------------------
    def main(self) -> int:
        self._validate()
        self._open_state()
        found = discover(
            [p for p in self.opts.images if p != "-"],
            stdin_paths=(read_stdin_paths(sys.stdin.buffer, self.opts.null_separated)
                         if "-" in self.opts.images else None),
            extensions={e.lower().lstrip(".") for e in self.opts.extensions} or None,
            exclude=self._own_files(),
        )
        index, count = self.opts.shard
        items = [item for item in found.items if in_shard(item, index, count)]
        discovery_errors = [(item, reason) for item, reason in found.errors if in_shard(item, index, count)]
        # Only needed to keep old error records of files not retried before an interruption.
        self.scope = {item.key for item in items} | {i.key for i, _ in discovery_errors} if self.old_errors else set()
        pending = [item for item in items if item.key not in self.done]
        self.counts = {"encoded": 0, "failed": 0, "already": len(items) - len(pending)}
        self._record_errors([(item.path, reason) for item, reason in discovery_errors])
        try:
            if pending:
                self._encode(pending)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop started
            self.stop_signal = signal.SIGINT
        finally:
            self._finish_errors()
        return self._summary()

    def _validate(self) -> None:
        if self.opts.images.count("-") > 1:
            raise click.UsageError("'-' (paths from stdin) can be given only once")
        for path in self.opts.images:
            if path != "-" and not os.path.lexists(path):
                raise click.BadParameter(f"{path!r} does not exist", param_hint="IMAGES")
        self.checkpoint = os.fspath(self.opts.checkpoint or DEFAULT_CHECKPOINT)
        if not os.path.exists(self.checkpoint):
            hint = "" if self.checkpoint != os.fspath(DEFAULT_CHECKPOINT) else (
                " (the packaged checkpoint is not installed; pass --checkpoint PATH)")
            raise click.BadParameter(f"{self.checkpoint!r} does not exist{hint}", param_hint="--checkpoint")
        try:
            config = read_checkpoint_config(self.checkpoint)
        except (CheckpointError, OSError) as exc:
            raise click.BadParameter(str(exc), param_hint="--checkpoint") from exc
        self.preprocessing = config["preprocessing"]
        self.settings = {
            "checkpoint_weights_sha256": config.get("weights_sha256"),
            "outputs": list(self.opts.outputs),
            "layers": self.opts.layers,
            "token_grid": self.opts.token_grid,
            "labels_from_dirs": self.opts.labels_from_dirs,
            "shard": f"{self.opts.shard[0]}/{self.opts.shard[1]}",
        }
        if self.opts.layers and "embeddings" not in self.opts.outputs:
            raise click.BadParameter("--layers only matters with --output ...,embeddings", param_hint="--layers")

    def _open_state(self) -> None:
        """Prepare OUT (resume or start afresh), its error file and its settings file."""
        self.to_stdout = self.opts.out == "-"
        self.done: set[bytes] = set()
        self.old_errors: dict[bytes, dict] = {}
        self.new_errors: dict[bytes, dict] = {}
        if self.to_stdout:
            self.errors_path = self.opts.errors_file
            self.meta_path = None
            if self.errors_path and os.path.exists(self.errors_path):
                os.unlink(self.errors_path)  # stdout runs cannot resume, so neither do their errors
            return
        self.errors_path = self.opts.errors_file or sidecar_path(self.opts.out, ".errors.jsonl")
        self.meta_path = sidecar_path(self.opts.out, ".meta.json")
        if os.path.isdir(self.opts.out):
            raise click.BadParameter(f"{self.opts.out!r} is a folder", param_hint="OUT.jsonl")
        Path(self.opts.out).parent.mkdir(parents=True, exist_ok=True)
        resuming = not self.opts.overwrite and os.path.exists(self.opts.out) and os.path.getsize(self.opts.out) > 0
        if resuming:
            self._check_settings()
            repair_torn_tail(self.opts.out)
            self.done = self._read_keys(self.opts.out)
            if os.path.exists(self.errors_path):
                repair_torn_tail(self.errors_path)
                for _, record in self._iter(self.errors_path):
                    self.old_errors[record_key(record)] = record
        else:
            for path in (self.opts.out, self.errors_path):
                if os.path.exists(path):
                    os.unlink(path)
        atomic_write_bytes(self.meta_path, (json.dumps(self.settings, indent=2) + "\n").encode())
        open(self.opts.out, "ab").close()

    def _check_settings(self) -> None:
        if not os.path.exists(self.meta_path):
            return
        try:
            previous = json.loads(Path(self.meta_path).read_text())
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"cannot read {self.meta_path} ({exc}); use --overwrite to start afresh") from exc
        changed = sorted(k for k in self.settings if previous.get(k) != self.settings[k])
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} then, {self.settings[k]!r} now" for k in changed)
            raise click.UsageError(
                f"{self.opts.out} was started with other settings ({details}); rerun with the same options "
                f"to resume, or add --overwrite to start afresh"
            )

    def _iter(self, path):
        try:
            yield from iter_records(path)
        except CorruptJsonlError as exc:
            raise click.UsageError(f"cannot resume: {exc}; use --overwrite to start afresh") from exc

    def _read_keys(self, path) -> set[bytes]:
        keys = set()
        for number, record in self._iter(path):
            try:
                keys.add(record_key(record))
            except (KeyError, TypeError, ValueError) as exc:
                raise click.UsageError(f"cannot resume: {path}, line {number} has no usable \"path\"") from exc
        return keys

    def _own_files(self):
        ids = set()
        for path in (None if self.to_stdout else self.opts.out, self.errors_path, self.meta_path):
            if path and os.path.exists(path):
                st = os.stat(path)
                ids.add((st.st_dev, st.st_ino))
        return ids

    # -- the encode loop -----------------------------------------------------------------------
    def _encode(self, pending) -> None:
        batches = (pending[i : i + self.opts.batch_size] for i in range(0, len(pending), self.opts.batch_size))
        # Decode while the model loads.
        pipeline = DecodePipeline(batches, self.preprocessing, self.opts.workers).start()
        try:
            writer = JsonlAppender(stream=sys.stdout.buffer) if self.to_stdout else JsonlAppender(path=self.opts.out)
            show = sys.stderr.isatty() if self.opts.progress is None else self.opts.progress
            from tqdm import tqdm

            bar = tqdm(total=len(pending), unit="img", disable=not show, file=sys.stderr, smoothing=0.1)
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                for batch, results in pipeline:
                    self._encode_batch(writer, batch, results)
                    bar.update(len(batch))
                    if self.stop_signal is not None:
                        break
            except BrokenPipeError:  # `lqae-encode ... - | head`: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                self.stop_signal = signal.SIGPIPE
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
                bar.close()
                writer.close()
        finally:
            pipeline.close()

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now; a torn line is repaired on resume
        self.stop_signal = signum

    def _tokenizer(self):
        """The model, loaded on first use: a rerun that only retries bad files never loads it."""
        if getattr(self, "_loaded_tokenizer", None) is None:
            self._loaded_tokenizer = self._load_tokenizer()
        return self._loaded_tokenizer

    def _load_tokenizer(self):
        from lqae_sklearn._tokenizer import LQAETokenizer

        params = {"checkpoint": self.checkpoint, "batch_size": self.opts.batch_size, "device": self.opts.device,
                  "token_grid": self.opts.token_grid}
        if self.opts.layers:
            names = [name.strip() for name in self.opts.layers.split(",") if name.strip()]
            params["layers"] = names[0] if len(names) == 1 else names  # one name may be a shortcut ("all")
        try:
            return LQAETokenizer(**params).fit()
        except (CheckpointError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--checkpoint/--layers/--token-grid/--device") from exc

    def _encode_batch(self, writer, batch, results) -> None:
        good = [(item, array) for item, (array, _) in zip(batch, results) if array is not None]
        records = []
        if good:
            encoded = self._tokenizer().encode(np.stack([array for _, array in good]), outputs=self.opts.outputs)
            for row, (item, _) in enumerate(good):
                record = path_fields(item.path)
                if self.opts.labels_from_dirs:
                    record["label"] = label_of(item.path)
                for name in self.opts.outputs:
                    value = encoded[name][row]
                    record[name] = value if isinstance(value, str) else value.tolist()
                records.append(record)
        writer.append(records)
        for item, _ in good:
            self.new_errors.pop(item.key, None)
            self.old_errors.pop(item.key, None)
        self.counts["encoded"] += len(good)
        self._record_errors([(item.path, reason) for item, (array, reason) in zip(batch, results) if array is None])

    # -- errors and summary --------------------------------------------------------------------
    def _record_errors(self, failures) -> None:
        """Count and write error records, one append per batch."""
        fresh = []
        for path, reason in failures:
            record = {**path_fields(path), "reason": reason}
            key = os.fsencode(path)
            self.counts["failed"] += 1
            self.new_errors[key] = record
            if self.errors_path is None:
                click.echo(f"lqae-encode: error: {record['path']}: {reason}", err=True)
            elif self.old_errors.get(key) != record:  # don't duplicate what an earlier run already wrote
                fresh.append(record)
        if fresh:
            with JsonlAppender(path=self.errors_path) as errors:
                errors.append(fresh)

    def _finish_errors(self) -> None:
        """Rewrite the error file to hold one record per still-failing path, or remove it."""
        if self.errors_path is None:
            return
        untried = {k: r for k, r in self.old_errors.items() if k in self.scope and k not in self.new_errors}
        if self.stop_signal is None:
            untried = {}  # a completed run retried every path in scope
        final = {**untried, **self.new_errors}
        self.final_errors = len(final)
        if final:
            atomic_write_bytes(self.errors_path, dumps_lines(final[k] for k in sorted(final)))
        elif os.path.exists(self.errors_path):
            os.unlink(self.errors_path)

    def _summary(self) -> int:
        c = self.counts
        failed_total = getattr(self, "final_errors", c["failed"])
        parts = [f"{c['encoded']} encoded"]
        if c["already"]:
            parts.append(f"{c['already']} already in {self.opts.out}")
        parts.append(f"{failed_total} failed")
        where = f" (see {self.errors_path})" if failed_total and self.errors_path else ""
        if self.stop_signal is not None:
            if self.stop_signal == signal.SIGPIPE:
                return EXIT_OK
            name = "Ctrl-C" if self.stop_signal == signal.SIGINT else "SIGTERM"
            click.echo(f"lqae-encode: interrupted by {name}: {', '.join(parts)}{where}; rerun to resume", err=True)
            return EXIT_INTERRUPTED if self.stop_signal == signal.SIGINT else EXIT_TERMINATED
        click.echo(f"lqae-encode: {', '.join(parts)}{where}", err=True)
        return EXIT_SOME_FAILED if failed_total else EXIT_OK


def main(argv=None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="lqae-encode")


if __name__ == "__main__":
    main()

"""One encoding run: validation, resume state, the engine's loop, error records, the summary.

:class:`EncodeRun` is what ``lqae-encode`` and :func:`encode_dataset` both execute.
The engine decides where images are decoded and encoded (this process and a pool of
decoder processes, or a Ray cluster); the output decides how rows are kept (a JSONL
file or a folder of Parquet parts). Everything else - which files, which are done,
which failed - is the same for all four combinations.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lqae_sklearn._atomic import atomic_write_bytes
from lqae_sklearn.model import DEFAULT_CHECKPOINT, CheckpointError, read_checkpoint_config

from ._decode import DecodePipeline
from ._discovery import discover, in_shard, path_fields, read_stdin_paths, record_key
from ._jsonl import CorruptJsonlError, JsonlAppender, dumps_lines, iter_records, repair_torn_tail
from ._outputs import JsonlOutput, OutputError, ParquetOutput, infer_format
from ._records import EncodedBatch

OUTPUT_CHOICES = ("ids", "text", "embeddings")
ENGINES = ("local", "ray")
FORMATS = ("jsonl", "parquet")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class EncodeError(ValueError):
    """An encoding request that cannot be carried out: a bad input, option, checkpoint or output.

    ``lqae-encode`` shows it as a usage error (exit status 2); from Python,
    :func:`~lqae_sklearn.encoding.encode_dataset` raises it. It is a
    :class:`ValueError`.

    Parameters
    ----------
    message : str
        What is wrong, naming the input.
    param : str, default=None
        The command-line option or argument at fault (``"--layers"``, ``"OUT"``),
        when there is one.

    Examples
    --------
    >>> from lqae_sklearn.encoding import EncodeError, encode_dataset
    >>> try:
    ...     encode_dataset("no/such/folder", "out.jsonl")
    ... except EncodeError as error:
    ...     print(error, "|", error.param)
    'no/such/folder' does not exist | IMAGES
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
    format: str | None = None  # None: inferred from OUT
    engine: str = "local"
    part_size: int = 4096
    ray_address: str | None = None
    actors: int | None = None  # None: one per GPU, or one on a cluster without GPUs


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class EncodeRun:
    """One invocation of ``lqae-encode``; :meth:`main` returns its exit status."""

    def __init__(self, options: EncodeOptions, echo=_echo):
        self.opts = options
        self.echo = echo
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
        self.failed([(item.path, reason) for item, reason in discovery_errors])
        try:
            if pending and self.opts.engine == "ray":
                from ._ray import encode_on_ray

                encode_on_ray(self, pending)
            elif pending:
                self._encode_local(pending)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop started
            self.stop_signal = signal.SIGINT
        finally:
            self._finish_errors()
            if self.output.format == "parquet":
                self.output.finish(complete=self.stop_signal is None)
        return self._summary()

    def _validate(self) -> None:
        opts = self.opts
        if opts.images.count("-") > 1:
            raise EncodeError("'-' (paths from stdin) can be given only once")
        for path in opts.images:
            if path != "-" and not os.path.lexists(path):
                raise EncodeError(f"{path!r} does not exist", "IMAGES")
        bad = [name for name in opts.outputs if name not in OUTPUT_CHOICES]
        if bad or not opts.outputs:
            raise EncodeError(f"{', '.join(bad) or 'nothing'} not among {', '.join(OUTPUT_CHOICES)}", "--output")
        if opts.engine not in ENGINES:
            raise EncodeError(f"{opts.engine!r} is not one of {', '.join(ENGINES)}", "--engine")
        self.format = opts.format or infer_format(opts.out)
        if self.format not in FORMATS:
            raise EncodeError(f"{self.format!r} is not one of {', '.join(FORMATS)}", "--format")
        if opts.engine == "ray" and self.format != "parquet":
            raise EncodeError(
                "the ray engine writes Parquet parts from its workers; give a folder as OUT (e.g. out/) "
                "or add --format parquet", "--engine")
        self.checkpoint = os.fspath(opts.checkpoint or DEFAULT_CHECKPOINT)
        if not os.path.exists(self.checkpoint):
            hint = "" if self.checkpoint != os.fspath(DEFAULT_CHECKPOINT) else (
                " (the packaged checkpoint is not installed; pass --checkpoint PATH)")
            raise EncodeError(f"{self.checkpoint!r} does not exist{hint}", "--checkpoint")
        try:
            config = read_checkpoint_config(self.checkpoint)
        except (CheckpointError, OSError) as exc:
            raise EncodeError(str(exc), "--checkpoint") from exc
        self.preprocessing = config["preprocessing"]
        self.settings = {
            "checkpoint_weights_sha256": config.get("weights_sha256"),
            "outputs": list(opts.outputs),
            "layers": opts.layers,
            "token_grid": opts.token_grid,
            "labels_from_dirs": opts.labels_from_dirs,
            "shard": f"{opts.shard[0]}/{opts.shard[1]}",
        }
        if opts.layers and "embeddings" not in opts.outputs:
            raise EncodeError("--layers only matters with --output ...,embeddings", "--layers")

    def _open_state(self) -> None:
        """Prepare OUT (resume or start afresh), its error file and its settings file."""
        self.done: set[bytes] = set()
        self.old_errors: dict[bytes, dict] = {}
        self.new_errors: dict[bytes, dict] = {}
        try:
            output_class = ParquetOutput if self.format == "parquet" else JsonlOutput
            self.output = output_class(self.opts.out, self.opts.errors_file)
            self.errors_path = self.output.errors_path
            self.meta_path = self.output.meta_path
            if self.meta_path is None:  # stdout: no resume, so no errors from an earlier run either
                if self.errors_path and os.path.exists(self.errors_path):
                    os.unlink(self.errors_path)
                return
            resuming = not self.opts.overwrite and self.output.has_rows()
            if not resuming:
                self.output.clear()
            self.output.prepare()
            if resuming:
                self._check_settings()
            self.output.claim()
            if resuming:
                self.done = self.output.done_keys()
                if os.path.exists(self.errors_path):
                    repair_torn_tail(self.errors_path)
                    for _, record in iter_records(self.errors_path):
                        self.old_errors[record_key(record)] = record
        except (OutputError, CorruptJsonlError) as exc:
            raise EncodeError(f"cannot use {self.opts.out}: {exc}; use --overwrite to start afresh", "OUT") from exc
        atomic_write_bytes(self.meta_path, (json.dumps(self.settings, indent=2) + "\n").encode())
        self.output.created()

    def _check_settings(self) -> None:
        if not os.path.exists(self.meta_path):
            return
        try:
            previous = json.loads(Path(self.meta_path).read_text())
        except (OSError, ValueError) as exc:
            raise EncodeError(f"cannot read {self.meta_path} ({exc}); use --overwrite to start afresh") from exc
        changed = sorted(k for k in self.settings if previous.get(k) != self.settings[k])
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} then, {self.settings[k]!r} now" for k in changed)
            raise EncodeError(
                f"{self.opts.out} was started with other settings ({details}); rerun with the same options "
                f"to resume, or add --overwrite to start afresh"
            )

    def _own_files(self):
        ids = set()
        for path in self.output.own_files():
            if path and os.path.exists(path):
                st = os.stat(path)
                ids.add((st.st_dev, st.st_ino))
        return ids

    # -- the local engine ----------------------------------------------------------------------
    def _encode_local(self, pending) -> None:
        batches = (pending[i : i + self.opts.batch_size] for i in range(0, len(pending), self.opts.batch_size))
        # Decode while the model loads.
        pipeline = DecodePipeline(batches, self.preprocessing, self.opts.workers).start()
        try:
            writer = self.output.writer(self.opts.part_size)
            bar = self.progress_bar(len(pending))
            previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
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

    def progress_bar(self, total: int):
        from tqdm import tqdm

        show = sys.stderr.isatty() if self.opts.progress is None else self.opts.progress
        return tqdm(total=total, unit="img", disable=not show, file=sys.stderr, smoothing=0.1)

    def on_signal(self, signum, frame) -> None:
        """The SIGINT/SIGTERM handler every engine installs: stop after the batch or part in hand."""
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now; a torn line is repaired on resume
        self.stop_signal = signum

    def tokenizer_params(self) -> dict:
        """``LQAETokenizer`` parameters for this run's options (every engine builds the same one)."""
        params = {"checkpoint": self.checkpoint, "batch_size": self.opts.batch_size, "device": self.opts.device,
                  "token_grid": self.opts.token_grid}
        if self.opts.layers:
            names = [name.strip() for name in self.opts.layers.split(",") if name.strip()]
            params["layers"] = names[0] if len(names) == 1 else names  # one name may be a shortcut ("all")
        return params

    def _tokenizer(self):
        """The model, loaded on first use: a rerun that only retries bad files never loads it."""
        if getattr(self, "_loaded_tokenizer", None) is None:
            self._loaded_tokenizer = load_tokenizer(self.tokenizer_params())
        return self._loaded_tokenizer

    def _encode_batch(self, writer, batch, results) -> None:
        good = [(item, array) for item, (array, _) in zip(batch, results) if array is not None]
        encoded = {}
        if good:
            encoded = self._tokenizer().encode(np.stack([array for _, array in good]), outputs=self.opts.outputs)
        writer.append(EncodedBatch([item.path for item, _ in good], encoded, self.opts.labels_from_dirs))
        self.encoded([item.key for item, _ in good])
        self.failed([(item.path, reason) for item, (array, reason) in zip(batch, results) if array is None])

    # -- bookkeeping every engine reports to -----------------------------------------------------
    def encoded(self, keys) -> None:
        """``keys`` (path bytes) are now in OUT: they are no longer failures."""
        for key in keys:
            self.new_errors.pop(key, None)
            self.old_errors.pop(key, None)
        self.counts["encoded"] += len(keys)

    def failed(self, failures) -> None:
        """``(path, reason)`` pairs that could not be encoded: counted, and written as error records in one
        append."""
        fresh = []
        for path, reason in failures:
            record = {**path_fields(path), "reason": reason}
            key = os.fsencode(path)
            self.counts["failed"] += 1
            self.new_errors[key] = record
            if self.errors_path is None:
                self.echo(f"lqae-encode: error: {record['path']}: {reason}")
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

    def summary(self) -> dict:
        """Counts of this run: ``encoded``, ``already`` (in OUT before it), ``failed``, and ``interrupted``."""
        return {"encoded": self.counts["encoded"], "already": self.counts["already"],
                "failed": getattr(self, "final_errors", self.counts["failed"]),
                "interrupted": self.stop_signal not in (None, signal.SIGPIPE)}

    def _summary(self) -> int:
        c = self.summary()
        parts = [f"{c['encoded']} encoded"]
        if c["already"]:
            parts.append(f"{c['already']} already in {self.opts.out}")
        parts.append(f"{c['failed']} failed")
        where = f" (see {self.errors_path})" if c["failed"] and self.errors_path else ""
        if self.stop_signal is not None:
            if self.stop_signal == signal.SIGPIPE:
                return EXIT_OK
            name = "Ctrl-C" if self.stop_signal == signal.SIGINT else "SIGTERM"
            self.echo(f"lqae-encode: interrupted by {name}: {', '.join(parts)}{where}; rerun to resume")
            return EXIT_INTERRUPTED if self.stop_signal == signal.SIGINT else EXIT_TERMINATED
        self.echo(f"lqae-encode: {', '.join(parts)}{where}")
        return EXIT_SOME_FAILED if c["failed"] else EXIT_OK


def load_tokenizer(params: dict):
    """A fitted ``LQAETokenizer``; a parameter it refuses becomes an :class:`EncodeError`."""
    from lqae_sklearn._tokenizer import LQAETokenizer

    try:
        return LQAETokenizer(**params).fit()
    except (CheckpointError, ValueError) as exc:
        raise EncodeError(str(exc), "--checkpoint/--layers/--token-grid/--device") from exc

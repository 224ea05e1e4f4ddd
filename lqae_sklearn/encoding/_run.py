"""One encoding run, in five phases that read top to bottom: plan, claim, encode, commit, finish.

:class:`EncodeRun` is what ``lqae-encode`` and :func:`encode_dataset` both execute.

1. **plan**: check the options, read the checkpoint's config, fix the run's settings
   (the token grid resolved) and the tokenizer every engine builds;
2. **claim**: open OUT and take its lock, start afresh or check the settings of the
   run being resumed, take a run number, read which images are done and which
   files failed before, and find the images still to encode;
3. **encode**: an engine decodes and encodes them - this process and a pool of
   decoder processes (:mod:`._local`), or a Ray cluster (:mod:`._ray`) - and hands
   back rows, or parts its workers staged;
4. **commit**: this process alone makes them visible in OUT (a JSONL append, or a
   Parquet rename after the run fence) and notes errors and progress;
5. **finish**: the errors file, the output's manifest, the summary.

The output decides how rows are kept (:mod:`._outputs`, :mod:`._parquet`);
everything else is the same for the four combinations of engine and format.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from lqae_sklearn._atomic import atomic_write_bytes
from lqae_sklearn.model import DEFAULT_CHECKPOINT, CheckpointError, read_checkpoint_config

from ._discovery import discover, in_shard, read_stdin_paths
from ._encoder import resolve_token_grid, tokenizer_params
from ._error_records import ErrorRecords
from ._errors import EncodeError
from ._jsonl import CorruptJsonlError
from ._local import encode_locally
from ._outputs import JsonlOutput, OutputError, OutputFenced, OutputInUse, infer_format
from ._parquet import ParquetOutput

OUTPUT_CHOICES = ("ids", "text", "embeddings")
ENGINES = ("local", "ray")
FORMATS = ("jsonl", "parquet")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


@dataclass(frozen=True)
class EncodeOptions:
    """What one ``lqae-encode`` command line asks for (see the command's help for each)."""

    images: tuple
    out: str
    checkpoint: str | None = None
    outputs: tuple = ("ids", "text")
    layers: str | None = None
    token_grid: int | str | None = "auto"  # "auto": LQAETokenizer's rule for the record's tokens; None: per patch
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
    actors: int | None = None  # None: one per GPU, or half the CPUs on a cluster without GPUs


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class EncodeRun:
    """One invocation of ``lqae-encode``; :meth:`main` returns its exit status."""

    def __init__(self, options: EncodeOptions, echo=_echo):
        self.opts = options
        self.echo = echo
        self.stop_signal = None
        self.complete = False  # every pending image committed
        self.fenced = None  # the OutputFenced that stopped this run, if a newer run took OUT over
        self.counts = {"encoded": 0, "already": 0}

    def main(self) -> int:
        self._plan()
        self.output = self._open_output()
        try:
            self._claim()
            pending = self._pending()
            try:
                self._encode_and_commit(pending)
            finally:
                if self.fenced is None:  # a superseded run leaves errors and manifest to the newer one
                    self._finish()
        except OutputFenced as exc:  # from the fence check before finishing
            self.fenced = exc
        finally:
            self.output.close()
        if self.fenced is not None:
            raise EncodeError(str(self.fenced), "OUT")
        return self._summary()

    # -- 1. plan ---------------------------------------------------------------------------------
    def _plan(self) -> None:
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
        if opts.layers and "embeddings" not in opts.outputs:
            raise EncodeError("--layers only matters with --output ...,embeddings", "--layers")
        grid = opts.token_grid
        if not (grid in ("auto", None) or (isinstance(grid, int) and not isinstance(grid, bool) and grid >= 1)):
            raise EncodeError(f"expected 'auto' or a whole number of at least 1, got {grid!r}", "--token-grid")
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
        self.patch_grid = config["model"]["image_size"] // config["model"]["patch_size"]
        token_grid = resolve_token_grid(config, grid, opts.outputs)
        self.tokenizer_params = tokenizer_params(self.checkpoint, opts.outputs, token_grid, opts.layers,
                                                 opts.batch_size, opts.device)
        self.settings = {
            "checkpoint_weights_sha256": config.get("weights_sha256"),
            "outputs": list(opts.outputs),
            "layers": opts.layers,
            "token_grid": token_grid,
            "labels_from_dirs": opts.labels_from_dirs,
            "shard": f"{opts.shard[0]}/{opts.shard[1]}",
        }

    def _open_output(self):
        try:
            if self.format == "parquet":
                return ParquetOutput(self.opts.out, self.opts.errors_file, self.opts.part_size)
            return JsonlOutput(self.opts.out, self.opts.errors_file)
        except OutputError as exc:
            raise EncodeError(f"cannot use {self.opts.out}: {exc}", "OUT") from exc

    # -- 2. claim --------------------------------------------------------------------------------
    def _claim(self) -> None:
        """Take OUT (its lock, then a run number), resume it or start afresh, and read what is done."""
        output = self.output
        self.errors = ErrorRecords(output.errors_path, self.echo)
        self.done: set[bytes] = set()
        try:
            output.open()
            if output.meta_path is None:  # stdout: no resume, so no errors of an earlier run either
                if output.errors_path and os.path.exists(output.errors_path):
                    os.unlink(output.errors_path)
                output.claim()
                return
            resuming = not self.opts.overwrite and output.has_rows()
            if resuming:
                self._check_settings()
            else:
                output.clear()
            output.claim()
            if resuming:
                self.done = output.done_keys()
                self.errors.read_earlier()
        except OutputInUse as exc:
            raise EncodeError(str(exc), "OUT") from exc
        except (OutputError, CorruptJsonlError) as exc:
            raise EncodeError(f"cannot use {self.opts.out}: {exc}; use --overwrite to start afresh", "OUT") from exc
        except OSError as exc:  # a folder or file this user may not write, a full disk
            raise EncodeError(f"cannot write {self.opts.out}: {exc}", "OUT") from exc
        atomic_write_bytes(output.meta_path, (json.dumps(self.settings, indent=2) + "\n").encode())
        output.created()

    def _check_settings(self) -> None:
        meta_path = self.output.meta_path
        if not os.path.exists(meta_path):
            return
        try:
            previous = json.loads(Path(meta_path).read_text())
        except (OSError, ValueError) as exc:
            raise EncodeError(f"cannot read {meta_path} ({exc}); use --overwrite to start afresh") from exc
        if previous.get("token_grid", 0) is None:  # written before the grid was resolved: one token per patch
            previous["token_grid"] = self.patch_grid
        changed = sorted(k for k in self.settings if previous.get(k) != self.settings[k])
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} then, {self.settings[k]!r} now" for k in changed)
            raise EncodeError(
                f"{self.opts.out} was started with other settings ({details}); rerun with the same options "
                f"to resume, or add --overwrite to start afresh"
            )

    def _pending(self) -> list:
        """The images of this run's shard not yet in OUT; discovery errors become error records."""
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
        self.scope = {item.key for item in items} | {i.key for i, _ in discovery_errors} if self.errors.old else set()
        pending = [item for item in items if item.key not in self.done]
        self.counts["already"] = len(items) - len(pending)
        self.errors.failed([(item.path, reason) for item, reason in discovery_errors])
        return pending

    def _own_files(self):
        ids = set()
        for path in self.output.own_files():
            if path and os.path.exists(path):
                st = os.stat(path)
                ids.add((st.st_dev, st.st_ino))
        return ids

    # -- 3. encode and 4. commit -----------------------------------------------------------------
    def _encode_and_commit(self, pending) -> None:
        """Run the engine over ``pending`` and commit what it hands back, until done or asked to stop."""
        if not pending:
            self.complete = True
            return
        engine = self._engine(pending)  # before the signal handlers: ray.init installs its own
        bar = self._progress_bar(len(pending))
        try:
            with self._signals_stop_the_loop():
                try:
                    for part in engine:
                        self._commit(self.output.commit(part), part.failures)
                        bar.update(len(part.keys) + len(part.failures))
                        if self.stop_signal is not None:
                            break
                finally:
                    engine.close()  # stops the decoder pool, or the cluster's work
                self._commit(self.output.flush(), [])  # the rows held back for a whole part
            self.complete = self.stop_signal is None
        except KeyboardInterrupt:  # a second Ctrl-C: stop now (rows held back are encoded again on resume)
            self.stop_signal = signal.SIGINT
        except BrokenPipeError:  # `lqae-encode ... - | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.stop_signal = signal.SIGPIPE
        except OutputFenced as exc:  # a newer run claimed OUT (possible only where the file system has no locks)
            self.fenced = exc
        finally:
            bar.close()

    def _engine(self, pending):
        opts = self.opts
        common = {"preprocessing": self.preprocessing, "tokenizer_params": self.tokenizer_params,
                  "outputs": opts.outputs, "with_labels": opts.labels_from_dirs}
        if opts.engine == "ray":
            from ._ray import encode_on_ray  # Ray is imported only when asked for

            return encode_on_ray(pending, part_names=self.output.new_part_name, staging_dir=self.output.staging_dir,
                                 part_size=opts.part_size, ray_address=opts.ray_address, actors=opts.actors, **common)
        return encode_locally(pending, batch_size=opts.batch_size, workers=opts.workers, **common)

    def _commit(self, committed, failures) -> None:
        """Note what the output committed (no longer failures) and the files that failed."""
        self.errors.encoded(committed)
        self.counts["encoded"] += len(committed)
        self.errors.failed(failures)

    @contextlib.contextmanager
    def _signals_stop_the_loop(self):
        """SIGINT/SIGTERM stop the loop after the batch or part in hand (signals reach the main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now; a torn line is repaired on resume
        self.stop_signal = signum

    def _progress_bar(self, total: int):
        from tqdm import tqdm

        show = sys.stderr.isatty() if self.opts.progress is None else self.opts.progress
        return tqdm(total=total, unit="img", disable=not show, file=sys.stderr, smoothing=0.1)

    # -- 5. finish -------------------------------------------------------------------------------
    def _finish(self) -> None:
        """The errors file, then the output's end (Parquet: staging removed, the manifest), unless a newer
        run has claimed OUT (the fence), which then owns both."""
        self.output.check_fence()
        self.final_errors = self.errors.finish(getattr(self, "scope", set()), complete=self.complete)
        self.output.finish(self.complete)

    def summary(self) -> dict:
        """Counts of this run: ``encoded``, ``already`` (in OUT before it), ``failed``, and ``interrupted``."""
        return {"encoded": self.counts["encoded"], "already": self.counts["already"],
                "failed": getattr(self, "final_errors", self.errors.count),
                "interrupted": self.stop_signal not in (None, signal.SIGPIPE)}

    def _summary(self) -> int:
        c = self.summary()
        parts = [f"{c['encoded']} encoded"]
        if c["already"]:
            parts.append(f"{c['already']} already in {self.opts.out}")
        parts.append(f"{c['failed']} failed")
        errors_path = self.output.errors_path
        where = f" (see {errors_path})" if c["failed"] and errors_path else ""
        if self.stop_signal is not None:
            if self.stop_signal == signal.SIGPIPE:
                return EXIT_OK
            name = "Ctrl-C" if self.stop_signal == signal.SIGINT else "SIGTERM"
            self.echo(f"lqae-encode: interrupted by {name}: {', '.join(parts)}{where}; rerun to resume")
            return EXIT_INTERRUPTED if self.stop_signal == signal.SIGINT else EXIT_TERMINATED
        self.echo(f"lqae-encode: {', '.join(parts)}{where}")
        return EXIT_SOME_FAILED if c["failed"] else EXIT_OK

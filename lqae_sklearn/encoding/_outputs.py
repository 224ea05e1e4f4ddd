"""Where ``lqae-encode`` writes: a JSON Lines file or a folder of Parquet parts.

Both keep the same three things beside the rows, so resume and the settings check
work alike: the settings of the first run (``meta``), one error record per file that
could not be encoded (``errors``), and the set of images already written (read back
from the rows themselves, so it can never disagree with them).

=========  ===========================  ======================================
           JSONL (``OUT.jsonl``)        Parquet (``OUT/``)
=========  ===========================  ======================================
rows       ``OUT.jsonl``, appended a    ``OUT/part-RRRRR-SSSSSS.parquet``, each
           batch at a time              written whole, then renamed into place
settings   ``OUT.meta.json``            ``OUT/_meta.json``
errors     ``OUT.errors.jsonl``         ``OUT/_errors.jsonl``
index      --                           ``OUT/_manifest.json`` (parts, row counts)
=========  ===========================  ======================================

pyarrow (and so pandas) skips names starting with ``_`` or ``.`` when it reads a
folder, so ``pandas.read_parquet("OUT/")`` reads exactly the committed rows, even
while a run is in progress or after it was killed; other readers can glob
``OUT/part-*.parquet``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
from pathlib import Path

from lqae_sklearn._atomic import atomic_path, atomic_write_bytes

from ._discovery import record_key
from ._jsonl import JsonlAppender, iter_records, repair_torn_tail

PART_PATTERN = re.compile(r"part-(\d{5})-(\d{6})\.parquet")
MANIFEST_INTERVAL_S = 5.0
RUN_FILE = "_run"  # the number of the run allowed to commit parts (a fence against a killed run's workers)


class OutputError(ValueError):
    """An output that cannot be resumed or written (damaged, or holding files of others)."""


def sidecar_path(out: str, suffix: str) -> str:
    """``out.jsonl`` -> ``out<suffix>`` (``out.errors.jsonl``); other names get the suffix appended."""
    return (out[: -len(".jsonl")] if out.endswith(".jsonl") else out) + suffix


def infer_format(out: str) -> str:
    """``parquet`` for a folder (existing, or named ``x/`` or ``x.parquet``), else ``jsonl``."""
    if out != "-" and (out.endswith(("/", ".parquet")) or os.path.isdir(out)):
        return "parquet"
    return "jsonl"


class JsonlOutput:
    """``OUT.jsonl`` (or stdout for ``-``) with its ``.meta.json`` and ``.errors.jsonl`` beside it."""

    format = "jsonl"

    def __init__(self, out: str, errors_file: str | None = None):
        self.out = out
        self.to_stdout = out == "-"
        if self.to_stdout:
            self.meta_path, self.errors_path = None, errors_file
        else:
            self.meta_path = sidecar_path(out, ".meta.json")
            self.errors_path = errors_file or sidecar_path(out, ".errors.jsonl")
            if os.path.isdir(out):
                raise OutputError(f"{out!r} is a folder; give a file name, or --format parquet to write parts there")

    def has_rows(self) -> bool:
        return not self.to_stdout and os.path.exists(self.out) and os.path.getsize(self.out) > 0

    def clear(self) -> None:
        for path in (self.out, self.errors_path):
            if path and os.path.exists(path):
                os.unlink(path)

    def prepare(self) -> None:
        if not self.to_stdout:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)

    def claim(self) -> None:
        pass  # a JSONL file has one writer, appending: nothing to fence

    def created(self) -> None:
        if not self.to_stdout:
            open(self.out, "ab").close()

    def done_keys(self) -> set[bytes]:
        repair_torn_tail(self.out)
        keys = set()
        for number, record in iter_records(self.out):
            try:
                keys.add(record_key(record))
            except (KeyError, TypeError, ValueError) as exc:
                raise OutputError(f"{self.out}, line {number} has no usable \"path\"") from exc
        return keys

    def own_files(self) -> list[str]:
        return [p for p in (None if self.to_stdout else self.out, self.errors_path, self.meta_path) if p]

    def writer(self, part_size: int):
        return JsonlWriter(JsonlAppender(stream=sys.stdout.buffer) if self.to_stdout else JsonlAppender(path=self.out))


class JsonlWriter:
    """Appends each encoded batch as complete JSON lines (one write and fsync per batch)."""

    def __init__(self, appender: JsonlAppender):
        self.appender = appender

    def append(self, batch) -> None:
        self.appender.append(batch.records())

    def close(self) -> None:
        self.appender.close()


class ParquetOutput:
    """A folder of Parquet parts, each committed atomically, with its settings, errors and manifest."""

    format = "parquet"

    def __init__(self, out: str, errors_file: str | None = None):
        if out == "-":
            raise OutputError("Parquet cannot be written to stdout; give a folder")
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as exc:
            raise OutputError(f"Parquet output needs pyarrow ({exc}): pip install 'lqae-sklearn[parquet]'") from exc
        self.out = out
        self.folder = Path(out)
        self.meta_path = os.fspath(self.folder / "_meta.json")
        self.errors_path = errors_file or os.fspath(self.folder / "_errors.jsonl")
        self.manifest_path = os.fspath(self.folder / "_manifest.json")
        self.run_path = os.fspath(self.folder / RUN_FILE)
        self._rows = {}  # part name -> rows, so the manifest reads each part's footer once
        self._manifest_written = 0.0
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"{out!r} is a file; Parquet output is a folder of parts")

    # -- what is there ---------------------------------------------------------------
    def parts(self) -> list[Path]:
        """Committed part files, in name order (run, then sequence)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if PART_PATTERN.fullmatch(p.name))

    def _ours(self, path: Path) -> bool:
        name = path.name
        return (PART_PATTERN.fullmatch(name) is not None or name.startswith(".part-")
                or os.fspath(path) in (self.meta_path, self.errors_path, self.manifest_path, self.run_path))

    def has_rows(self) -> bool:
        return bool(self.parts())

    def clear(self) -> None:
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if self._ours(path):
                path.unlink()
        if os.path.exists(self.errors_path):
            os.unlink(self.errors_path)

    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        strangers = sorted(p.name for p in self.folder.iterdir() if not self._ours(p))
        if strangers:
            shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
            raise OutputError(
                f"{self.out!r} holds files lqae-encode did not write ({shown}); Parquet readers would mix them "
                f"into the data set, so give an empty or new folder"
            )

    def claim(self) -> None:
        """Take a run number, before reading what is done (and only once the settings were accepted).

        Parts of this run are named after it, and from now on a worker of an earlier
        run may not commit.
        """
        self.run = self.next_run()
        atomic_write_bytes(self.run_path, f"{self.run}\n".encode())
        self._remove_leftovers()
        self.parts_at_start = {p.name for p in self.parts()}

    def created(self) -> None:
        self.write_manifest(complete=False)

    def finish(self, complete: bool) -> None:
        """Drop what a killed earlier run's workers left after this run started, then write the manifest.

        The fence (``_run``) stops such a worker from committing, except in the moment
        between its check and its rename: a part of an earlier run that appeared after
        this run read the done images holds images this run encoded again, so it goes.
        """
        self._remove_leftovers(stragglers=True)
        self.write_manifest(complete)

    def _remove_leftovers(self, stragglers: bool = False) -> None:
        for path in self.folder.glob(".part-*"):  # a part whose writer was killed before its rename
            match = PART_PATTERN.match(path.name[1:])
            if match is None or int(match.group(1)) < self.run:
                path.unlink(missing_ok=True)
        if stragglers:
            for path in self.parts():
                run = int(PART_PATTERN.fullmatch(path.name).group(1))
                if run < self.run and path.name not in self.parts_at_start:
                    path.unlink(missing_ok=True)

    def done_keys(self) -> set[bytes]:
        import pyarrow.parquet as pq

        keys = set()
        for part in self.parts():
            try:
                table = pq.read_table(part, columns=["path", "path_bytes_b64"])
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise OutputError(f"{part} is not a readable Parquet part ({exc})") from exc
            for path, raw in zip(table["path"].to_pylist(), table["path_bytes_b64"].to_pylist()):
                keys.add(base64.b64decode(raw) if raw is not None else path.encode("utf-8"))
        return keys

    def own_files(self) -> list[str]:
        return [self.out, self.errors_path, self.meta_path]

    # -- writing ---------------------------------------------------------------------
    def next_run(self) -> int:
        """A run number above every committed part's and the last claimed one, so that names never collide
        and the fence shuts out every earlier run, even one killed before it committed anything."""
        runs = [int(PART_PATTERN.fullmatch(p.name).group(1)) for p in self.parts()]
        try:
            runs.append(int(Path(self.run_path).read_text()))
        except (OSError, ValueError):
            pass
        return max(runs, default=-1) + 1

    def part_path(self, run: int, sequence: int) -> Path:
        return self.folder / f"part-{run:05d}-{sequence:06d}.parquet"

    def part_committed(self, name: str, rows: int) -> None:
        """Note a part this run committed; the manifest is rewritten at most every few seconds.

        Listing the folder after every part would cost O(parts^2) over a run of
        100,000 parts; the manifest is an index for readers, not the record of what is
        done (the parts themselves are), so a few seconds of lag are harmless.
        """
        self._rows[name] = rows
        if time.monotonic() - self._manifest_written > MANIFEST_INTERVAL_S:
            self._write_manifest(complete=False)

    def write_manifest(self, complete: bool) -> None:
        """List the folder and write ``_manifest.json``: every committed part and its row count."""
        import pyarrow.parquet as pq

        self._rows = {name: rows for name, rows in self._rows.items() if (self.folder / name).exists()}
        for part in self.parts():
            if part.name not in self._rows:
                self._rows[part.name] = pq.read_metadata(part).num_rows
        self._write_manifest(complete)

    def _write_manifest(self, complete: bool) -> None:
        self._manifest_written = time.monotonic()
        parts = [{"file": name, "rows": rows} for name, rows in sorted(self._rows.items())]
        manifest = {"format": "lqae-encode parquet parts", "version": 1, "complete": complete,
                    "rows": sum(p["rows"] for p in parts), "parts": parts}
        atomic_write_bytes(self.manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())

    def writer(self, part_size: int):
        return PartWriter(self, part_size)


def commit_part(table, path: Path) -> None:
    """Write ``table`` to ``path`` via a hidden temporary name, fsync it, rename it into place.

    Writing the same part twice (a retried task) replaces it with the same rows, so a
    retry never duplicates anything.
    """
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:  # ".part-...": hidden from readers while being written
        pq.write_table(table, tmp, compression="zstd")


class PartWriter:
    """Collects encoded batches and commits them as parts of ``part_size`` rows (the local engine)."""

    def __init__(self, output: ParquetOutput, part_size: int):
        self.output = output
        self.part_size = part_size
        self.sequence = 0
        self.tables = []
        self.rows = 0

    def append(self, batch) -> None:
        if len(batch):
            self.tables.append(batch.table())
            self.rows += len(batch)
        while self.rows >= self.part_size:
            self._commit(self.part_size)

    def flush(self) -> None:
        """Commit what is buffered (at an interruption, or the end) as a last, shorter part."""
        if self.rows:
            self._commit(self.rows)

    def _commit(self, rows: int) -> None:
        import pyarrow as pa

        buffered = pa.concat_tables(self.tables)
        path = self.output.part_path(self.output.run, self.sequence)
        commit_part(buffered.slice(0, rows), path)
        self.output.part_committed(path.name, rows)
        self.sequence += 1
        rest = buffered.slice(rows)
        self.tables, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        self.flush()

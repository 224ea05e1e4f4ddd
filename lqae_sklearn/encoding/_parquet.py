"""A folder of Parquet parts with one committer: workers stage parts, only the run's driver makes them visible.

Layout of ``OUT/``::

    part-RRRRR-SSSSSS.parquet      committed parts (run RRRRR, its part SSSSSS): the data set
    _runs/RRRRR/part-...parquet    parts run RRRRR's workers staged, not committed (yet)
    _run                           the current run's number: the fence
    _lock                          the driver's lock (:class:`~._outputs.OutputLock`)
    _meta.json  _errors.jsonl  _manifest.json

pyarrow (and so pandas) skips names starting with ``_`` or ``.`` when it reads a
folder, staging folders included, so ``pandas.read_parquet("OUT/")`` reads exactly
the committed rows at any moment; other readers can glob ``OUT/part-*.parquet``.

A run, in order (each step is a :func:`~._steps.step`):

1. **claim**, under the lock: its number is one more than the highest found
   anywhere (``_run``, committed parts, staging folders), so the counter only grows,
   also across ``--overwrite``; it writes ``_run``, creates ``_runs/RRRRR/`` and
   removes the staging folders of earlier runs.
2. **list done**: the images in committed parts.
3. **write part**: a worker (a Ray actor, or the driver itself on the local
   engine) writes each part into ``_runs/RRRRR/`` under a temporary name and
   renames it there (**stage**). It never creates that folder.
4. **fence check** and **commit**: the driver checks that ``_run`` still names its
   run, renames the staged part into ``OUT/`` and flushes the folder.
5. **fence check** again, then **finish**: removes the staging folders; **manifest**:
   lists the committed parts.

Why one committer: a killed driver's workers can go on for a while (a Ray actor
finishing its part, a task being retried). They write only into their own run's
staging folder, which no reader and no later run reads, and which the next run
renames away at its claim (after which their writes fail): whatever a straggler
does, and whenever (before the rerun claims, between its steps, after it
finished), the committed parts stay what the current driver made them.
``tests/test_encode_interleavings.py`` runs a straggler and a rerun through every
interleaving of these steps.

The lock keeps a second driver out. Where it cannot (a file system without
locks, an NFS lock lost while its driver hung), a superseded driver is still
harmless: its staging folder was renamed away, so a part it commits either
became visible before the newer run listed what is done, or fails; and the fence
check stops it before it touches the errors, the staging folders or the manifest.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

from lqae_sklearn._atomic import atomic_path, atomic_write_bytes, fsync_dir

from ._outputs import OutputError, OutputFenced, OutputLock
from ._steps import CLAIM, COMMIT, FENCE, FINISH, LIST_DONE, MANIFEST, STAGE, WRITE_PART, step

PART_PATTERN = re.compile(r"part-(\d{5,})-(\d{6,})\.parquet")
RUN_FILE = "_run"  # the number of the run allowed to commit parts
LOCK_FILE = "_lock"
STAGING = "_runs"
META_FILE, ERRORS_FILE, MANIFEST_FILE = "_meta.json", "_errors.jsonl", "_manifest.json"
OWN_NAMES = (RUN_FILE, LOCK_FILE, STAGING, META_FILE, ERRORS_FILE, MANIFEST_FILE)
MANIFEST_INTERVAL_S = 5.0


def part_name(run: int, sequence: int) -> str:
    return f"part-{run:05d}-{sequence:06d}.parquet"


def stage_part(staging_dir, name: str, table) -> None:
    """Write one part into its run's staging folder: the only write a worker makes.

    Through a temporary name (written, fsynced, renamed), so a staged part is whole.
    The folder is never created here: once a newer run has removed it, a straggler
    of the old run fails here instead of leaving rows anywhere.
    """
    import pyarrow.parquet as pq

    step(WRITE_PART, name=name, staging=os.fspath(staging_dir))
    try:
        with atomic_path(Path(staging_dir) / name) as tmp:
            pq.write_table(table, tmp, compression="zstd")
            step(STAGE, name=name, staging=os.fspath(staging_dir))
    except FileNotFoundError as exc:
        raise OutputFenced(f"{staging_dir} is gone: a newer run has started, and this part of an earlier run "
                           f"is dropped ({exc})") from exc


class ParquetOutput:
    """A folder of Parquet parts, each committed by the driver alone, with its settings, errors and manifest."""

    format = "parquet"

    def __init__(self, out: str, errors_file: str | None = None, part_size: int = 4096):
        if out == "-":
            raise OutputError("Parquet cannot be written to stdout; give a folder")
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as exc:
            raise OutputError(f"Parquet output needs pyarrow ({exc}): pip install 'lqae-sklearn[parquet]'") from exc
        self.out = out
        self.folder = Path(out)
        self.meta_path = os.fspath(self.folder / META_FILE)
        self.errors_path = errors_file or os.fspath(self.folder / ERRORS_FILE)
        self.manifest_path = os.fspath(self.folder / MANIFEST_FILE)
        self.run_path = os.fspath(self.folder / RUN_FILE)
        self.part_size = part_size
        self.lock = OutputLock(self.folder / LOCK_FILE, out)
        self.run = None
        self._sequence = 0
        self._tables, self._keys = [], []  # rows the local engine handed over, not yet a whole part
        self._rows = {}  # committed part name -> rows, so the manifest reads each part's footer once
        self._manifest_written = 0.0
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"{out!r} is a file; Parquet output is a folder of parts")

    # -- what is there ---------------------------------------------------------------------------
    def parts(self) -> list[Path]:
        """Committed part files, in name order (run, then sequence)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if PART_PATTERN.fullmatch(p.name))

    @property
    def staging_root(self) -> Path:
        return self.folder / STAGING

    @property
    def staging_dir(self) -> Path:
        """Where this run's parts are staged (after :meth:`claim`)."""
        return self.staging_root / f"{self.run:05d}"

    def _ours(self, path: Path) -> bool:
        name = path.name
        if PART_PATTERN.fullmatch(name) or name in OWN_NAMES or os.fspath(path) == self.errors_path:
            return True
        # A temporary file of ours a kill left behind: "._manifest.json.x1y2", or an earlier version's ".part-...".
        return name.startswith(".part-") or any(name.startswith(f".{own}.") for own in OWN_NAMES)

    def has_rows(self) -> bool:
        return bool(self.parts())

    def own_files(self) -> list[str]:
        return [self.out, self.errors_path, self.meta_path]

    # -- claim -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Create the folder, refuse one holding files of others, and take the lock."""
        self.folder.mkdir(parents=True, exist_ok=True)
        strangers = sorted(p.name for p in self.folder.iterdir() if not self._ours(p))
        if strangers:
            shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
            raise OutputError(
                f"{self.out!r} holds files lqae-encode did not write ({shown}); Parquet readers would mix them "
                f"into the data set, so give an empty or new folder"
            )
        self.lock.acquire()

    def close(self) -> None:
        self.lock.release()

    def clear(self) -> None:
        """Start afresh (under the lock): remove rows, staging, settings and errors; keep ``_run`` and ``_lock``.

        The manifest goes first, so that it never lists a part that is gone.
        """
        Path(self.manifest_path).unlink(missing_ok=True)
        for path in self.parts():
            path.unlink()
        shutil.rmtree(self.staging_root, ignore_errors=True)
        for path in (self.errors_path, self.meta_path):
            Path(path).unlink(missing_ok=True)

    def claim(self) -> None:
        """Take the next run number, put it up as the fence, and create this run's staging folder."""
        step(CLAIM, output=self)
        self.run = self._next_run()
        atomic_write_bytes(self.run_path, f"{self.run}\n".encode())
        self.staging_dir.mkdir(parents=True)
        self._remove_leftovers()

    def _next_run(self) -> int:
        """One more than every run number in the folder: the counter only grows, so names never collide and
        the fence shuts out every earlier run, even one that never committed a part."""
        runs = [int(PART_PATTERN.fullmatch(p.name).group(1)) for p in self.parts()]
        if self.staging_root.is_dir():
            runs += [int(p.name) for p in self.staging_root.iterdir() if p.name.isdigit()]
        try:
            runs.append(int(Path(self.run_path).read_text()))
        except (OSError, ValueError):
            pass
        return max(runs, default=-1) + 1

    def _remove_leftovers(self) -> None:
        """Staging folders of earlier runs (never committed: their images are encoded again) and temporary
        files a kill left in OUT (only a driver writes there, and this one holds the lock)."""
        for path in sorted(self.staging_root.iterdir()):
            if path.name == self.staging_dir.name:
                continue
            if path.name.isdigit():
                # Renamed away first, in one step: from then on no path a straggler of that run holds leads
                # anywhere, so it can neither stage nor commit a part, whatever the removal below meets.
                away = self.staging_root / f".removed-{path.name}-{self.run:05d}"
                try:
                    os.rename(path, away)
                except OSError:
                    continue
                path = away
            shutil.rmtree(path, ignore_errors=True)
        for path in self.folder.iterdir():
            if path.name.startswith(".") and self._ours(path):
                path.unlink(missing_ok=True)

    def done_keys(self) -> set[bytes]:
        import pyarrow.parquet as pq

        step(LIST_DONE, output=self)
        keys = set()
        for part in self.parts():
            try:
                table = pq.read_table(part, columns=["path", "path_bytes_b64"])
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise OutputError(f"{part} is not a readable Parquet part ({exc})") from exc
            for path, raw in zip(table["path"].to_pylist(), table["path_bytes_b64"].to_pylist()):
                keys.add(base64.b64decode(raw) if raw is not None else path.encode("utf-8"))
        return keys

    def created(self) -> None:
        """Say, before this run commits anything, that the folder is not complete."""
        self.write_manifest(complete=False)

    # -- commit ----------------------------------------------------------------------------------
    def new_part_name(self) -> str:
        name = part_name(self.run, self._sequence)
        self._sequence += 1
        return name

    def commit(self, part) -> list[bytes]:
        """Commit a part a worker staged, or take the local engine's rows and commit them part by part.

        Returns the keys now visible in OUT.
        """
        if part.staged is not None:
            self._commit_staged(part.staged, len(part.keys))
            return list(part.keys)
        if part.batch is not None and len(part.batch):
            self._tables.append(part.batch.table())
            self._keys.extend(part.batch.keys)
        committed = []
        while len(self._keys) >= self.part_size:
            committed += self._stage_and_commit(self.part_size)
        return committed

    def flush(self) -> list[bytes]:
        """Commit the rows held back (at an interruption, or the end) as a last, shorter part."""
        return self._stage_and_commit(len(self._keys)) if self._keys else []

    def _stage_and_commit(self, rows: int) -> list[bytes]:
        import pyarrow as pa

        buffered = pa.concat_tables(self._tables)
        name = self.new_part_name()
        stage_part(self.staging_dir, name, buffered.slice(0, rows))
        self._commit_staged(name, rows)
        keys, self._keys = self._keys[:rows], self._keys[rows:]
        rest = buffered.slice(rows)
        self._tables = [rest] if rest.num_rows else []
        return keys

    def check_fence(self) -> None:
        """Raise :class:`OutputFenced` unless ``_run`` still names this run."""
        step(FENCE, output=self)
        try:
            current = int(Path(self.run_path).read_text())
        except (OSError, ValueError):
            current = None
        if current != self.run:
            raise OutputFenced(f"{self.out}: run {current} has claimed this folder since this run (run {self.run}) "
                               f"started, so this run commits nothing more; let the other run finish")

    def _commit_staged(self, name: str, rows: int) -> None:
        if not name.startswith(f"part-{self.run:05d}-") or not PART_PATTERN.fullmatch(name):
            raise OutputError(f"{name!r} is not a part of run {self.run}; refusing to commit it")
        self.check_fence()
        step(COMMIT, output=self, name=name)
        target = self.folder / name
        if target.exists():  # one committer, unique names: only a bug could get here
            raise OutputError(f"{target} is already committed; refusing to replace it")
        try:
            os.rename(self.staging_dir / name, target)
        except FileNotFoundError as exc:
            raise OutputError(f"the staged part {self.staging_dir / name} is missing ({exc})") from exc
        fsync_dir(self.folder)
        self._rows[name] = rows
        if time.monotonic() - self._manifest_written > MANIFEST_INTERVAL_S:
            # Listing the folder after every part would cost O(parts^2) over 100,000 parts; the manifest is an
            # index for readers, not the record of what is done (the parts are), so a few seconds' lag is fine.
            self._write_manifest(complete=False)

    # -- finish ----------------------------------------------------------------------------------
    def finish(self, complete: bool) -> None:
        """Remove the staging folders and write the manifest (``complete``: every image of the run is in).

        Call it after :meth:`check_fence`: a superseded run leaves the folder to the newer one.
        """
        step(FINISH, output=self)
        shutil.rmtree(self.staging_root, ignore_errors=True)
        self.write_manifest(complete)

    def write_manifest(self, complete: bool) -> None:
        """List the folder and write ``_manifest.json``: every committed part and its row count."""
        import pyarrow.parquet as pq

        step(MANIFEST, output=self, complete=complete)
        parts = self.parts()
        names = {part.name for part in parts}
        self._rows = {name: rows for name, rows in self._rows.items() if name in names}
        for part in parts:
            if part.name not in self._rows:
                self._rows[part.name] = pq.read_metadata(part).num_rows
        self._write_manifest(complete)

    def _write_manifest(self, complete: bool) -> None:
        self._manifest_written = time.monotonic()
        parts = [{"file": name, "rows": rows} for name, rows in sorted(self._rows.items())]
        manifest = {"format": "lqae-encode parquet parts", "version": 1, "complete": complete,
                    "rows": sum(p["rows"] for p in parts), "parts": parts}
        atomic_write_bytes(self.manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())

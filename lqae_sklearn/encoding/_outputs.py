"""Where ``lqae-encode`` writes, and what every output shares: the lock, the format, JSON Lines.

An output keeps three things beside the rows, so that resume and the settings
check work alike for both formats: the settings of the first run (``meta``), one
error record per file that could not be encoded (``errors``), and the set of images
already written (read back from the rows themselves, so it can never disagree with
them).

=========  ===========================  ============================================
           JSONL (``OUT.jsonl``)        Parquet (``OUT/``, :mod:`._parquet`)
=========  ===========================  ============================================
rows       ``OUT.jsonl``, appended a    ``OUT/part-RRRRR-SSSSSS.parquet``, staged in
           batch at a time              ``OUT/_runs/RRRRR/``, committed by a rename
settings   ``OUT.meta.json``            ``OUT/_meta.json``
errors     ``OUT.errors.jsonl``         ``OUT/_errors.jsonl``
index      --                           ``OUT/_manifest.json`` (parts, row counts)
lock       ``OUT.jsonl`` itself         ``OUT/_lock``
=========  ===========================  ============================================

Only the driver of a run (the ``lqae-encode`` process) ever makes rows visible,
and only while it holds OUT's lock: a second run on the same OUT is refused, and
a killed run's lock goes with its process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import warnings
from pathlib import Path

from ._discovery import record_key
from ._jsonl import JsonlAppender, dumps_lines, iter_records, repair_torn_tail
from ._steps import CLAIM, FINISH, LIST_DONE, WRITE_PART, step


class OutputError(ValueError):
    """An output that cannot be resumed or written (damaged, holding files of others, or in use)."""


class OutputFenced(OutputError):
    """A newer run has claimed the output: this run may not commit anything more."""


class OutputInUse(OutputError):
    """Another run holds the output's lock."""


def sidecar_path(out: str, suffix: str) -> str:
    """``out.jsonl`` -> ``out<suffix>`` (``out.errors.jsonl``); other names get the suffix appended."""
    return (out[: -len(".jsonl")] if out.endswith(".jsonl") else out) + suffix


def infer_format(out: str) -> str:
    """``parquet`` for a folder (existing, or named ``x/`` or ``x.parquet``), else ``jsonl``."""
    if out != "-" and (out.endswith(("/", ".parquet")) or os.path.isdir(out)):
        return "parquet"
    return "jsonl"


class OutputLock:
    """An exclusive ``flock`` on one file of an output, held by a run's driver from its claim to its end.

    Two drivers on one output would encode the same images twice; the second is
    refused. The kernel drops the lock when its holder dies, however it dies, so a
    killed run never blocks its rerun. Where the file system has no locks (``flock``
    fails with ENOLCK or EOPNOTSUPP) the run goes on with a warning: the Parquet run
    fence still stops a superseded driver at its next commit.
    """

    def __init__(self, path, what: str):
        self.path = os.fspath(path)
        self.what = what
        self.fd = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUse(f"another lqae-encode run is writing {self.what} (it holds the lock on {self.path}); "
                              f"wait for it to end, or stop it, before starting another") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            warnings.warn(f"{self.path}: the file system has no locks ({exc.strerror}); make sure no other "
                          f"lqae-encode run writes {self.what}", RuntimeWarning, stacklevel=2)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None


class JsonlOutput:
    """``OUT.jsonl`` (or stdout for ``-``) with its ``.meta.json`` and ``.errors.jsonl`` beside it.

    The driver is its only writer: it appends each batch's records as complete
    lines in one write and fsync (the commit), so there is nothing to stage.
    """

    format = "jsonl"

    def __init__(self, out: str, errors_file: str | None = None):
        self.out = out
        self.to_stdout = out == "-"
        if self.to_stdout:
            self.meta_path, self.errors_path, self.lock = None, errors_file, None
        else:
            self.meta_path = sidecar_path(out, ".meta.json")
            self.errors_path = errors_file or sidecar_path(out, ".errors.jsonl")
            self.lock = OutputLock(out, out)
            if os.path.isdir(out):
                raise OutputError(f"{out!r} is a folder; give a file name, or --format parquet to write parts there")
        self._appender = None

    # -- claim ----------------------------------------------------------------------------------
    def open(self) -> None:
        """Create OUT's folder and take the lock (the lock creates OUT, empty, if it is new)."""
        if not self.to_stdout:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        if self.lock is not None:
            self.lock.release()

    def has_rows(self) -> bool:
        return not self.to_stdout and os.path.exists(self.out) and os.path.getsize(self.out) > 0

    def clear(self) -> None:
        """Start afresh: empty OUT (truncated, not removed: it holds the lock) and remove the errors file."""
        if not self.to_stdout:
            os.truncate(self.out, 0)
        if self.errors_path and os.path.exists(self.errors_path):
            os.unlink(self.errors_path)

    def claim(self) -> None:
        step(CLAIM, output=self)  # the lock is the claim: a file with one writer needs no run number

    def done_keys(self) -> set[bytes]:
        step(LIST_DONE, output=self)
        repair_torn_tail(self.out)
        keys = set()
        for number, record in iter_records(self.out):
            try:
                keys.add(record_key(record))
            except (KeyError, TypeError, ValueError) as exc:
                raise OutputError(f"{self.out}, line {number} has no usable \"path\"") from exc
        return keys

    def created(self) -> None:
        pass  # OUT exists since open(); there is no index to write

    def own_files(self) -> list[str]:
        return [p for p in (None if self.to_stdout else self.out, self.errors_path, self.meta_path) if p]

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, part) -> list[bytes]:
        """Append ``part``'s rows; returns the keys now in OUT."""
        if part.batch is None or not len(part.batch):
            return []
        data = dumps_lines(part.batch.records())
        step(WRITE_PART, output=self, path=self.out, data=data)
        if self._appender is None:
            self._appender = (JsonlAppender(stream=sys.stdout.buffer) if self.to_stdout
                              else JsonlAppender(path=self.out))
        self._appender.append_lines(data)
        return part.batch.keys

    def flush(self) -> list[bytes]:
        return []  # every commit was written whole

    def check_fence(self) -> None:
        pass  # one writer, holding the lock: there is no newer run to yield to

    # -- finish ---------------------------------------------------------------------------------
    def finish(self, complete: bool) -> None:
        step(FINISH, output=self)

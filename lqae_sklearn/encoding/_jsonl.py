"""JSON Lines files that survive being killed: record-atomic appends and repair.

Protocol: a record is one line of JSON ending in ``\\n``. Each batch of records is
appended with a single ``write`` of complete lines, then ``fsync``-ed, so the file
only ever holds complete records plus, while a write is in flight or after a
SIGKILL, one unterminated tail. :func:`iter_records` ignores that tail (a reader
never sees a partial record) and :func:`repair_torn_tail` cuts it off before a
resumed run appends.
"""

from __future__ import annotations

import json
import os


class CorruptJsonlError(ValueError):
    """A complete line of a JSON Lines file that is not a JSON object."""


def repair_torn_tail(path) -> int:
    """Cut ``path`` back to its last newline; returns the number of bytes removed."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        chunk = 1 << 16
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def iter_records(path):
    """Yield ``(line_number, record)`` for every complete line of ``path``.

    An unterminated last line (a write in flight, or torn by a kill) is skipped;
    a complete line that is not a JSON object raises :class:`CorruptJsonlError`.
    """
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CorruptJsonlError(f"{os.fsdecode(path)}, line {number}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise CorruptJsonlError(f"{os.fsdecode(path)}, line {number}: not a JSON object")
            yield number, record


def dumps_lines(records) -> bytes:
    """Records -> UTF-8 JSON lines (no NaN; non-ASCII kept readable)."""
    return b"".join(
        json.dumps(r, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"
        for r in records
    )


class JsonlAppender:
    """Appends batches of records to a file (or a stream such as stdout) record-atomically."""

    def __init__(self, path=None, stream=None):
        if (path is None) == (stream is None):
            raise ValueError("give exactly one of path or stream")
        self.path = path
        self.stream = stream
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path is not None else None

    def append(self, records) -> None:
        self.append_lines(dumps_lines(records))

    def append_lines(self, data: bytes) -> None:
        """Append complete lines (``dumps_lines`` output) in one write, then fsync."""
        if not data:
            return
        if self._fd is None:
            self.stream.write(data)
            self.stream.flush()
            return
        view = memoryview(data)
        while view:  # one write() in practice; loop only if the kernel takes part of it
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

"""One error record per file that could not be encoded: appended as files fail, rewritten at the end.

A rerun retries every failed file. The file then holds, for each path, the record
of its last try: a completed run rewrites it to exactly the paths still failing;
an interrupted one keeps the records of the paths it did not get to.
"""

from __future__ import annotations

import os

from lqae_sklearn._atomic import atomic_write_bytes

from ._discovery import path_fields, record_key
from ._jsonl import JsonlAppender, dumps_lines, iter_records, repair_torn_tail


class ErrorRecords:
    """The errors file of one run (``path`` None: each failure is reported through ``echo`` instead)."""

    def __init__(self, path: str | None, echo):
        self.path = path
        self.echo = echo
        self.old: dict[bytes, dict] = {}  # records of earlier runs, by path bytes
        self.new: dict[bytes, dict] = {}  # this run's
        self.count = 0

    def read_earlier(self) -> None:
        """Load the records an earlier run left (resume), cutting a torn last line first."""
        if self.path and os.path.exists(self.path):
            repair_torn_tail(self.path)
            for _, record in iter_records(self.path):
                self.old[record_key(record)] = record

    def failed(self, failures) -> None:
        """``(path, reason)`` pairs that could not be encoded: counted, and appended in one write."""
        fresh = []
        for path, reason in failures:
            record = {**path_fields(path), "reason": reason}
            key = os.fsencode(path)
            self.count += 1
            self.new[key] = record
            if self.path is None:
                self.echo(f"lqae-encode: error: {record['path']}: {reason}")
            elif self.old.get(key) != record:  # don't duplicate what an earlier run already wrote
                fresh.append(record)
        if fresh:
            with JsonlAppender(path=self.path) as errors:
                errors.append(fresh)

    def encoded(self, keys) -> None:
        """``keys`` (path bytes) are now in OUT: they are no longer failures."""
        for key in keys:
            self.new.pop(key, None)
            self.old.pop(key, None)

    def finish(self, scope, complete: bool) -> int:
        """Rewrite the file to one record per still-failing path (or remove it); returns how many.

        ``scope``: the path bytes this run was asked to encode. A completed run retried
        all of them; an interrupted one keeps the old records of those it did not try.
        """
        untried = {} if complete else {k: r for k, r in self.old.items() if k in scope and k not in self.new}
        final = {**untried, **self.new}
        if self.path is not None:
            if final:
                atomic_write_bytes(self.path, dumps_lines(final[k] for k in sorted(final)))
            elif os.path.exists(self.path):
                os.unlink(self.path)
        return len(final)

"""Atomic writes (lqae_sklearn._atomic): what a reader can see, permissions, and cleanup on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lqae_sklearn import _atomic


def make_folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(text)
    return path


#: A reader in its own process: stats the folder as fast as it can until told to stop, then prints how
#: often it looked, how often the folder was missing, and how often it found another folder (inode) there
#: than the time before: a swap it saw (freed inode numbers are reused, so distinct ones are not counted).
READER = """
import json, os, sys
target, ready, stop = sys.argv[1:]
looks = missing = changes = 0
last = None
open(ready, "w").close()
while not os.path.exists(stop):
    for _ in range(200):
        looks += 1
        try:
            inode = os.stat(target).st_ino
        except FileNotFoundError:
            missing += 1
            continue
        changes += inode != last
        last = inode
print(json.dumps({"looks": looks, "missing": missing, "changes": changes}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_folder_swap_never_leaves_the_path_missing(tmp_path, monkeypatch):
    """A reader in another process watches the path while it is swapped 300 times: it must look often,
    see many of the swapped-in folders (so it really watched them happen), and never find the path missing."""
    assert _atomic.folder_swap_is_atomic()
    # Flushing to disk is not what is tested here, and it would make 300 swaps slow.
    monkeypatch.setattr(_atomic, "fsync_tree", lambda path: None)
    monkeypatch.setattr(_atomic, "fsync_dir", lambda path: None)
    target = make_folder(tmp_path / "checkpoint", "0")
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target), str(ready), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert reader.poll() is None and time.monotonic() < deadline, "the reader did not start"
            time.sleep(0.01)
        swaps = 300
        for i in range(1, swaps + 1):
            _atomic.replace_dir(make_folder(tmp_path / f".new{i}", str(i)), target)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    seen = json.loads(out)
    assert (target / "config.json").read_text() == str(swaps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "ready", "stop"]  # old folders gone
    assert seen["missing"] == 0, seen
    assert seen["looks"] > 1_000 and seen["changes"] > 10, seen  # it watched, and saw swaps happen (30k-170k, 80-270 here)


def test_without_an_exchange_the_fallback_still_replaces_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    target = make_folder(tmp_path / "checkpoint", "old")
    _atomic.replace_dir(make_folder(tmp_path / ".new", "new"), target)
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_and_folders_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert _atomic.current_umask() == umask
        _atomic.atomic_write_bytes(tmp_path / "file", b"data")
        folder = _atomic.make_temp_dir(tmp_path / "folder")
    finally:
        os.umask(old)
    assert (tmp_path / "file").stat().st_mode & 0o777 == 0o666 & ~umask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with _atomic.atomic_path(path) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_replace_dir_flushes_every_file(tmp_path, monkeypatch):
    flushed = []
    real_fsync = os.fsync

    def record(fd):
        flushed.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(_atomic.os, "fsync", record)
    new = make_folder(tmp_path / ".new", "new")
    (new / "model.safetensors").write_bytes(b"weights")
    _atomic.replace_dir(new, tmp_path / "checkpoint")
    names = {Path(p).name for p in flushed}
    assert {"config.json", "model.safetensors", ".new"} <= names  # the files, then their folder

"""Atomic writes (lqae_sklearn._atomic): what a reader can see, permissions, and cleanup on failure."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lqae_sklearn import _atomic


def make_folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(text)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_folder_swap_never_leaves_the_path_missing(tmp_path, monkeypatch):
    assert _atomic.folder_swap_is_atomic()
    target = make_folder(tmp_path / "checkpoint", "old")
    seen = []
    real_replace = os.replace

    def replace_and_look(src, dst):  # any rename on the way must leave the target in place
        real_replace(src, dst)
        seen.append(target.exists())

    monkeypatch.setattr(_atomic.os, "replace", replace_and_look)
    _atomic.replace_dir(make_folder(tmp_path / ".new", "new"), target)
    assert (target / "config.json").read_text() == "new"
    assert all(seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # the old folder is gone


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

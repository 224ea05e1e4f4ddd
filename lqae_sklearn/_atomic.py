"""Writes a crash cannot leave half done: a reader sees the old file or folder, or the new one.

Files are written beside their target under a temporary name, flushed to disk,
then renamed over it. A folder is swapped with its replacement in one
``renameat2(RENAME_EXCHANGE)`` on Linux, so the path never goes missing; where
that call does not exist (other systems, old kernels or C libraries), the old
folder is first renamed aside, leaving a window of two renames in which the path
is absent (:func:`folder_swap_is_atomic` says which applies). Everything created
here gets the permissions the process's umask gives, as ``open`` would.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask: read from /proc on Linux; elsewhere set and restored, under a lock."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:  # other threads creating files in this instant would get 0o022
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def fsync_dir(path) -> None:
    """Flush a folder's entries (new or renamed names) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path) -> None:
    """Flush every file and folder below ``path``, then ``path`` itself."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def make_temp_dir(target: Path) -> Path:
    """An empty folder beside ``target`` (same file system), with umask permissions."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(path, 0o777 & ~current_umask())  # mkdtemp makes it 0700
    return path


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of ``data``."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


@functools.cache
def _renameat2():
    """glibc's ``renameat2`` (2.28 and later), or None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: kernel or file system without it
        return False
    raise OSError(errno, os.strerror(errno), str(b))


@functools.cache
def folder_swap_is_atomic() -> bool:
    """Whether :func:`replace_dir` swaps folders in one step here (tried once, in a scratch folder)."""
    with tempfile.TemporaryDirectory() as root:
        a, b = Path(root, "a"), Path(root, "b")
        a.mkdir()
        b.mkdir()
        return _exchange(a, b)


def replace_dir(src, dst) -> None:
    """Put the complete folder ``src`` at ``dst``, replacing any folder there (see the module notes)."""
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    if not dst.exists():
        os.replace(src, dst)
    elif _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
    else:
        aside = make_temp_dir(dst)
        os.replace(dst, aside / dst.name)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(dst.parent)

"""Finding the image files to encode: folders, single files, or paths on stdin.

Rules (documented in ``lqae-encode --help``):

- Folders are walked recursively. Every regular file is a candidate, whatever its
  name; files that are not images get an error record rather than being silently
  skipped (``--ext`` narrows the walk to some extensions).
- Symlinks are followed, to files and to folders. A symlink that cannot be
  resolved (a loop, or a missing target) and a folder symlink that leads back to a
  folder above it are reported as errors, so the walk always ends.
- A folder is walked even if its name looks like an image's (``x.png/``); a path
  read from stdin must be a file, and a folder there is an error record.
- FIFOs, sockets and devices are error records (opening a FIFO would hang).
- The result is sorted by the path's bytes, so the order (and hence the output)
  does not depend on the file system or on names that are not valid UTF-8.
- Paths are kept as ``str`` with undecodable bytes as surrogates (``os.fsdecode``),
  so every file, whatever its name, can be opened again.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Item:
    """One file to encode: its path as found, and the key that decides its shard."""

    path: str
    shard_key: bytes

    @property
    def key(self) -> bytes:
        return os.fsencode(self.path)


@dataclass
class Discovery:
    """Files to encode and paths that could not be used, each sorted and unique.

    ``errors`` holds ``(item, reason)`` pairs.
    """

    items: list[Item] = field(default_factory=list)
    errors: list[tuple[Item, str]] = field(default_factory=list)


def discover(sources, *, stdin_paths=None, extensions=None, exclude=()) -> Discovery:
    """Collect the files under ``sources`` (folders or files) and ``stdin_paths``.

    Parameters
    ----------
    sources : list of str
        Folders (walked recursively) and files given on the command line; each
        must exist (checked by the caller).
    stdin_paths : iterable of str, optional
        Paths read from stdin; each must be a file.
    extensions : set of str, optional
        Lower-case extensions without the dot; when given, a folder walk keeps only
        files with one of them (explicit files and stdin paths are always kept).
    exclude : iterable of (st_dev, st_ino)
        Files and folders never to encode or walk (the run's own output).
    """
    found = Discovery()
    exclude = set(exclude)
    for source in sources:
        st = _stat(source, os.fsencode(source), found.errors)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            _walk(source, (st.st_dev, st.st_ino), found, extensions, exclude)
        else:
            _add_file(source, os.fsencode(source), st, found, exclude)
    for path in stdin_paths or ():
        st = _stat(path, os.fsencode(path), found.errors)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            found.errors.append((Item(path, os.fsencode(path)), "is a folder (paths read from stdin must be files)"))
        else:
            _add_file(path, os.fsencode(path), st, found, exclude)
    unique = {item.key: item for item in found.items}
    found.items = [unique[key] for key in sorted(unique)]
    errors = {item.key: (item, reason) for item, reason in found.errors}
    found.errors = [errors[key] for key in sorted(errors)]
    return found


def _walk(root: str, root_id, found: Discovery, extensions, exclude) -> None:
    # Iterative depth-first walk; each folder carries the identities of its
    # ancestors so that a symlink back up the tree is caught, not followed forever.
    stack = [(root, b"", frozenset([root_id]))]
    while stack:
        folder, rel, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            found.errors.append((Item(folder, rel), f"cannot list folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            rel_key = rel + os.fsencode(entry.name)
            st = _stat(entry.path, rel_key, found.errors)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                identity = (st.st_dev, st.st_ino)
                if identity in exclude:  # the run's own output folder, inside the folder it encodes
                    continue
                if identity in ancestors:
                    found.errors.append(
                        (Item(entry.path, rel_key), "symlink loop: this folder link leads back to a folder above it")
                    )
                    continue
                stack.append((entry.path, rel_key + b"/", ancestors | {identity}))
            elif extensions is None or _extension(entry.name) in extensions:
                _add_file(entry.path, rel_key, st, found, exclude)


def _add_file(path: str, shard_key: bytes, st: os.stat_result, found: Discovery, exclude) -> None:
    if (st.st_dev, st.st_ino) in exclude:
        return
    if stat.S_ISREG(st.st_mode):
        found.items.append(Item(path, shard_key))
    else:
        found.errors.append((Item(path, shard_key), "not a regular file (FIFO, socket or device)"))


def _stat(path: str, shard_key: bytes, errors: list) -> os.stat_result | None:
    try:
        return os.stat(path)  # follows symlinks
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            reason = "symlink loop (the link cannot be resolved)"
        elif exc.errno == errno.ENOENT and os.path.islink(path):
            reason = "broken symlink (its target does not exist)"
        elif exc.errno == errno.ENOENT:
            reason = "no such file"
        elif exc.errno == errno.EACCES:
            reason = "permission denied"
        else:
            reason = f"cannot stat ({exc.strerror or exc})"
        errors.append((Item(path, shard_key), reason))
        return None


def _extension(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def in_shard(item: Item, index: int, count: int) -> bool:
    """Whether ``item`` belongs to shard ``index`` of ``count``.

    The shard is a hash of the path relative to the folder it was found under (the
    path as given for files and stdin paths): adding or removing files never moves
    other files between shards, and machines that mount the corpus at different
    places agree.
    """
    if count == 1:
        return True
    digest = hashlib.blake2b(item.shard_key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % count == index


def path_fields(path: str) -> dict:
    """JSON fields naming ``path``: ``path`` as text, plus ``path_bytes_b64`` if it is not UTF-8.

    JSON must be valid UTF-8, so a name that is not gets U+FFFD in ``path`` and its
    exact bytes, base64-encoded, in ``path_bytes_b64``.
    """
    raw = os.fsencode(path)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path": raw.decode("utf-8", "replace"), "path_bytes_b64": base64.b64encode(raw).decode("ascii")}


def record_key(record: dict) -> bytes:
    """The exact path bytes a record stands for (inverse of :func:`path_fields`)."""
    if "path_bytes_b64" in record:
        return base64.b64decode(record["path_bytes_b64"])
    return record["path"].encode("utf-8")


def label_of(path: str) -> str:
    """Name of the folder holding ``path`` (text; undecodable bytes become U+FFFD)."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return os.fsencode(parent).decode("utf-8", "replace")


def read_stdin_paths(stream, null_separated: bool = False):
    """Paths from a binary stream, one per line (or NUL-separated); blank entries ignored."""
    data = stream.read()
    parts = data.split(b"\0") if null_separated else data.splitlines()
    return [os.fsdecode(p) for p in parts if p.strip()]

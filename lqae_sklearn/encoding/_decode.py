"""Decoding image files in a bounded pool of worker processes.

Workers return small uint8 arrays already in the checkpoint's colour mode and
size, so what crosses the process boundary is tiny and the main process only
runs the model. At most ``2 * workers`` batches are in flight, so memory does
not grow with the size of the corpus. A worker that dies (a decoder crash, the
OOM killer) costs only the file it was decoding: the batch is retried one file
per task and the culprit gets an error record.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np

from lqae_sklearn._images import ImageLoadError, image_summary, load_image, prepare_image

WORKER_DIED = "the decoder process died on this file (crash or out of memory)"


class Decoded(NamedTuple):
    """One file, decoded: the model's input, or the reason there is none."""

    image: np.ndarray | None  # uint8, in the checkpoint's size and colour mode
    reason: str | None
    original: tuple | None = None  # (height, width, mode) as the file holds it, for the training-domain check


def decode_file(path: str, preprocessing: dict) -> Decoded:
    """The image at ``path`` as model input, with its original size and mode; a reason for a bad file."""
    try:
        image = load_image(path)
        original = image_summary(image)
        return Decoded(np.asarray(prepare_image(image, preprocessing), dtype=np.uint8), None, original)
    except ImageLoadError as exc:
        return Decoded(None, exc.reason)
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the run
        return Decoded(None, f"cannot decode image ({type(exc).__name__}: {exc})")


def decode_batch(paths, preprocessing: dict, decode=decode_file):
    return [decode(path, preprocessing) for path in paths]


def _path(entry) -> str:
    return entry if isinstance(entry, str) else entry.path


def _init_worker(parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """A SIGKILLed main process must not leave workers behind (holding its stdout open)."""
    try:  # Linux: the kernel signals us the moment the parent goes
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch():  # elsewhere (and as a backstop): notice that we were re-parented
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class DecodePipeline:
    """Iterate ``(batch, results)`` over ``batches`` in order, decoding ahead in workers.

    Parameters
    ----------
    batches : iterable of list
        Paths (str) or objects with a ``path`` attribute, already grouped into batches.
    preprocessing : dict
        The checkpoint's preprocessing (image size and colour mode).
    workers : int
        Worker processes; 0 decodes in the calling process.
    decode : callable
        ``decode(path, preprocessing) -> (array or None, reason or None)``; must be
        picklable by reference (a module-level function).
    """

    def __init__(self, batches, preprocessing: dict, workers: int, decode=decode_file):
        self.batches = iter(batches)
        self.preprocessing = preprocessing
        self.workers = workers
        self.decode = decode
        self._executor = None
        self._pending: deque = deque()

    def start(self) -> "DecodePipeline":
        """Start decoding the first batches now (e.g. while the model loads)."""
        if self.workers > 0 and self._executor is None:
            self._executor = self._new_executor()
            self._fill()
        return self

    def __iter__(self):
        if self.workers == 0:
            for batch in self.batches:
                yield batch, decode_batch([_path(e) for e in batch], self.preprocessing, self.decode)
            return
        self.start()
        try:
            while self._pending:
                batch, future = self._pending.popleft()
                try:
                    results = future.result()
                except BrokenProcessPool:
                    results = self._recover(batch)
                self._fill()
                yield batch, results
        finally:
            self.close()

    def close(self) -> None:
        if self._executor is not None:
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _new_executor(self) -> ProcessPoolExecutor:
        # fork: workers start in milliseconds and inherit the imported modules. The
        # first pool is created before the model runs, so no torch threads exist yet;
        # a pool restarted after a crash forks a process that has run torch, which is
        # safe here because workers only decode images and never call torch.
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker, initargs=(os.getpid(),),
        )

    def _submit(self, batch):
        return self._executor.submit(decode_batch, [_path(e) for e in batch], self.preprocessing, self.decode)

    def _fill(self) -> None:
        while len(self._pending) < 2 * self.workers:
            batch = next(self.batches, None)
            if batch is None:
                return
            self._pending.append((batch, self._submit(batch)))

    def _recover(self, batch):
        """The pool broke: decode ``batch`` one file per task to find the culprit, resubmit the rest."""
        self._restart()
        results = []
        for path in batch:
            try:
                results.extend(self._submit([path]).result())
            except BrokenProcessPool:
                self._restart()
                results.append(Decoded(None, WORKER_DIED))
        self._pending = deque((b, self._submit(b)) for b, _ in self._pending)
        return results

    def _restart(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

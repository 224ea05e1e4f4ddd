"""Named steps of a run's reads and writes of OUT, so that tests can interleave runs step by step.

Each output (:mod:`._outputs`, :mod:`._parquet`) and the workers' staging call
:func:`step` just before each step that reads what is done or changes what OUT
holds. Nothing listens in production (one ``None`` check per step, a few per part);
``tests/encode_harness.py`` installs a hook that pauses the calling thread there,
to run a straggler of a killed run and a new run through every interleaving of
their steps, and to abandon a run at any step as a SIGKILL would.
"""

from __future__ import annotations

CLAIM = "claim"  # take OUT's lock and a run number (the fence)
LIST_DONE = "list done"  # read which images OUT already holds
WRITE_PART = "write part"  # write a part's rows where no reader looks (a staging file; JSONL: the append itself)
STAGE = "stage"  # rename a written part into its run's staging folder
FENCE = "fence check"  # the committer checks that its run is still the current one
COMMIT = "commit"  # make a staged part visible to readers
FINISH = "finish"  # clear staging leftovers
MANIFEST = "manifest"  # write the manifest

_hook = None


def step(which: str, /, **info) -> None:
    """Mark that the calling thread is about to take step ``which`` (``info``: what it acts on)."""
    if _hook is not None:
        _hook(which, info)


def set_step_hook(hook):
    """Install ``hook(name, info)`` (None removes it); returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous

"""Run lqae-encode's runs step by step, in any interleaving, and abandon a run at any step as SIGKILL would.

The outputs and the workers' staging call ``lqae_sklearn.encoding._steps.step`` before
each step that reads what OUT holds or changes it (claim, list done, write part,
stage, fence check, commit, finish, manifest). The harness installs a hook there:
each *actor* (a run's driver, or a straggler worker of a killed run) runs in its own
thread and stops at every step until the scheduler lets it take that one step.
Only one actor moves at a time, so a schedule (which actor takes the next step) is
replayed exactly.

A SIGKILL of an actor at a step is simulated by never letting it go on: it takes
no further step, and its lock is released, as the kernel drops the locks of a dead
process. (After the schedule has been checked, the harness unwinds the thread with
:class:`Abandoned`; what its ``finally`` blocks do then goes to a folder nobody
looks at any more.)

:func:`straggler_schedules` enumerates every merge of a straggler's steps into the
steps of a new run, with the new run killed at each of its steps (and a further
run completing the work) or not killed, with :func:`itertools.combinations_with_replacement`.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import numpy as np

from lqae_sklearn.encoding import _steps

NEVER = "never"  # a straggler position: killed before it took this step


class Abandoned(BaseException):
    """Unwinds an abandoned actor's thread after its schedule was checked (never caught by the code)."""


class FakeTokenizer:
    """Stands in for a fitted ``LQAETokenizer``: nine ids that depend on every pixel, in microseconds."""

    model_ = None

    def encode(self, images, outputs=("ids", "text")):
        flat = np.asarray(images).reshape(len(images), -1).astype(np.int64)
        ids = (flat[:, :9] * 31 + flat.sum(axis=1, keepdims=True)) % 30522
        values = {"ids": ids, "text": [" ".join(f"w{i}" for i in row) for row in ids],
                  "embeddings": ids.astype(np.float32) / 30522}
        return {name: values[name] for name in outputs}


_current = threading.local()


def _hook(which, info):
    actor = getattr(_current, "actor", None)
    if actor is not None:  # code outside the harness's actors (a clean reference run) is not paused
        actor.wait_at(which, info)


class Actor:
    """``target()`` in a thread of its own that pauses at every step until the scheduler says go."""

    def __init__(self, name: str, target):
        self.name = name
        self.target = target
        self.steps: list[str] = []  # the steps it took, in order
        self.at = None  # the step it waits at
        self.info = {}  # what that step acts on
        self.finished = False
        self.killed = False
        self.result = None
        self.error = None
        self._outputs = []  # outputs it acted on: their locks die with it
        self._released = False
        self._go = threading.Semaphore(0)
        self._arrived = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, name=f"harness-{name}", daemon=True)

    def _main(self):
        _current.actor = self
        try:
            self.result = self.target()
        except Abandoned:
            pass
        except BaseException as exc:  # noqa: BLE001 - the schedule's check decides whether it was allowed
            self.error = exc
        finally:
            self.finished = True
            self.at = None
            self._arrived.release()

    def wait_at(self, which, info):
        if self._released:
            raise Abandoned
        output = info.get("output")
        if output is not None and all(output is not o for o in self._outputs):
            self._outputs.append(output)
        self.at, self.info = which, info
        self._arrived.release()
        self._go.acquire()
        if self._released:
            raise Abandoned

    def start(self) -> "Actor":
        """Run up to the first step (or to the end)."""
        self._thread.start()
        self._arrived.acquire()
        return self

    def advance(self) -> None:
        """Take the step it waits at, and run up to the next one (or to the end)."""
        assert not self.finished and not self.killed, self.name
        self.steps.append(self.at)
        self._go.release()
        self._arrived.acquire()

    def kill(self) -> None:
        """SIGKILL: it takes no further step; the kernel closes its files, dropping its locks."""
        self.killed = True
        self.lose_locks()

    def lose_locks(self) -> None:
        """Drop the locks it holds while it lives on: a file system without locks, or an NFS lock lost
        while its holder hung."""
        for output in self._outputs:
            if getattr(output, "lock", None) is not None:
                output.lock.release()

    def unwind(self) -> None:
        """After the schedule: let a paused thread end (see the module notes)."""
        if not self.finished:
            self._released = True
            self._go.release()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), f"{self.name} did not unwind"


class Harness:
    """Installs the step hook for the duration of a ``with`` block."""

    def __enter__(self):
        self._previous = _steps.set_step_hook(_hook)
        return self

    def __exit__(self, *exc):
        _steps.set_step_hook(self._previous)
        return False


@dataclass(frozen=True)
class Schedule:
    """Kill the new run when it arrives at its ``kill_at``-th step (None: let it finish), and let the
    straggler take its i-th step just before the new runs' ``positions[i]``-th step (counting the
    steps of the killed run and of the run after it as one sequence; past the end: after them; NEVER:
    the straggler is killed instead)."""

    kill_at: int | None
    positions: tuple
    torn: bool = False  # kill_at is a JSONL append: half its bytes reach the file (a kill inside write())


@dataclass
class Outcome:
    runs: list  # the new runs' actors, in order (the last one completed)
    straggler: Actor | None


def play(schedule: Schedule, new_run, straggler=None, after_kill=None) -> Outcome:
    """Play ``schedule``: ``new_run()`` makes a run's target, ``straggler`` is a target or None;
    ``after_kill()`` (if given) checks the folder the moment a run was killed.

    The caller checks the folder, then calls :func:`unwind` on the outcome.
    """
    stray = Actor("straggler", straggler).start() if straggler is not None else None
    positions = list(schedule.positions)
    runs = [Actor("run-1", new_run()).start()]
    done = 0  # steps the new runs have taken

    def straggle(upto):
        while positions and positions[0] != NEVER and positions[0] <= upto and stray is not None and not stray.finished:
            positions.pop(0)
            stray.advance()

    while True:
        straggle(done)
        current = runs[-1]
        if current.finished:
            break
        if len(runs) == 1 and schedule.kill_at is not None and len(current.steps) == schedule.kill_at:
            if schedule.torn:
                _tear(current)
            current.kill()
            if after_kill is not None:
                after_kill()
            runs.append(Actor(f"run-{len(runs) + 1}", new_run()).start())
            continue
        current.advance()
        done += 1
    straggle(float("inf"))
    if stray is not None and not stray.finished:
        stray.kill()
    return Outcome(runs, stray)


def _tear(actor: Actor) -> None:
    """What a SIGKILL inside a JSONL append leaves: the first half of the bytes."""
    info = actor.info
    with open(info["path"], "ab") as f:
        f.write(info["data"][: len(info["data"]) // 2])


def unwind(outcome: Outcome) -> None:
    for actor in [*outcome.runs, *([outcome.straggler] if outcome.straggler else [])]:
        actor.unwind()


def count_steps(new_run, kill_at=None) -> tuple[list, list]:
    """The steps of a new run on its own (killed at ``kill_at``) and of the run completing after it."""
    outcome = play(Schedule(kill_at, ()), new_run)
    try:
        return [actor.steps for actor in outcome.runs], [actor.at for actor in outcome.runs]
    finally:
        unwind(outcome)


def straggler_schedules(steps_by_kill: dict, straggler_steps: int):
    """Every schedule: for each kill point (None: no kill) with ``steps_by_kill[kill]`` new-run steps in
    all, every placement of the straggler's steps among them (non-decreasing positions, a suffix of them
    possibly NEVER)."""
    for kill_at, total in steps_by_kill.items():
        slots = list(range(total + 1)) + [NEVER]
        for positions in itertools.combinations_with_replacement(slots, straggler_steps):
            yield Schedule(kill_at, positions)

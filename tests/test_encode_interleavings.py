"""Races found by tests: a straggler of a killed run against a rerun, in every interleaving of their steps.

The starting point: run 0 of ``lqae-encode`` (Parquet, one image per part) was
SIGKILLed after committing its first part, while a worker of it (a Ray actor,
:class:`~lqae_sklearn.encoding._ray.PartEncoder`) was still encoding the second. The
harness (``encode_harness.py``) then merges that straggler's steps (write its part,
stage it) into every position of a rerun's steps (claim, list done, manifest, write
part, stage, fence check, commit, finish, manifest), with the rerun itself SIGKILLed
at each of its steps and a third run completing the work, or not killed. After each
schedule the folder must hold every good image exactly once with the rows of a clean
run, a true manifest, one error record for the bad file, and a run counter that only
grew.

The same for JSONL, whose only writer is the driver: a rerun killed at each step
(inside an append too, leaving half a line) and a run completing after it.

The model is replaced by a fake with the same interface (the fields of every row are
compared with a clean run that uses the same fake), and fsync by a no-op: what is
tested is what each process sees, not what survives a power cut.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encode_harness import (
    NEVER, Actor, FakeTokenizer, Harness, Schedule, count_steps, play, straggler_schedules, unwind,
)
from lqae_sklearn.encoding import _local, _ray
from lqae_sklearn.encoding._outputs import OutputFenced
from lqae_sklearn.encoding._run import EXIT_SOME_FAILED, EncodeOptions, EncodeRun

pq = pytest.importorskip("pyarrow.parquet")

PREPROCESSING = {"image_size": 28, "color_mode": "L", "resample": "bilinear", "pixel_range": [0.0, 1.0]}


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(_local, "load_tokenizer", lambda params: FakeTokenizer())
    monkeypatch.setattr(_ray, "load_tokenizer", lambda params: FakeTokenizer())
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture
def scratch(tmp_path):
    """A folder for the many small folders of the schedules: in memory (tmpfs) where there is one, since
    thousands of renames and fsyncs of directories take seconds on a disk, else ``tmp_path``."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        folder = tempfile.mkdtemp(prefix="lqae-interleavings-", dir="/dev/shm")
        yield Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("interleavings") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / name)
    (root / "bad.png").write_bytes(b"not an image")
    return root


def runner(corpus, out):
    """A factory of new runs on ``out`` (a folder: Parquet; a .jsonl file: JSONL): one image per batch and per
    part, so that each image gets steps of its own."""
    options = EncodeOptions(images=(str(corpus),), out=str(out), part_size=1, batch_size=1, workers=0,
                            progress=False)
    return lambda: (lambda: EncodeRun(options, echo=lambda message: None).main())


def row_key(row) -> bytes:
    return row["path"].encode()


def parquet_rows(folder) -> dict:
    rows = pq.read_table(folder).to_pylist()
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)), f"an image is in {folder} twice: {sorted(keys)}"
    return {row_key(r): (r["ids"], r["text"]) for r in rows}


def check_manifest(folder, expected_rows=None) -> None:
    """If the manifest says complete, it lists exactly the visible parts, which hold every good image once."""
    path = folder / "_manifest.json"
    if not path.exists():
        return
    manifest = json.loads(path.read_text())
    if not manifest["complete"]:
        return
    parts = sorted(p.name for p in folder.glob("part-*.parquet"))
    assert [p["file"] for p in manifest["parts"]] == parts, "the manifest does not list the visible parts"
    assert [p["rows"] for p in manifest["parts"]] == [pq.read_metadata(folder / p).num_rows for p in parts]
    rows = parquet_rows(folder)
    assert manifest["rows"] == len(rows)
    if expected_rows is not None:
        assert rows == expected_rows, "complete: true, but images are missing or differ"


def test_a_straggler_in_every_interleaving_with_a_killed_and_a_completed_rerun(scratch, corpus, fake_model):
    tmp_path = scratch
    started = time.perf_counter()
    clean = tmp_path / "clean"
    assert runner(corpus, f"{clean}/")()() == EXIT_SOME_FAILED  # no actor: the hook lets it through
    expected = parquet_rows(clean)
    bad = str(corpus / "bad.png")
    assert sorted(expected) == [str(corpus / n).encode() for n in ("a.png", "b.png")]

    with Harness():
        # Run 0, killed as it was about to write its second part; its folder is kept as it was then.
        killed = tmp_path / "killed"
        first = Actor("run-0", runner(corpus, f"{killed}/")()).start()
        while not (first.at == "write part" and first.steps.count("write part") == 1):
            first.advance()
        first.kill()
        state = tmp_path / "state"
        shutil.copytree(killed, state)
        first.unwind()
        assert [p.name for p in state.glob("part-*.parquet")] == ["part-00000-000000.parquet"]
        assert (state / "_runs" / "00000").is_dir()

        def rerun_target(folder):
            return runner(corpus, f"{folder}/")

        def straggler_target(folder):
            """Run 0's worker, finishing the part with b.png: the real PartEncoder, staging into run 0's folder."""
            encoder = _ray.PartEncoder({}, ("ids", "text"), False, os.fspath(folder / "_runs" / "00000"))
            part = _ray.decode_part({"part": "part-00000-000001.parquet",
                                     "paths": [os.fsencode(corpus / "b.png")]}, PREPROCESSING)
            batch = {"part": np.array([part["part"]]), "paths": [part["paths"]], "reasons": [part["reasons"]],
                     "images": [part["images"]]}
            return lambda: encoder(batch)

        # How many steps the new runs take, for each kill point, without the straggler.
        probe = tmp_path / "probe"
        shutil.copytree(state, probe)
        (alone,), _ = count_steps(rerun_target(probe))
        assert alone == ["claim", "list done", "manifest", "write part", "stage", "fence check", "commit",
                         "fence check", "finish", "manifest"]
        steps_by_kill = {None: len(alone)}
        for kill_at in range(len(alone)):
            shutil.rmtree(probe)
            shutil.copytree(state, probe)
            steps, _ = count_steps(rerun_target(probe), kill_at)
            steps_by_kill[kill_at] = sum(map(len, steps))

        schedules = list(straggler_schedules(steps_by_kill, straggler_steps=2))
        for number, schedule in enumerate(schedules):
            folder = tmp_path / f"s{number}"
            shutil.copytree(state, folder)
            outcome = play(schedule, rerun_target(folder), straggler_target(folder),
                           after_kill=lambda: check_manifest(folder))
            try:
                where = f"schedule {number} {schedule}: runs {[a.steps for a in outcome.runs]}, straggler " \
                        f"{outcome.straggler.steps}"
                last = outcome.runs[-1]
                assert last.error is None and last.result == EXIT_SOME_FAILED, (where, last.error)
                assert parquet_rows(folder) == expected, where
                manifest = json.loads((folder / "_manifest.json").read_text())
                assert manifest["complete"] is True, where
                check_manifest(folder, expected)
                errors = [json.loads(line) for line in (folder / "_errors.jsonl").read_text().splitlines()]
                assert [e["path"] for e in errors] == [bad], where
                claims = sum(actor.steps.count("claim") for actor in outcome.runs)
                assert (folder / "_run").read_text() == f"{claims}\n", where  # run 0, then one more per claim
                assert not (folder / "_runs").exists(), where
                assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], where
                stray = outcome.straggler
                assert stray.error is None or isinstance(stray.error, OutputFenced), (where, stray.error)
            finally:
                unwind(outcome)
                shutil.rmtree(folder)

    # Every kill point plus no kill; for each, every placement of the straggler's two steps (write, stage)
    # among the new runs' steps, or never.
    expected_count = sum((total + 3) * (total + 2) // 2 for total in steps_by_kill.values())
    assert len(schedules) == expected_count
    assert sum(NEVER in s.positions for s in schedules) == sum(total + 2 for total in steps_by_kill.values())
    print(f"\nParquet: {len(schedules)} schedules ({len(steps_by_kill)} kill points) in "
          f"{time.perf_counter() - started:.1f} s")


def test_a_jsonl_rerun_killed_at_every_step_then_completed(scratch, corpus, fake_model):
    tmp_path = scratch
    started = time.perf_counter()
    clean = tmp_path / "clean.jsonl"
    assert runner(corpus, clean)()() == EXIT_SOME_FAILED
    expected = clean.read_bytes()
    assert expected.count(b"\n") == 2

    with Harness():
        killed = tmp_path / "killed.jsonl"
        first = Actor("run-0", runner(corpus, killed)()).start()
        while not (first.at == "write part" and first.steps.count("write part") == 1):
            first.advance()
        with open(killed, "ab") as f:  # killed inside its second append
            f.write(first.info["data"][:10])
        first.kill()
        state = tmp_path / "state"
        state.mkdir()
        for path in tmp_path.glob("killed.*"):
            shutil.copy(path, state / path.name)
        first.unwind()

        def rerun_target(folder):
            return runner(corpus, folder / "killed.jsonl")

        probe = tmp_path / "probe"
        shutil.copytree(state, probe)
        (alone,), _ = count_steps(rerun_target(probe))
        assert alone == ["claim", "list done", "write part", "finish"]
        schedules = [Schedule(None, ())]
        for kill_at, step in enumerate(alone):
            schedules.append(Schedule(kill_at, ()))
            if step == "write part":
                schedules.append(Schedule(kill_at, (), torn=True))

        for number, schedule in enumerate(schedules):
            folder = tmp_path / f"s{number}"
            shutil.copytree(state, folder)
            outcome = play(schedule, rerun_target(folder))
            try:
                where = f"schedule {number} {schedule}: runs {[a.steps for a in outcome.runs]}"
                last = outcome.runs[-1]
                assert last.error is None and last.result == EXIT_SOME_FAILED, (where, last.error)
                assert (folder / "killed.jsonl").read_bytes() == expected, where
                errors = [json.loads(line) for line in (folder / "killed.errors.jsonl").read_text().splitlines()]
                assert [e["path"] for e in errors] == [str(corpus / "bad.png")], where
            finally:
                unwind(outcome)
                shutil.rmtree(folder)
    assert len(schedules) == len(alone) + 2
    print(f"\nJSONL: {len(schedules)} schedules in {time.perf_counter() - started:.1f} s")

"""lqae-encode --format parquet on the local engine: the same rows as JSONL, parts committed whole, resume.

Real files and real processes throughout: the bad-file matrix of the JSONL tests, a
run SIGKILLed between parts, and readers (pyarrow, pandas) reading the folder.
"""

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pq = pytest.importorskip("pyarrow.parquet")

from test_cli_encode import (  # noqa: E402 - helpers of the JSONL tests
    ENCODE, build_matrix, key_of, load_records, record_tokens, run_encode,
)

pytest_plugins = ("encode_fixtures",)  # checkpoint, fashion, corpus


def parquet_rows(folder) -> list[dict]:
    """Every committed row of a Parquet output folder, as the JSONL records would be."""
    table = pq.read_table(folder)  # pyarrow skips "_..." and ".part-..." files, as every reader does
    rows = table.to_pylist()
    for row in rows:
        if row.get("path_bytes_b64") is None:
            row.pop("path_bytes_b64", None)
    return rows


def row_keys(rows) -> list[bytes]:
    return [key_of(r) for r in rows]


def test_parquet_holds_what_jsonl_holds_bad_files_and_all(tmp_path, checkpoint, fashion):
    good, bad = build_matrix(tmp_path / "corpus", fashion)
    common = ("-c", checkpoint, "-b", "4", "-j", "2", "--labels-from-dirs", "-o", "ids,text,embeddings")
    jsonl = run_encode(tmp_path / "corpus", tmp_path / "out.jsonl", *common)
    parquet = run_encode(tmp_path / "corpus", tmp_path / "out.parquet", "--part-size", "5", *common)
    assert jsonl.returncode == parquet.returncode == 1, parquet.stderr.decode()
    assert f"{len(good)} encoded, {len(bad)} failed" in parquet.stderr.decode()

    records = {key_of(r): r for r in load_records(tmp_path / "out.jsonl")}
    rows = parquet_rows(tmp_path / "out.parquet")
    assert sorted(row_keys(rows)) == sorted(good) == sorted(records)
    for row in rows:
        record = records[key_of(row)]
        assert row["ids"] == record["ids"] and row["text"] == record["text"] and row["label"] == record["label"]
        np.testing.assert_array_equal(np.float32(row["embeddings"]), np.float32(record["embeddings"]))
    odd = next(r for r in rows if "path_bytes_b64" in r)
    assert base64.b64decode(odd["path_bytes_b64"]).endswith(b"caf\xe9.png")

    schema = pq.read_schema(next((tmp_path / "out.parquet").glob("part-*.parquet")))
    import pyarrow as pa

    tokens = record_tokens(checkpoint)
    assert pa.types.is_fixed_size_list(schema.field("ids").type) and schema.field("ids").type.list_size == tokens
    assert schema.field("ids").type.value_type == pa.int32()
    assert schema.field("embeddings").type.value_type == pa.float32()

    # Same error records, same settings file, in the folder.
    errors = load_records(tmp_path / "out.parquet" / "_errors.jsonl")
    assert errors == load_records(tmp_path / "out.errors.jsonl")
    assert json.loads((tmp_path / "out.parquet" / "_meta.json").read_text()) == json.loads(
        (tmp_path / "out.meta.json").read_text())
    parts = sorted((tmp_path / "out.parquet").glob("part-*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts][:-1] == [5] * (len(parts) - 1)
    manifest = json.loads((tmp_path / "out.parquet" / "_manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == len(good)
    assert [p["file"] for p in manifest["parts"]] == [p.name for p in parts]

    # A rerun retries the bad files only and writes no part.
    again = run_encode(tmp_path / "corpus", tmp_path / "out.parquet", "--part-size", "5", *common)
    assert again.returncode == 1 and f"0 encoded, {len(good)} already in" in again.stderr.decode()
    assert sorted((tmp_path / "out.parquet").glob("part-*.parquet")) == parts


def test_sigkill_between_parts_resumes_exactly_once(tmp_path, corpus, checkpoint):
    out = tmp_path / "tokens"
    args = ENCODE + [str(corpus), str(out) + "/", "-c", checkpoint, "-b", "2", "-j", "1", "--part-size", "6",
                     "--labels-from-dirs"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert process.poll() is None, "finished before it could be killed; give it more work"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        committed = parquet_rows(out)  # a reader in the middle of the run sees whole parts only
        assert len(committed) % 6 == 0 and len(set(row_keys(committed))) == len(committed)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    first = {p.name for p in out.glob("part-*.parquet")}
    assert not json.loads((out / "_manifest.json").read_text())["complete"]

    resumed = run_encode(corpus, str(out) + "/", "-c", checkpoint, "-b", "2", "-j", "1", "--part-size", "6",
                         "--labels-from-dirs")
    assert resumed.returncode == 0, resumed.stderr.decode()
    rows = parquet_rows(out)
    expected = {os.fsencode(p) for p in map(str, corpus.rglob("*.png"))}
    assert len(rows) == len(set(row_keys(rows))) == len(expected)
    assert set(row_keys(rows)) == expected
    assert first <= {p.name for p in out.glob("part-*.parquet")}  # committed parts are kept, not redone
    assert {p.name.split("-")[1] for p in out.glob("part-*.parquet")} == {"00000", "00001"}
    assert not list(out.glob(".part-*")), "a killed writer's temporary file was left behind"
    assert json.loads((out / "_manifest.json").read_text())["complete"] is True


def test_parquet_output_refuses_what_it_cannot_resume(tmp_path, corpus, checkpoint):
    out = tmp_path / "tokens.parquet"
    first = run_encode(corpus, out, "-c", checkpoint)
    assert first.returncode == 0, first.stderr.decode()
    other = run_encode(corpus, out, "-c", checkpoint, "-o", "ids")
    assert other.returncode == 2 and "other settings" in other.stderr.decode()
    assert (out / "_run").read_text() == "0\n"  # a refused run fences nobody (a run may be going on)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.csv").write_text("a,b\n")
    refused = run_encode(corpus, str(mixed) + "/", "-c", checkpoint)
    assert refused.returncode == 2 and "notes.csv" in refused.stderr.decode()
    assert sorted(p.name for p in mixed.iterdir()) == ["notes.csv"]

    to_stdout = run_encode(corpus, "-", "-c", checkpoint, "--format", "parquet")
    assert to_stdout.returncode == 2 and "stdout" in to_stdout.stderr.decode()
    ray_jsonl = run_encode(corpus, tmp_path / "x.jsonl", "-c", checkpoint, "--engine", "ray")
    assert ray_jsonl.returncode == 2 and "Parquet" in ray_jsonl.stderr.decode()
    assert not (tmp_path / "x.jsonl").exists()


def test_an_output_folder_inside_the_images_is_not_encoded(tmp_path, corpus, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(corpus.rglob("*.png"))[:6]:
        (images / path.name).write_bytes(path.read_bytes())
    for _ in range(2):  # the second run walks a folder that now holds the output
        result = run_encode(images, images / "tokens.parquet", "-c", checkpoint)
        assert result.returncode == 0, result.stderr.decode()
    assert len(parquet_rows(images / "tokens.parquet")) == 6
    assert "6 already in" in result.stderr.decode() and "0 failed" in result.stderr.decode()


def small_folder(root, fashion, count) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(fashion[0][i]).save(root / f"img{i}.png")
    return root


def decoded_part(name, paths) -> dict:
    """A part as Ray Data hands it to the encoder actors (``decode_part``'s output, batch of one)."""
    from lqae_sklearn.encoding._ray import decode_part

    part = decode_part({"part": name, "paths": [os.fsencode(p) for p in paths]},
                       {"image_size": 28, "color_mode": "L"})
    return {key: np.array([value]) if key == "part" else [value] for key, value in part.items()}


def test_ray_workers_hand_the_driver_each_images_original_size_for_the_domain_check(tmp_path, checkpoint):
    """The Ray stages (decode task, encoder actor, driver) carry each image's size and mode as its file holds it: the
    driver's training-domain warning sees a photo as the photo it is, not as the 28 x 28 input it became."""
    from sklearn.datasets import load_sample_images

    from lqae_sklearn.encoding._encoder import tokenizer_params
    from lqae_sklearn.encoding._ray import PartEncoder, _staged_parts

    Image.fromarray(load_sample_images().images[0]).save(tmp_path / "photo.png")
    Image.new("L", (28, 28)).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    staging = tmp_path / "_runs" / "00000"
    staging.mkdir(parents=True)
    worker = PartEncoder(tokenizer_params(checkpoint, ("ids",), 3, None, 1, "cpu"), ("ids",), False, os.fspath(staging))
    summary = worker(decoded_part("part-00000-000000.parquet",
                                  [tmp_path / "photo.png", tmp_path / "bad.png", tmp_path / "small.png"]))

    class Dataset:  # what the driver iterates: Ray Data's rows of the encoder's summaries
        def iter_rows(self):
            yield {key: value[0] for key, value in summary.items()}

    (part,) = _staged_parts(Dataset())
    assert part.originals == [(427, 640, "RGB"), (28, 28, "L")]
    assert [os.fsdecode(key) for key in part.keys] == [str(tmp_path / "photo.png"), str(tmp_path / "small.png")]
    assert [path for path, _ in part.failures] == [str(tmp_path / "bad.png")]


def test_a_killed_runs_worker_never_changes_what_the_rerun_commits(tmp_path, checkpoint, fashion):
    """Issue 20, item 1: a worker of a killed run finishing its part before the rerun claims the folder,
    between its claim and its listing of the done images (where main lost the image: counted as done, then
    deleted as a straggler), or after the rerun's finish (where main left rows that readers saw twice and the
    manifest did not list). The worker is the real Ray actor class, staging into its run's folder; only the
    rerun's driver commits, so none of its writes ever becomes visible."""
    from encode_harness import Actor, Harness

    from lqae_sklearn.encoding import encode_dataset
    from lqae_sklearn.encoding._encoder import tokenizer_params
    from lqae_sklearn.encoding._outputs import OutputFenced
    from lqae_sklearn.encoding._ray import PartEncoder

    images = small_folder(tmp_path / "images", fashion, 3)
    out = tmp_path / "tokens"

    def run():
        return encode_dataset(images, out, checkpoint=checkpoint, format="parquet", part_size=1, batch_size=1,
                              device="cpu")

    clean = encode_dataset(images, tmp_path / "clean", checkpoint=checkpoint, format="parquet", part_size=1,
                           device="cpu")
    assert clean["encoded"] == 3
    with Harness():
        first = Actor("run 0", run).start()  # killed after committing img0, about to write img1's part
        while not (first.at == "write part" and "commit" in first.steps):
            first.advance()
        first.kill()
        worker = PartEncoder(tokenizer_params(checkpoint, ("ids", "text"), 3, None, 1, "cpu"), ("ids", "text"),
                             False, os.fspath(out / "_runs" / "00000"))
        late = decoded_part("part-00000-000001.parquet", [images / "img1.png"])

        rerun = Actor("run 1", run).start()
        assert rerun.at == "claim"
        worker(late)  # before the claim: staged where nothing reads, and renamed away by the claim
        assert (out / "_runs" / "00000" / "part-00000-000001.parquet").exists()
        rerun.advance()
        assert rerun.at == "list done" and not (out / "_runs" / "00000").exists()
        with pytest.raises(OutputFenced, match="a newer run has started"):
            worker(late)  # between the claim and the listing of what is done
        while not rerun.finished:
            rerun.advance()
        with pytest.raises(OutputFenced, match="a newer run has started"):
            worker(late)  # after the rerun finished
        first.unwind()
        rerun.unwind()

    assert rerun.error is None and rerun.result == {"encoded": 2, "already": 1, "failed": 0, "interrupted": False}
    rows = parquet_rows(out)
    assert sorted(row_keys(rows)) == sorted(row_keys(parquet_rows(tmp_path / "clean")))  # each image once
    assert {r["path"]: r["ids"] for r in rows} == {r["path"]: r["ids"] for r in parquet_rows(tmp_path / "clean")}
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == 3
    assert [p["file"] for p in manifest["parts"]] == sorted(p.name for p in out.glob("part-*.parquet"))
    assert not (out / "_runs").exists()


def test_the_fence_stops_a_driver_that_lost_its_lock(tmp_path, checkpoint, fashion):
    """Where the lock does not hold (a file system without locks, an NFS lock lost while its driver hung),
    the run fence is what keeps a superseded driver from undoing a newer run: here the old driver wakes up
    to finish while the newer run has a part staged, and would remove it (and rewrite the manifest and the
    errors) if its fence check let it."""
    from encode_harness import Actor, Harness

    from lqae_sklearn.encoding import EncodeError, encode_dataset

    images = small_folder(tmp_path / "images", fashion, 3)
    out = tmp_path / "tokens"
    (images / "img2.png").rename(tmp_path / "img2.png")  # the newer run will find one more image

    def run():
        return encode_dataset(images, out, checkpoint=checkpoint, format="parquet", part_size=1, batch_size=1,
                              device="cpu")

    with Harness():
        stale = Actor("run 0", run).start()
        while stale.steps.count("commit") < 2:
            stale.advance()
        assert stale.at == "fence check"  # before finishing: errors file, staging, manifest
        stale.lose_locks()
        (tmp_path / "img2.png").rename(images / "img2.png")
        newer = Actor("run 1", run).start()
        while newer.at != "commit":  # claimed the folder, staged img2's part, passed its own fence check
            newer.advance()
        while not stale.finished:
            stale.advance()
        while not newer.finished:
            newer.advance()
        stale.unwind()
        newer.unwind()

    assert newer.error is None and newer.result == {"encoded": 1, "already": 2, "failed": 0, "interrupted": False}
    assert isinstance(stale.error, EncodeError), stale.error
    assert "run 1 has claimed this folder since this run (run 0) started" in str(stale.error)
    rows = parquet_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(images / f"img{i}.png") for i in range(3))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is True
    assert [p["file"] for p in manifest["parts"]] == sorted(p.name for p in out.glob("part-*.parquet"))
    assert (out / "_run").read_text() == "1\n"


def test_the_run_counter_only_grows(tmp_path, checkpoint, fashion):
    """Issue 20, item 2: a folder holding only ``_run = 7`` (its parts removed, or never written) goes on
    at 8, and so does --overwrite: an earlier run's number never comes back, so no stale worker of it can
    pass the fence again."""
    from lqae_sklearn.encoding import encode_dataset

    images = small_folder(tmp_path / "images", fashion, 2)
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "_run").write_text("7\n")
    encode_dataset(images, out, checkpoint=checkpoint, format="parquet", part_size=1, device="cpu")
    assert (out / "_run").read_text() == "8\n"
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00008-000000.parquet", "part-00008-000001.parquet"]
    encode_dataset(images, out, checkpoint=checkpoint, format="parquet", part_size=1, device="cpu", overwrite=True)
    assert (out / "_run").read_text() == "9\n"
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00009-000000.parquet", "part-00009-000001.parquet"]
    assert len(parquet_rows(out)) == 2


def test_what_a_kill_leaves_is_cleaned_and_not_taken_for_strangers(tmp_path, checkpoint, fashion):
    """A SIGKILL inside an atomic write leaves its temporary file ("._manifest.json.x1y2"); a staged part of a
    killed run is left in its staging folder. The rerun resumes (main refused the folder as holding files
    lqae-encode did not write) and removes both."""
    from lqae_sklearn.encoding import encode_dataset

    images = small_folder(tmp_path / "images", fashion, 2)
    out = tmp_path / "tokens"
    encode_dataset(images, out, checkpoint=checkpoint, format="parquet", part_size=1, device="cpu")
    (out / "._manifest.json.x1y2").write_text("{")
    (out / "._run.abc").write_text("")
    (out / "_runs" / "00000").mkdir(parents=True)
    (out / "_runs" / "00000" / "part-00000-000005.parquet").write_bytes(b"staged, never committed")
    again = encode_dataset(images, out, checkpoint=checkpoint, format="parquet", part_size=1, device="cpu")
    assert again["already"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "_lock", "_manifest.json", "_meta.json", "_run", "part-00000-000000.parquet", "part-00000-000001.parquet"]


def test_a_failed_run_never_says_complete(tmp_path, checkpoint, fashion):
    """A run that stops on an error (here a layer name the checkpoint does not have, found when the model is
    loaded for the first batch) leaves a manifest saying "complete": false (main wrote true)."""
    from lqae_sklearn.encoding import EncodeError, encode_dataset

    images = small_folder(tmp_path / "images", fashion, 2)
    out = tmp_path / "tokens"
    with pytest.raises(EncodeError, match="lm.99"):
        encode_dataset(images, out, checkpoint=checkpoint, format="parquet", outputs=("ids", "embeddings"),
                       layers="lm.99", device="cpu")
    assert json.loads((out / "_manifest.json").read_text())["complete"] is False
    assert not list(out.glob("part-*"))


def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_runs_lock_dies_with_it(tmp_path, corpus,
                                                                                       checkpoint):
    out = tmp_path / "tokens"
    args = [corpus, str(out) + "/", "-c", checkpoint, "-b", "2", "-j", "1", "--part-size", "2"]
    first = subprocess.Popen(ENCODE + [os.fspath(a) for a in args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("part-*.parquet")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        # Stopped mid-run, the first run still holds its lock but cannot finish while the second one starts up
        # (on a fast machine it otherwise could, and the second would rightly find every image done).
        first.send_signal(signal.SIGSTOP)
        second = run_encode(*args)
        assert second.returncode == 2, second.stderr.decode()
        assert "another lqae-encode run is writing" in second.stderr.decode()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    resumed = run_encode(*args)  # the kernel dropped the killed run's lock
    assert resumed.returncode == 0, resumed.stderr.decode()
    rows = parquet_rows(out)
    assert len(rows) == len(set(row_keys(rows))) == len(list(corpus.rglob("*.png")))

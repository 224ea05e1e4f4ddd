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

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet")

from test_cli_encode import (  # noqa: E402 - fixtures and helpers of the JSONL tests
    ENCODE, build_matrix, checkpoint, corpus, fashion, key_of, load_records, run_encode,  # noqa: F401
)


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

    assert pa.types.is_fixed_size_list(schema.field("ids").type) and schema.field("ids").type.list_size == 49
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


def test_a_killed_runs_late_commit_is_fenced_and_dropped(tmp_path):
    """A worker of a killed run may still rename a part into place after a new run read what is done:
    the new run's fence refuses it, and a part that slipped past the fence is removed at the end."""
    import pyarrow as pa

    from lqae_sklearn.encoding._outputs import ParquetOutput, commit_part

    def part(paths):
        return pa.table({"path": paths, "path_bytes_b64": pa.array([None] * len(paths), pa.string())})

    folder = tmp_path / "tokens"
    first = ParquetOutput(str(folder))
    first.prepare()
    first.claim()
    commit_part(part(["a.png"]), first.part_path(first.run, 0))

    second = ParquetOutput(str(folder))  # the rerun after the kill
    second.prepare()
    second.claim()
    assert second.run == 1 and (folder / "_run").read_text() == "1\n"
    assert second.done_keys() == {b"a.png"}
    commit_part(part(["b.png"]), second.part_path(0, 1))  # the old worker, after the rerun read the parts
    (folder / ".part-00000-000002.parquet.x1").write_bytes(b"half a part")  # and one it was still writing
    commit_part(part(["b.png"]), second.part_path(second.run, 0))  # the rerun encodes b.png itself
    second.finish(complete=True)

    assert sorted(p.name for p in folder.iterdir() if "part" in p.name) == [
        "part-00000-000000.parquet", "part-00001-000000.parquet"]
    assert sorted(pq.read_table(folder)["path"].to_pylist()) == ["a.png", "b.png"]
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["complete"] is True

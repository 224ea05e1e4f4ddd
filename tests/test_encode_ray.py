"""lqae-encode --engine ray on a local Ray cluster: same rows as the local engine, exactly once when a
worker or the driver is killed, and LQAETokenizer inside a user's own Ray Data pipeline.

One cluster (``ray.init(num_cpus=4)`` in this process) serves the whole module and is shut
down at its end; each ``lqae-encode`` runs as its own driver process joining it, so a test
can SIGKILL the driver, or one of the encoder actors, as a crash or the OOM killer would.
"""

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

from test_cli_encode import ENCODE, key_of, load_records, run_encode  # noqa: E402
from test_encode_parquet import parquet_rows, row_keys  # noqa: E402

pytest_plugins = ("encode_fixtures",)  # checkpoint, fashion


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory, fashion):
    images, labels = fashion
    root = tmp_path_factory.mktemp("ray-corpus") / "images"
    for i in range(96):
        folder = root / f"class{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    (root / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def good_keys(root) -> set[bytes]:
    return {os.fsencode(p) for p in map(str, Path(root).rglob("*.png")) if not p.endswith("broken.png")}


def encoder_pids() -> set[int]:
    """PIDs of the encoder actors (Ray names their processes after the stage)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"PartEncoder" in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def wait_for_parts(out: Path, count: int, process, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("part-*.parquet"))) < count:
        assert process.poll() is None, "the run finished before it could be interrupted; give it more parts"
        assert time.monotonic() < deadline, "no parts committed in time"
        time.sleep(0.02)


def assert_exactly_once(out: Path, root) -> list[dict]:
    rows = parquet_rows(out)
    keys = row_keys(rows)
    assert len(keys) == len(set(keys)), "an image was written twice"
    assert set(keys) == good_keys(root), "an image was lost"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not (out / "_runs").exists(), "a staging folder was left behind"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == len(rows)
    assert [p["file"] for p in manifest["parts"]] == sorted(p.name for p in out.glob("part-*.parquet"))
    return rows


def test_ray_engine_writes_what_the_local_engine_writes(tmp_path, images_dir, checkpoint, ray_address):
    common = ("-c", checkpoint, "--labels-from-dirs", "-o", "ids,text,embeddings", "--part-size", "16")
    local = run_encode(images_dir, f"{tmp_path}/local/", *common)
    on_ray = run_encode(images_dir, f"{tmp_path}/ray/", "--engine", "ray", "--ray-address", ray_address,
                        "--actors", "2", *common)
    jsonl = run_encode(images_dir, tmp_path / "out.jsonl", *common)
    for result in (local, on_ray, jsonl):
        assert result.returncode == 1, result.stderr.decode()  # the one broken file
        assert "96 encoded, 1 failed" in result.stderr.decode()

    ray_rows = {key_of(r): r for r in assert_exactly_once(tmp_path / "ray", images_dir)}
    local_rows = {key_of(r): r for r in assert_exactly_once(tmp_path / "local", images_dir)}
    records = {key_of(r): r for r in load_records(tmp_path / "out.jsonl")}
    assert ray_rows.keys() == local_rows.keys() == records.keys()
    for key, row in ray_rows.items():
        for other in (local_rows[key], records[key]):
            assert row["ids"] == other["ids"] and row["text"] == other["text"] and row["label"] == other["label"]
            np.testing.assert_array_equal(np.float32(row["embeddings"]), np.float32(other["embeddings"]))
    assert load_records(tmp_path / "ray" / "_errors.jsonl") == load_records(tmp_path / "local" / "_errors.jsonl")
    assert "broken.png" in load_records(tmp_path / "ray" / "_errors.jsonl")[0]["path"]


def start_ray_run(images_dir, out, checkpoint, ray_address, *extra):
    args = ENCODE + [str(images_dir), str(out) + "/", "-c", checkpoint, "--engine", "ray",
                     "--ray-address", ray_address, "--part-size", "2", "--labels-from-dirs", *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_killed_encoder_actor_loses_nothing_and_duplicates_nothing(tmp_path, images_dir, checkpoint,
                                                                     ray_address):
    out = tmp_path / "tokens"
    process = start_ray_run(images_dir, out, checkpoint, ray_address, "--actors", "1")
    try:
        wait_for_parts(out, 3, process)
        victims = encoder_pids()
        assert len(victims) == 1, victims
        os.kill(victims.pop(), signal.SIGKILL)
        before = {p.name for p in out.glob("part-*.parquet")}
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr.decode()  # 1: the broken file; nothing else failed
    assert "96 encoded, 1 failed" in stderr.decode()
    assert len(before) < 48, "the actor was killed after the last part; nothing was left to redo"
    assert_exactly_once(out, images_dir)


def test_a_killed_driver_resumes_exactly_once(tmp_path, images_dir, checkpoint, ray_address):
    out = tmp_path / "tokens"
    process = start_ray_run(images_dir, out, checkpoint, ray_address, "--actors", "1")
    try:
        wait_for_parts(out, 3, process)
    finally:
        process.kill()
        process.wait()
    committed = parquet_rows(out)
    assert 0 < len(committed) < 96 and len(set(row_keys(committed))) == len(committed)

    # Rerun at once: the killed run's actor may still be finishing a part; it must not commit it now.
    resumed = run_encode(images_dir, str(out) + "/", "-c", checkpoint, "--engine", "ray", "--ray-address",
                         ray_address, "--part-size", "2", "--labels-from-dirs", "--actors", "1")
    assert resumed.returncode == 1, resumed.stderr.decode()
    stderr = resumed.stderr.decode()
    done_before = int(stderr.split(" already in")[0].split(", ")[-1])
    assert done_before >= len(committed)
    assert f"{96 - done_before} encoded" in stderr
    rows = assert_exactly_once(out, images_dir)
    assert {p.name.split("-")[1] for p in out.glob("part-*.parquet")} == {"00000", "00001"}
    assert len(rows) == 96


def test_tokenizer_runs_inside_a_users_ray_data_pipeline(checkpoint, fashion, ray_address):
    from lqae_sklearn import LQAETokenizer
    from lqae_sklearn.encoding import BatchEncoder

    images = fashion[0][:40]
    tokenizer = LQAETokenizer(checkpoint=checkpoint, output="text", device="cpu").fit()
    assert len(pickle.dumps(tokenizer)) < 20_000  # what Ray ships to each actor: no weights

    dataset = ray.data.from_numpy(images).rename_columns({"data": "image"})
    encoded = dataset.map_batches(
        BatchEncoder, fn_constructor_args=(tokenizer,), fn_constructor_kwargs={"outputs": ("ids", "text")},
        batch_size=16, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
    ).take_all()
    assert [row["text"] for row in encoded] == tokenizer.transform(images)
    # ids and text come from one pass at the text output's grid ("auto": the checkpoint's recommendation).
    np.testing.assert_array_equal(np.stack([row["ids"] for row in encoded]),
                                  tokenizer.encode(images, ("ids",))["ids"])


def test_settings_the_cluster_cannot_run_are_usage_errors(tmp_path, images_dir, checkpoint, ray_address):
    too_many = run_encode(images_dir, f"{tmp_path}/a/", "-c", checkpoint, "--engine", "ray", "--ray-address",
                          ray_address, "--actors", "4")
    assert too_many.returncode == 2 and "leave none for decoding" in too_many.stderr.decode()
    bad_layer = run_encode(images_dir, f"{tmp_path}/b/", "-c", checkpoint, "--engine", "ray", "--ray-address",
                           ray_address, "-o", "ids,embeddings", "--layers", "lm.99")
    assert bad_layer.returncode == 2 and "lm.99" in bad_layer.stderr.decode()
    assert "Traceback" not in too_many.stderr.decode() + bad_layer.stderr.decode()
    assert not list(Path(tmp_path).rglob("part-*.parquet"))


def test_sigterm_stops_the_driver_cleanly_and_a_rerun_finishes(tmp_path, images_dir, checkpoint, ray_address):
    out = tmp_path / "tokens"
    process = start_ray_run(images_dir, out, checkpoint, ray_address, "--actors", "1")
    try:
        wait_for_parts(out, 2, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr.decode()
    assert "interrupted by SIGTERM" in stderr.decode() and "rerun to resume" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is False and 0 < manifest["rows"] < 96

    resumed = run_encode(images_dir, str(out) + "/", "-c", checkpoint, "--engine", "ray", "--ray-address",
                         ray_address, "--part-size", "2", "--labels-from-dirs", "--actors", "1")
    assert resumed.returncode == 1, resumed.stderr.decode()
    assert_exactly_once(out, images_dir)
    final = json.loads((out / "_manifest.json").read_text())
    assert final["complete"] is True and final["rows"] == 96

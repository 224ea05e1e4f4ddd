"""lqae-encode end to end: real files, real processes, real signals.

Covered: the bad-file matrix of issue #5, resume after Ctrl-C and SIGKILL (with a
torn last line), a concurrent reader, sharding, stdin paths and stdout, usage
errors, the crash-isolating decode pool and the file discovery rules.
"""

import base64
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lqae_sklearn.model import DEFAULT_CHECKPOINT, read_checkpoint_config
from lqae_sklearn.encoding._decode import WORKER_DIED, DecodePipeline, decode_file
from lqae_sklearn.encoding._discovery import Item, discover, in_shard
from lqae_sklearn.encoding._jsonl import iter_records, repair_torn_tail

from test_images import write_bilevel_png

pytest_plugins = ("encode_fixtures",)  # checkpoint, fashion, corpus

ENCODE = [sys.executable, "-m", "lqae_sklearn.cli.encode"]


def record_tokens(checkpoint) -> int:
    """Tokens per record with the default --token-grid (auto) and outputs (ids,text): the checkpoint's text grid."""
    config = read_checkpoint_config(checkpoint)
    grid = config.get("inference", {}).get("text_token_grid") or config["model"]["image_size"] // config["model"][
        "patch_size"]
    return grid * grid


def run_encode(*args, input=None, timeout=240):
    return subprocess.run(ENCODE + [os.fspath(a) for a in args], input=input, capture_output=True, timeout=timeout)


def load_records(path) -> list[dict]:
    return [record for _, record in iter_records(path)]


def key_of(record) -> bytes:
    if "path_bytes_b64" in record:
        return base64.b64decode(record["path_bytes_b64"])
    return record["path"].encode()


def complete_lines(path) -> list[bytes]:
    data = Path(path).read_bytes() if Path(path).exists() else b""
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


# ---------------------------------------------------------------------------------------------
# The bad-file matrix
# ---------------------------------------------------------------------------------------------
def build_matrix(root: Path, fashion) -> tuple[set, dict]:
    """Write good and bad files under ``root``; return (good paths, {bad path: reason fragment})."""
    images, _ = fashion
    good, bad = set(), {}

    def add_good(path):
        good.add(os.fsencode(path))

    (root / "good").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(images[i]).save(root / "good" / f"plain{i}.png")
        add_good(root / "good" / f"plain{i}.png")
    Image.fromarray(images[3].astype(np.uint16) * 257).save(root / "good" / "deep16.png")
    add_good(root / "good" / "deep16.png")
    Image.fromarray(images[4]).convert("CMYK").save(root / "good" / "cmyk.jpg")
    add_good(root / "good" / "cmyk.jpg")
    palette = Image.fromarray(images[5]).convert("P")
    palette.save(root / "good" / "palette_alpha.png", transparency=0)
    add_good(root / "good" / "palette_alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(images[6][:, :20])).save(root / "good" / "rotated.jpg", exif=exif)
    add_good(root / "good" / "rotated.jpg")
    latin1 = os.fsencode(root / "good") + b"/caf\xe9.png"  # not valid UTF-8
    Image.fromarray(images[7]).save(os.fsdecode(latin1), format="PNG")
    good.add(latin1)
    (root / "good" / "link.png").symlink_to(root / "good" / "plain0.png")
    add_good(root / "good" / "link.png")
    (root / "x.png").mkdir()  # a folder named like an image is walked like any folder
    Image.fromarray(images[8]).save(root / "x.png" / "inside.png")
    add_good(root / "x.png" / "inside.png")

    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    bad[root / "bad" / "empty.png"] = "not an image"
    Image.fromarray(images[9]).save(root / "bad" / "full.png")
    data = (root / "bad" / "full.png").read_bytes()
    (root / "bad" / "full.png").unlink()
    (root / "bad" / "truncated.png").write_bytes(data[: len(data) // 2])
    bad[root / "bad" / "truncated.png"] = "cannot decode image"
    (root / "bad" / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    bad[root / "bad" / "noise.jpg"] = "not an image"
    (root / "bad" / "notes.txt").write_text("not a picture\n")
    bad[root / "bad" / "notes.txt"] = "not an image"
    write_bilevel_png(root / "bad" / "bomb.png", 10_000, 10_000)
    bad[root / "bad" / "bomb.png"] = "decompression-bomb limit"
    (root / "bad" / "loop.png").symlink_to(root / "bad" / "loop.png")
    bad[root / "bad" / "loop.png"] = "symlink loop"
    (root / "bad" / "dangling.png").symlink_to(root / "bad" / "gone.png")
    bad[root / "bad" / "dangling.png"] = "broken symlink"
    os.mkfifo(root / "bad" / "fifo.png")  # opening it would block forever
    bad[root / "bad" / "fifo.png"] = "not a regular file"
    (root / "bad" / "up").symlink_to(root)  # a folder link back to an ancestor
    bad[root / "bad" / "up"] = "symlink loop"
    # An unreadable file is test_an_unreadable_file_is_an_error_record_also_for_root's: mode 0 stops no root.
    return good, {os.fsencode(k): v for k, v in bad.items()}


def test_an_unreadable_file_is_an_error_record_also_for_root(tmp_path, checkpoint, fashion, monkeypatch):
    """A file open() refuses gets "permission denied" and costs no other image. Mode 0 refuses nobody who runs
    as root (as CI does), so open() itself refuses this one, in process: what a kernel answers a user for a
    file they may not read."""
    import builtins

    from click.testing import CliRunner

    from lqae_sklearn.cli.encode import cli

    save_images(tmp_path / "imgs", fashion[0][:2])
    secret = tmp_path / "imgs" / "1.png"
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fspath(file) == os.fspath(secret):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(cli, [str(tmp_path / "imgs"), str(out), "-c", checkpoint, "-j", "0"])
    assert result.exit_code == 1, result.output
    assert [r["path"] for r in load_records(out)] == [str(tmp_path / "imgs" / "0.png")]
    assert load_records(tmp_path / "o.errors.jsonl") == [{"path": str(secret), "reason": "permission denied"}]


def test_bad_files_never_stop_the_run_nor_cost_a_good_image(tmp_path, checkpoint, fashion):
    good, bad = build_matrix(tmp_path / "corpus", fashion)
    out = tmp_path / "out.jsonl"
    result = run_encode(tmp_path / "corpus", out, "-c", checkpoint, "-b", "4", "-j", "2")
    assert result.returncode == 1, result.stderr.decode()
    stderr = result.stderr.decode()
    assert f"{len(good)} encoded" in stderr and f"{len(bad)} failed" in stderr
    assert "out.errors.jsonl" in stderr

    raw = out.read_bytes()
    raw.decode("utf-8")  # strictly valid UTF-8, whatever the file names
    records = load_records(out)
    keys = [key_of(r) for r in records]
    assert len(keys) == len(set(keys)) and set(keys) == good
    tokens = record_tokens(checkpoint)
    for record in records:
        assert len(record["ids"]) == tokens and len(record["text"].split()) == tokens
    odd = next(r for r in records if "path_bytes_b64" in r)
    assert odd["path"].endswith("caf\ufffd.png")

    errors = {key_of(r): r["reason"] for r in load_records(tmp_path / "out.errors.jsonl")}
    assert set(errors) == set(bad)
    for path, fragment in bad.items():
        assert fragment in errors[path], (path, errors[path])

    # A rerun retries the bad files only: no duplicates anywhere, same exit status.
    again = run_encode(tmp_path / "corpus", out, "-c", checkpoint, "-b", "4", "-j", "2")
    assert again.returncode == 1
    assert f"0 encoded, {len(good)} already in" in again.stderr.decode()
    assert out.read_bytes() == raw
    assert len(load_records(tmp_path / "out.errors.jsonl")) == len(bad)


# ---------------------------------------------------------------------------------------------
# Interruption, resume, sharding
# ---------------------------------------------------------------------------------------------
SLOW_ARGS = ("-b", "2", "-j", "1", "--labels-from-dirs")  # many small batches: time to interrupt


@pytest.fixture(scope="module")
def reference(corpus, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "ref.jsonl"
    result = run_encode(corpus, out, "-c", checkpoint, *SLOW_ARGS)
    assert result.returncode == 0, result.stderr.decode()
    assert not Path(str(out).replace(".jsonl", ".errors.jsonl")).exists()
    return out.read_bytes()


def wait_for_lines(process, out, at_least, timeout=180):
    """Poll ``out`` like a reader would; every complete line must parse. Returns the line count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = complete_lines(out)
        for line in lines:
            json.loads(line)  # a reader never sees a partial record
        if len(lines) >= at_least:
            return len(lines)
        assert process.poll() is None, "lqae-encode ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError(f"{out} did not reach {at_least} lines in {timeout} s")


def test_ctrl_c_then_sigkill_then_resume_gives_every_image_once(tmp_path, corpus, checkpoint, reference):
    out = tmp_path / "out.jsonl"
    args = ENCODE + [str(corpus), str(out), "-c", checkpoint, *SLOW_ARGS]
    total = reference.count(b"\n")

    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_lines(first, out, 4)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr.decode()
    assert "interrupted by Ctrl-C" in stderr.decode()
    after_ctrl_c = out.read_bytes()
    assert after_ctrl_c.endswith(b"\n") and 4 <= after_ctrl_c.count(b"\n") < total
    assert reference.startswith(after_ctrl_c)  # clean stop: complete records, in order

    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = wait_for_lines(second, out, after_ctrl_c.count(b"\n") + 4)
    second.kill()
    second.communicate(timeout=60)
    assert done < total
    with open(out, "ab") as f:  # what a write torn by the kill looks like
        f.write(b'{"path":"' + str(corpus).encode() + b'/class9/00')

    third = run_encode(corpus, out, "-c", checkpoint, *SLOW_ARGS)
    assert third.returncode == 0, third.stderr.decode()
    assert "already in" in third.stderr.decode()
    assert out.read_bytes() == reference  # every image exactly once, identical to one clean run


def test_shards_together_equal_one_run(tmp_path, corpus, checkpoint, reference):
    outs = [tmp_path / f"part-{i}.jsonl" for i in range(3)]
    runs = [
        subprocess.Popen(ENCODE + [str(corpus), str(o), "-c", checkpoint, "--shard", f"{i}/3", *SLOW_ARGS],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i, o in enumerate(outs)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr.decode()
    parts = [complete_lines(o) for o in outs]
    assert all(parts), "every shard of 120 files should get some"
    assert sorted(line for part in parts for line in part) == sorted(reference.splitlines(keepends=True))


def test_overwrite_settings_check_and_stdout(tmp_path, corpus, checkpoint, reference):
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference[: reference.index(b"\n") + 1])
    Path(str(out).replace(".jsonl", ".meta.json")).write_text(json.dumps({"outputs": ["ids"]}))
    refused = run_encode(corpus, out, "-c", checkpoint, *SLOW_ARGS)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr.decode()

    # Paths from stdin, records to stdout, errors to stderr; --overwrite is not needed for stdout.
    paths = sorted(p for p in corpus.rglob("*.png"))[:10]
    listing = b"\n".join(os.fsencode(p) for p in paths) + b"\n" + os.fsencode(corpus) + b"\n"
    piped = run_encode("-", "-", "-c", checkpoint, *SLOW_ARGS, input=listing)
    assert piped.returncode == 1  # the folder among stdin paths is an error
    assert "is a folder (paths read from stdin must be files)" in piped.stderr.decode()
    assert piped.stdout.splitlines(keepends=True) == reference.splitlines(keepends=True)[:10]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nowhere", "{tmp}/o.jsonl", "-c", "{ckpt}"], "does not exist"),
        (["{tmp}/imgs", "{tmp}/o.jsonl", "-c", "{ckpt}", "--shard", "3/3"], "0 <= I < N"),
        (["{tmp}/imgs", "{tmp}/o.jsonl", "-c", "{tmp}/imgs"], "config.json"),
        (["{tmp}/imgs", "{tmp}/o.jsonl", "-c", "{ckpt}", "-o", "ids,pixels"], "pixels"),
        (["{tmp}/imgs", "-", "-", "{tmp}/o.jsonl", "-c", "{ckpt}"], "only once"),
        (["{tmp}/imgs", "{tmp}/o.jsonl", "-c", "{ckpt}", "--token-grid", "fine"], "expected auto or a whole number"),
        (["{tmp}/imgs", "{tmp}/o.jsonl", "-c", "{ckpt}", "--token-grid", "8"], "from 1 to the checkpoint's patch"),
        (["{tmp}/imgs", "{tmp}/notes.txt/o.jsonl", "-c", "{ckpt}"], "cannot write {tmp}/notes.txt/o.jsonl"),
        (["{tmp}/imgs", "{tmp}/notes.txt/tokens/", "-c", "{ckpt}"], "cannot write {tmp}/notes.txt/tokens/"),
    ],
)
def test_usage_errors_exit_2(tmp_path, checkpoint, args, message):
    # In process (click's runner) to save interpreter starts; the real-process exit
    # status 2 is checked in test_overwrite_settings_check_and_stdout.
    from click.testing import CliRunner

    from lqae_sklearn.cli.encode import cli

    (tmp_path / "imgs").mkdir()
    (tmp_path / "notes.txt").write_text("a file where a folder is needed\n")
    result = CliRunner().invoke(cli, [a.format(tmp=tmp_path, ckpt=checkpoint) for a in args])
    assert result.exit_code == 2 and message.format(tmp=tmp_path) in " ".join(result.output.split()), result.output


def save_images(folder, images) -> None:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")


def test_the_command_with_every_default_writes_what_the_default_tokenizer_gives(tmp_path, fashion):
    """Issue 20, item 9: `lqae-encode` with every default wrote 49 tokens per image, LQAETokenizer(output="text")
    9; a corpus encoded by the command must be what the default few-shot pipeline reads."""
    from click.testing import CliRunner

    from lqae_sklearn import LQAETokenizer
    from lqae_sklearn.cli.encode import cli

    images = fashion[0][:6]
    save_images(tmp_path / "imgs", images)
    result = run_encode(tmp_path / "imgs", tmp_path / "o.jsonl")  # every default
    assert result.returncode == 0, result.stderr.decode()
    records = sorted(load_records(tmp_path / "o.jsonl"), key=lambda r: r["path"])
    tokenizer = LQAETokenizer(output="text").fit()
    assert [r["text"] for r in records] == tokenizer.transform(images)
    np.testing.assert_array_equal([r["ids"] for r in records], tokenizer.encode(images, ("ids",))["ids"])
    grid = read_checkpoint_config(DEFAULT_CHECKPOINT)["inference"]["text_token_grid"]
    assert json.loads((tmp_path / "o.meta.json").read_text())["token_grid"] == grid  # resume checks it

    # Without text in the records, one token per patch, as LQAETokenizer(output="ids") gives.
    ids_only = CliRunner().invoke(cli, [str(tmp_path / "imgs"), str(tmp_path / "ids.jsonl"), "-o", "ids", "-j", "0"])
    assert ids_only.exit_code == 0, ids_only.output
    records = sorted(load_records(tmp_path / "ids.jsonl"), key=lambda r: r["path"])
    np.testing.assert_array_equal([r["ids"] for r in records], LQAETokenizer(output="ids").fit().transform(images))


def test_token_grid_writes_coarser_tokens_and_is_part_of_the_settings(tmp_path, checkpoint, fashion):
    from click.testing import CliRunner

    from lqae_sklearn import LQAETokenizer
    from lqae_sklearn.cli.encode import cli

    images = fashion[0][:6]
    save_images(tmp_path / "imgs", images)
    out = tmp_path / "o.jsonl"
    args = [str(tmp_path / "imgs"), str(out), "-c", checkpoint, "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(cli, args + ["--token-grid", "2"])  # an explicit grid holds for every field
    assert result.exit_code == 0, result.output
    records = sorted(load_records(out), key=lambda r: r["path"])
    expected = LQAETokenizer(checkpoint, token_grid=2, output="text").fit().transform(images)
    assert [r["text"] for r in records] == expected
    assert all(len(r["ids"]) == 4 for r in records)
    # Resuming with other tokens per image would mix two kinds of record: refused.
    grid = int(record_tokens(checkpoint) ** 0.5)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and f"token_grid: 2 then, {grid} now" in again.output


def test_help_documents_exit_codes_and_resume():
    from click.testing import CliRunner

    from lqae_sklearn.cli.encode import cli

    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for text in ("Exit status", "130", "Resume", "--shard", "--workers", "--labels-from-dirs", "errors.jsonl",
                 "Tokens per image", "auto"):
        assert text in result.output


# ---------------------------------------------------------------------------------------------
# Building blocks, in process
# ---------------------------------------------------------------------------------------------
def crash_on_poison(path, preprocessing):
    if path.endswith("poison.png"):
        os._exit(3)  # what a segfaulting decoder looks like to the pool
    return decode_file(path, preprocessing)


def test_a_crashing_decoder_costs_only_its_file(tmp_path, fashion):
    images, _ = fashion
    paths = []
    for i in range(12):
        name = "poison.png" if i == 5 else f"{i:02d}.png"
        Image.fromarray(images[i]).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    batches = [paths[i : i + 4] for i in range(0, 12, 4)]
    preprocessing = {"image_size": 28, "color_mode": "L"}
    results = [r for _, batch in DecodePipeline(batches, preprocessing, workers=2, decode=crash_on_poison)
               for r in batch]
    assert len(results) == 12
    assert results[5] == (None, WORKER_DIED)
    for i, (array, reason) in enumerate(results):
        if i != 5:
            assert reason is None
            np.testing.assert_array_equal(array, images[i])


def test_discovery_is_sorted_by_bytes_and_shards_partition(tmp_path):
    names = [b"b.png", b"a.png", b"\xff.png", b"A.png", b"sub/z.png", b"sub/deeper/y.png"]
    for name in names:
        path = os.fsencode(tmp_path) + b"/" + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    found = discover([str(tmp_path)])
    keys = [item.key for item in found.items]
    assert keys == sorted(keys) and len(keys) == len(names) and not found.errors
    assert found.items[-1].key.endswith(b"\xff.png")
    assert {i.shard_key for i in found.items} == set(names)  # relative to the folder given

    many = [Item(f"/data/{i}.png", f"{i}.png".encode()) for i in range(3000)]
    shards = [[x for x in many if in_shard(x, i, 4)] for i in range(4)]
    assert sum(map(len, shards)) == len(many) and all(500 < len(s) < 1000 for s in shards)
    # Moving the corpus does not move files between shards: only the relative path counts.
    moved = [Item(f"/mnt/other/{i}.png", f"{i}.png".encode()) for i in range(3000)]
    assert [in_shard(x, 1, 4) for x in moved] == [in_shard(x, 1, 4) for x in many]


def test_repair_torn_tail(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":')
    assert [r for _, r in iter_records(path)] == [{"a": 1}, {"a": 2}]  # readers skip the torn tail
    assert repair_torn_tail(path) == len(b'{"a":')
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n'
    path.write_bytes(b"no newline at all")
    repair_torn_tail(path)
    assert path.read_bytes() == b""

"""fetch_fashion_mnist: the search order, the checks, and real downloads from a server on 127.0.0.1.

The server serves the subset shipped in tests/data, so the fetcher's pins are swapped for the
subset's (``subset_pins``); every other part of the fetcher runs as it does for users.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import re
import textwrap
import threading
import time
import tracemalloc
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lqae_sklearn.datasets import _fashion_mnist, fetch_fashion_mnist, load_fashion_mnist, read_idx
from lqae_sklearn.datasets._fashion_mnist import IdxFile
from lqae_sklearn.datasets._idx import parse_idx

from conftest import FASHION_MNIST_SUBSET, fashion_mnist_subset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"
NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# -- the shipped subset -----------------------------------------------------------------------


def test_subset_is_real_fashion_mnist():
    X_train, y_train = fashion_mnist_subset("train")
    X_test, y_test = fashion_mnist_subset("test")
    assert X_train.shape == (1000, 28, 28) and X_test.shape == (500, 28, 28) and X_train.dtype == np.uint8
    assert y_train.shape == (1000,) and y_test.shape == (500,)
    # The first labels of each split of the full official files.
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(y_test, minlength=10).min() >= 30  # every class, enough of each for the tests
    # examples/ holds PNGs of test images written independently of this subset: same pixels.
    for png in sorted(EXAMPLES.glob("*/*.png")):
        index = int(png.stem)
        if index < 500:
            np.testing.assert_array_equal(np.asarray(Image.open(png)), X_test[index], err_msg=str(png))


def test_parse_idx_names_what_is_wrong():
    good = (FASHION_MNIST_SUBSET / "t10k-labels-idx1-ubyte.gz").read_bytes()
    data = gzip.decompress(good)
    assert parse_idx(data, "labels").shape == (500,)
    with pytest.raises(ValueError, match=r"x is not an idx file \(bad magic number\)"):
        parse_idx(b"\x01" + data[1:], "x")
    with pytest.raises(ValueError, match=r"x: only unsigned-byte idx files are supported \(type code 0xd\)"):
        parse_idx(data[:2] + b"\x0d" + data[3:], "x")
    with pytest.raises(ValueError, match="x is truncated inside its header"):
        parse_idx(data[:6], "x")
    with pytest.raises(ValueError, match="x is truncated: header promises 500 bytes, file holds 499"):
        parse_idx(data[:-1], "x")


def test_read_idx_names_a_damaged_gzip_file(tmp_path):
    damaged = tmp_path / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes((FASHION_MNIST_SUBSET / damaged.name).read_bytes()[:-20])
    with pytest.raises(ValueError, match=f"{damaged} is not a complete gzip file"):
        read_idx(damaged)


def test_read_idx_holds_a_file_once_in_a_writeable_array(tmp_path):
    """The content is read straight into the array's memory: writeable, and not held twice on the way
    (a bytes object then a copy of it would double the peak)."""
    images = np.random.default_rng(0).integers(0, 4, size=(2000, 64, 64), dtype=np.uint8)  # 8 MB
    content = b"\0\0\x08\x03" + b"".join(n.to_bytes(4, "big") for n in images.shape) + images.tobytes()
    (tmp_path / "images-idx3-ubyte").write_bytes(content)
    (tmp_path / "images-idx3-ubyte.gz").write_bytes(gzip.compress(content, compresslevel=1))
    for name in ("images-idx3-ubyte", "images-idx3-ubyte.gz"):
        tracemalloc.start()
        try:
            array = read_idx(tmp_path / name)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(array, images)
        assert array.flags.writeable, name
        assert peak < 1.2 * images.nbytes, (name, peak, images.nbytes)
    longer = tmp_path / "longer-idx3-ubyte"
    longer.write_bytes(content + b"\0")
    with pytest.raises(ValueError, match=f"{longer} is longer than its header says: header promises "
                                         f"{images.size} bytes, file holds {images.size + 1}"):
        read_idx(longer)


# -- the pins of the full data set ------------------------------------------------------------

#: The four official files, pinned independently of the fetcher's table (which every test below
#: swaps for the subset's). Content SHA-256 and size: shared/reference/measured-baselines.md,
#: measured on Debian's dataset-fashion-mnist files (and again with ``zcat FILE.gz | sha256sum``).
#: SHA-256 of the official .gz downloads: the same four values in FluxML/Flux.jl
#: (src/data/fashion-mnist.jl) and Britefury/batchup (batchup/datasets/fashion_mnist.py), two
#: loaders that download the files from the dataset's S3 address and check them.
OFFICIAL_FILES = {
    "train-images-idx3-ubyte": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    "train-labels-idx1-ubyte": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    "t10k-images-idx3-ubyte": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                               "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    "t10k-labels-idx1-ubyte": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                               "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
}


def test_the_fetcher_pins_the_official_files():
    table = _fashion_mnist._FILES
    assert {split: tuple(spec.name for spec in specs) for split, specs in table.items()} == NAMES
    for spec in (spec for specs in table.values() for spec in specs):
        gz_sha256, sha256, size = OFFICIAL_FILES[spec.name]
        assert (spec.gz_sha256, spec.sha256) == (gz_sha256, sha256), spec.name
        assert 4 + 4 * len(spec.shape) + int(np.prod(spec.shape)) == size, spec.name  # the header and one byte a pixel
    assert [spec.shape[0] for specs in table.values() for spec in specs] == [60_000, 60_000, 10_000, 10_000]


# -- the search order and checks, with the pins swapped for the subset's ----------------------


def subset_pin_table() -> dict:
    """The fetcher's table of files and pins, for the shipped subset instead of the full data set."""
    pinned = {}
    for subset, names in NAMES.items():
        specs = []
        for name in names:
            gz = (FASHION_MNIST_SUBSET / f"{name}.gz").read_bytes()
            idx = gzip.decompress(gz)
            specs.append(IdxFile(name, hashlib.sha256(gz).hexdigest(), hashlib.sha256(idx).hexdigest(),
                                 parse_idx(idx).shape))
        pinned[subset] = tuple(specs)
    return pinned


@pytest.fixture
def subset_pins(monkeypatch):
    """Pin the shipped subset: the files the tests can serve and copy."""
    monkeypatch.setattr(_fashion_mnist, "_FILES", subset_pin_table())


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty data_home, $LQAE_FASHION_MNIST folder and Debian folder, in this test's tmp_path."""
    home, env, debian = (tmp_path / name for name in ("data_home", "env", "debian"))
    for folder in (home, env, debian):
        folder.mkdir()
    monkeypatch.setenv("LQAE_FASHION_MNIST", str(env))
    monkeypatch.setattr(_fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", debian)
    return home, env, debian


def put_subset(folder: Path, subset="test", compressed=True, damage=False):
    """Copy the subset's two files of ``subset`` into ``folder``; ``damage`` changes one pixel or label."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in NAMES[subset]:
        idx = gzip.decompress((FASHION_MNIST_SUBSET / f"{name}.gz").read_bytes())
        if damage:
            idx = idx[:-1] + bytes([idx[-1] ^ 1])
        if compressed:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx))
        else:
            (folder / name).write_bytes(idx)


def test_bunch_and_return_X_y(subset_pins, places):
    home, _, _ = places
    put_subset(home / "fashion_mnist", "train")
    bunch = fetch_fashion_mnist(subset="train", data_home=home)
    X, y = fashion_mnist_subset("train")
    np.testing.assert_array_equal(bunch.data, X)
    np.testing.assert_array_equal(bunch.target, y)
    assert bunch.target.dtype == np.int64 and bunch.data.dtype == np.uint8
    assert bunch.target_names[0] == "T-shirt/top" and bunch.target_names[9] == "Ankle boot"
    assert "Zalando" in bunch.DESCR and "MIT" in bunch.DESCR
    X2, y2 = fetch_fashion_mnist(subset="train", data_home=home, return_X_y=True)
    np.testing.assert_array_equal(X2, X)
    np.testing.assert_array_equal(y2, y)
    with pytest.raises(ValueError, match="subset must be 'train' or 'test', got 'valid'"):
        fetch_fashion_mnist(subset="valid", data_home=home)


def test_fetched_arrays_are_writeable_as_scikit_learns_are(subset_pins, places):
    home = places[0]
    put_subset(home / "fashion_mnist", "test")
    bunch = fetch_fashion_mnist(subset="test", data_home=home)
    X, y = fetch_fashion_mnist(subset="test", data_home=home, return_X_y=True)
    for array in (bunch.data, bunch.target, X, y):
        assert array.flags.writeable
    before = int(bunch.data[0, 0, 0])
    X[0, 0, 0] = before ^ 1  # raised "assignment destination is read-only" when the arrays were views of bytes
    assert X[0, 0, 0] == before ^ 1 and bunch.data[0, 0, 0] == before  # each fetch has arrays of its own
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns "The given NumPy array is not writable"
        assert torch.from_numpy(bunch.data).shape == (500, 28, 28)


def test_data_home_defaults_to_scikit_learn_data(subset_pins, places, tmp_path, monkeypatch):
    sk = tmp_path / "sk"
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(sk))
    put_subset(sk / "fashion_mnist")
    X, _ = fetch_fashion_mnist(subset="test", return_X_y=True)
    assert X.shape == (500, 28, 28)


def test_search_order_is_data_home_then_env_then_debian(subset_pins, places):
    home, env, debian = places
    cache = home / "fashion_mnist"
    expected, _ = fashion_mnist_subset("test")
    put_subset(cache)
    put_subset(env, damage=True)  # never read while the cache has the files
    X, _ = fetch_fashion_mnist(subset="test", data_home=home, download_if_missing=False, return_X_y=True)
    np.testing.assert_array_equal(X, expected)

    shutil.rmtree(cache)  # now the env folder is next, and its damaged copy is refused by name
    with pytest.raises(OSError, match=rf"{env}/t10k-images-idx3-ubyte.gz is not the Fashion-MNIST file "
                                      r"t10k-images-idx3-ubyte: its contents have SHA-256 [0-9a-f]{64}, expected"):
        fetch_fashion_mnist(subset="test", data_home=home, download_if_missing=False)

    for path in env.iterdir():  # an intact uncompressed copy in the env folder
        path.unlink()
    put_subset(env, compressed=False)
    put_subset(debian, damage=True)
    X, _ = fetch_fashion_mnist(subset="test", data_home=home, download_if_missing=False, return_X_y=True)
    np.testing.assert_array_equal(X, expected)

    os.environ.pop("LQAE_FASHION_MNIST")  # then Debian's folder, recompressed as Debian ships it
    shutil.rmtree(debian)
    debian.mkdir()
    for name in NAMES["test"]:
        idx = gzip.decompress((FASHION_MNIST_SUBSET / f"{name}.gz").read_bytes())
        (debian / f"{name}.gz").write_bytes(gzip.compress(idx, compresslevel=1, mtime=12345))
    X, _ = fetch_fashion_mnist(subset="test", data_home=home, download_if_missing=False, return_X_y=True)
    np.testing.assert_array_equal(X, expected)


def test_missing_without_download_names_the_three_ways(subset_pins, places):
    home, env, debian = places
    with pytest.raises(OSError) as info:
        fetch_fashion_mnist(subset="test", data_home=home, download_if_missing=False)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte(.gz) is in none of" in message and "download_if_missing=False" in message
    for place in (home / "fashion_mnist", env, debian):
        assert str(place) in message
    assert "(1) let fetch_fashion_mnist download it" in message
    assert "(2) put the four idx files" in message and "$LQAE_FASHION_MNIST" in message
    assert "(3) install Debian's package dataset-fashion-mnist" in message
    assert list(home.iterdir()) == []


def test_load_fashion_mnist_is_deprecated_but_works(subset_pins, places):
    home, env, _ = places
    put_subset(env)
    with pytest.warns(FutureWarning, match=r"fetch_fashion_mnist\(subset=\.\.\., return_X_y=True\)"):
        X, y = load_fashion_mnist("test", path=env)
    np.testing.assert_array_equal(X, fashion_mnist_subset("test")[0])
    with pytest.warns(FutureWarning), pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist("test", path=home)


# -- downloads from a real server on 127.0.0.1 ------------------------------------------------


class SubsetServer:
    """Serves the shipped subset's .gz files; ``modes[name]`` makes one file fail on purpose.

    Modes: ``"ok"``; ``"404"``; ``"corrupt"`` (other bytes, full length); ``"truncate"``
    (Content-Length of the whole file, half the body, then close); ``"hang"`` (accept, send
    nothing); ``"stall"`` (half the body, then send nothing more).
    """

    def __init__(self):
        self.modes: dict[str, str] = {}
        self.hits: list[str] = []
        self.release = threading.Event()  # ends the sleep of hanging/stalled handlers
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/fm/"

    def serve(self, handler):
        name = handler.path.rsplit("/", 1)[-1]
        self.hits.append(name)
        path = FASHION_MNIST_SUBSET / name
        mode = self.modes.get(name, "ok")
        if mode == "404" or not path.is_file():
            handler.send_error(404)
            return
        if mode == "hang":
            self.release.wait(30)
            return
        body = path.read_bytes()
        if mode == "corrupt":
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if mode in ("truncate", "stall"):
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            if mode == "stall":
                self.release.wait(30)
            handler.close_connection = True
            return
        handler.wfile.write(body)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(subset_pins, places, monkeypatch):
    srv = SubsetServer()
    monkeypatch.setattr(_fashion_mnist, "FASHION_MNIST_MIRRORS", [srv.url])
    yield srv
    srv.close()


def refused_url() -> str:
    """A URL on 127.0.0.1 whose port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/fm/"


def test_download_verifies_caches_and_is_read_from_the_cache_afterwards(server, places):
    home = places[0]
    X, y = fetch_fashion_mnist(subset="test", data_home=home, return_X_y=True)
    expected_X, expected_y = fashion_mnist_subset("test")
    np.testing.assert_array_equal(X, expected_X)
    np.testing.assert_array_equal(y, expected_y)
    assert server.hits == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    cached = sorted(p.name for p in (home / "fashion_mnist").iterdir())
    assert cached == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]  # nothing else, no temporaries
    for name in cached:
        assert (home / "fashion_mnist" / name).read_bytes() == (FASHION_MNIST_SUBSET / name).read_bytes()
    fetch_fashion_mnist(subset="test", data_home=home)
    assert len(server.hits) == 2  # the second call read the cache


def test_next_mirror_is_tried_after_a_failure(server, places, monkeypatch):
    monkeypatch.setattr(_fashion_mnist, "FASHION_MNIST_MIRRORS", [refused_url(), server.url])
    X, _ = fetch_fashion_mnist(subset="test", data_home=places[0], return_X_y=True)
    assert X.shape == (500, 28, 28)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("404", r"HTTP 404 Not Found"),
        ("corrupt", r"checksum mismatch, the server sent other bytes than the pinned file \(SHA256 hash of "
                    r"downloaded file \(t10k-images-idx3-ubyte.gz\) does not match the known hash"),
        ("truncate", r"truncated: the connection closed before the whole file arrived"),
        ("hang", r"timed out: the server sent nothing for 0.5 s"),
        ("stall", r"timed out: the server sent nothing for 0.5 s"),
    ],
)
def test_failed_download_names_url_and_reason_and_leaves_no_file(server, places, mode, reason):
    home = places[0]
    server.modes["t10k-images-idx3-ubyte.gz"] = mode
    with pytest.raises(OSError) as info:
        fetch_fashion_mnist(subset="test", data_home=home, timeout=0.5)
    message = str(info.value)
    assert message.startswith(
        "Fashion-MNIST file t10k-images-idx3-ubyte.gz is not on this machine and could not be downloaded:")
    line = next(line for line in message.splitlines() if server.url in line)
    assert line.strip().startswith(f"{server.url}t10k-images-idx3-ubyte.gz: ")
    assert re.search(reason, line), line
    assert "Provide it in one of three ways" in message
    assert list((home / "fashion_mnist").iterdir()) == []  # no partial or temporary file


def test_offline_gives_one_error_naming_the_three_ways(subset_pins, places, monkeypatch):
    home, env, _ = places
    url = refused_url()
    monkeypatch.setattr(_fashion_mnist, "FASHION_MNIST_MIRRORS", [url])
    with pytest.raises(OSError) as info:
        fetch_fashion_mnist(subset="test", data_home=home, timeout=5)
    message = str(info.value)
    assert f"{url}t10k-images-idx3-ubyte.gz: could not connect (" in message
    assert "Connection refused" in message or "refused" in message.lower()
    assert f"(1) let fetch_fashion_mnist download it once into {home / 'fashion_mnist'}" in message
    assert "(2) put the four idx files (.gz or not) in a folder and name it in $LQAE_FASHION_MNIST" in message
    assert "(3) install Debian's package dataset-fashion-mnist" in message
    assert list((home / "fashion_mnist").iterdir()) == []


def test_a_killed_download_leaves_nothing_that_passes_for_data(server, places):
    """SIGKILL a real process in the middle of a download; the next fetch downloads again and is right."""
    home, _, debian = places
    server.modes["t10k-images-idx3-ubyte.gz"] = "stall"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import lqae_sklearn.datasets._fashion_mnist as fm
        from test_datasets import subset_pin_table
        fm.DEBIAN_FASHION_MNIST_DIR = fm.Path({str(debian)!r})  # this machine's copy would be found first
        fm.FASHION_MNIST_MIRRORS[:] = [{server.url!r}]
        fm._FILES = subset_pin_table()
        fm.fetch_fashion_mnist(subset="test", data_home={str(home)!r}, timeout=60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = home / "fashion_mnist"
    deadline = time.monotonic() + 60
    while not (cache.is_dir() and any(p.stat().st_size > 0 for p in cache.iterdir())):  # half the file is in
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = list(cache.iterdir())
    assert leftovers and all(not p.name.startswith("t10k-") for p in leftovers), leftovers  # a temporary only

    server.modes.clear()
    X, _ = fetch_fashion_mnist(subset="test", data_home=home, return_X_y=True)
    np.testing.assert_array_equal(X, fashion_mnist_subset("test")[0])


# -- the commands load Fashion-MNIST through the fetcher ----------------------------------------


def test_training_data_fashion_mnist_comes_from_the_fetcher(subset_pins, places):
    from lqae_sklearn import preset_config
    from lqae_sklearn.model import preprocessing_of
    from lqae_sklearn.training._data import open_training_data

    home = places[0]
    put_subset(home / "fashion_mnist")
    data = open_training_data("fashion-mnist:test", preprocessing_of(preset_config("small-28")), data_home=str(home))
    assert data.description == {"source": "fashion-mnist", "split": "test", "num_images": 500}
    np.testing.assert_array_equal(data[7][0].numpy(), fashion_mnist_subset("test")[0][7])


def test_lqae_fewshot_reads_fashion_mnist_through_the_fetcher_or_says_how_to_get_it(subset_pins, places, monkeypatch):
    from click.testing import CliRunner

    from lqae_sklearn.cli.fewshot import cli

    args = ["fashion-mnist", "--way", "2", "--shot", "1", "--episodes", "2", "--method", "pixels", "--no-progress"]
    monkeypatch.setattr(_fashion_mnist, "FASHION_MNIST_MIRRORS", [refused_url()])
    offline = CliRunner().invoke(cli, args)
    assert offline.exit_code == 2, offline.output
    assert "lqae-fewshot: error: Fashion-MNIST file t10k-images-idx3-ubyte.gz is not on this machine" in offline.stderr
    assert "Provide it in one of three ways" in offline.stderr

    put_subset(places[1])  # the $LQAE_FASHION_MNIST folder
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    assert "Fashion-MNIST test split" in result.stdout and "2-way 1-shot" in result.stdout


def test_a_damaged_gzip_in_a_local_folder_is_an_oserror_naming_it(subset_pins, places):
    _, env, _ = places
    put_subset(env)
    damaged = env / "t10k-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-30])
    with pytest.raises(OSError, match=rf"{damaged} is not a complete gzip file.*Delete or replace it"):
        fetch_fashion_mnist(subset="test", download_if_missing=False)

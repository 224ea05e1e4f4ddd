"""The Python side of corpus encoding: encode_dataset and BatchEncoder, without a Ray cluster."""

import ast
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.encoding import BatchEncoder, EncodeError, encode_dataset

pytest_plugins = ("encode_fixtures",)  # checkpoint, fashion


@pytest.fixture
def folder(tmp_path, fashion):
    root = tmp_path / "images"
    (root / "boots").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(fashion[0][i]).save(root / "boots" / f"{i}.png")
    (root / "boots" / "notes.txt").write_text("not an image")
    return root


def test_encode_dataset_writes_resumes_and_reports(tmp_path, folder, checkpoint, fashion):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "tokens.parquet"
    first = encode_dataset(folder, out, checkpoint=checkpoint, labels_from_dirs=True, part_size=2)
    assert first == {"encoded": 5, "already": 0, "failed": 1, "interrupted": False}
    table = pq.read_table(out)
    assert table.num_rows == 5 and set(table["label"].to_pylist()) == {"boots"}
    # ids and text are one pass at the grid LQAETokenizer(output="text") uses (token_grid="auto")
    tokenizer = LQAETokenizer(checkpoint=checkpoint, output="text", device="cpu").fit()
    by_path = dict(zip(table["path"].to_pylist(), table["ids"].to_pylist()))
    expected = tokenizer.encode(fashion[0][:5], ("ids",))["ids"]
    for i in range(5):
        assert by_path[str(folder / "boots" / f"{i}.png")] == expected[i].tolist()
    assert json.loads((out / "_errors.jsonl").read_text())["reason"].startswith("not an image")

    again = encode_dataset([str(folder)], out, checkpoint=checkpoint, labels_from_dirs=True, part_size=2)
    assert again == {"encoded": 0, "already": 5, "failed": 1, "interrupted": False}


@pytest.mark.parametrize("kwargs, fragment", [
    ({"outputs": ("ids", "pixels")}, "pixels not among"),
    ({"engine": "spark"}, "'spark' is not one of"),
    ({"format": "csv"}, "'csv' is not one of"),
])
def test_encode_dataset_names_what_is_wrong(tmp_path, folder, checkpoint, kwargs, fragment):
    with pytest.raises(EncodeError, match=fragment) as info:
        encode_dataset(folder, tmp_path / "out.jsonl", checkpoint=checkpoint, **kwargs)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="does not exist"):
        encode_dataset(tmp_path / "missing", tmp_path / "out.jsonl", checkpoint=checkpoint)


def test_batch_encoder_adds_the_tokenizer_outputs_as_columns(checkpoint, fashion):
    tokenizer = LQAETokenizer(checkpoint=checkpoint, output="text", device="cpu")  # not fitted: fitted inside
    encoder = BatchEncoder(tokenizer, outputs=("ids", "text"))
    images = fashion[0][:6]
    batch = encoder({"image": images, "id": np.arange(6)})
    np.testing.assert_array_equal(batch["id"], np.arange(6))
    # The ids and the text come from one pass at the text output's token grid ("auto": the checkpoint's).
    fitted = LQAETokenizer(checkpoint=checkpoint, output="text", device="cpu").fit()
    np.testing.assert_array_equal(batch["ids"], fitted.encode(images, ("ids",))["ids"])
    assert list(batch["text"]) == fitted.transform(images)
    assert batch["ids"].shape[1] == fitted.n_tokens_
    assert BatchEncoder(tokenizer)({"image": images})["text"].shape == (6,)  # default: the tokenizer's output
    with pytest.raises(KeyError, match="no column 'image'.*pixels"):
        encoder({"pixels": images})


def test_encode_dataset_runs_in_a_thread_other_than_the_main_one(tmp_path, folder, checkpoint):
    """Signals reach only the main thread, so a run in another one (a web server's worker, a notebook's
    background job) stops when its caller stops it; main raised "signal only works in main thread"."""
    results = []
    thread = threading.Thread(target=lambda: results.append(
        encode_dataset(folder, tmp_path / "out.jsonl", checkpoint=checkpoint, device="cpu")))
    thread.start()
    thread.join(timeout=300)
    assert results == [{"encoded": 5, "already": 0, "failed": 1, "interrupted": False}]


def test_the_encoding_modules_import_downwards():
    """Every import between lqae_sklearn.encoding's modules points down a layering (no circle, such as the
    one between _ray and _run that main had): the modules sort topologically."""
    import graphlib

    import lqae_sklearn.encoding

    package = Path(lqae_sklearn.encoding.__file__).parent
    imports = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {alias.name for alias in node.names}
        imports[path.stem] = names - {path.stem}
    order = list(graphlib.TopologicalSorter(imports).static_order())  # raises CycleError on a circle
    assert order.index("_run") > order.index("_ray") > order.index("_parquet") > order.index("_errors")

"""lqae-fewshot end to end: real folders, real processes, the embedded LLM once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy.stats import t

from lqae_sklearn.cli.fewshot import cli

sys.path.insert(0, str(Path(__file__).parent))

FEWSHOT = [sys.executable, "-m", "lqae_sklearn.cli.fewshot"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"


def run_fewshot(*args, timeout=300):
    return subprocess.run(FEWSHOT + [os.fspath(a) for a in args], capture_output=True, text=True, timeout=timeout)


def table_rows(stdout: str) -> list[list[str]]:
    """Cells of the Markdown table rows (header and rule excluded)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]


def write_two_class_folder(root: Path, per_class=3) -> Path:
    """Dark and bright images in two class folders: trivially separable by pixels."""
    for name, level in (("dark", 20), ("bright", 230)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((28, 28), level, dtype=np.uint8)
            pixels[i, :] = 255 - level  # make the images distinct
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow  # loads the tokenizer and the embedded Gemma in a fresh process
def test_llm_table_on_the_example_folder(tmp_path):
    out = tmp_path / "result.json"
    # Two images per class: 1 support + 1 query. Few tokens per item (3 x 3) keep the LLM calls short.
    result = run_fewshot(EXAMPLES, "--way", "2", "--shot", "1", "--episodes", "3", "--method", "llm,shuffled,pixels",
                         "--scoring", "channel", "--token-grid", "3", "--json", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "Few-shot accuracy on the folder" in result.stdout
    rows = table_rows(result.stdout)
    assert len(rows) == 1 and rows[0][:3] == ["2-way 1-shot", "3", "0.50"]
    record = json.loads(out.read_text())
    assert (record["scoring"], record["token_grid"]) == ("channel", 3)
    cell = record["cells"][0]
    assert (cell["way"], cell["shot"], cell["episodes"]) == (2, 1, 3)
    for name in ("llm", "shuffled", "pixels"):
        accuracies = cell["methods"][name]["accuracies"]
        assert len(accuracies) == 3 and all(a in (0.0, 0.5, 1.0) for a in accuracies)  # 2 queries per episode
        assert cell["methods"][name]["mean"] == pytest.approx(np.mean(accuracies))
    # Each printed cell is the mean of the JSON's per-episode accuracies ± the Student-t 95% half-width,
    # recomputed here from those accuracies.
    for column, name in zip(rows[0][3:], ("llm", "shuffled", "pixels"), strict=True):
        accuracies = np.array(cell["methods"][name]["accuracies"])
        sem = accuracies.std(ddof=1) / np.sqrt(accuracies.size)
        expected = f"{accuracies.mean():.3f} ± {t.ppf(0.975, accuracies.size - 1) * sem:.3f}"
        assert column == expected, name


def test_pixel_baseline_on_a_separable_folder_and_same_seed_same_table(tmp_path):
    root = write_two_class_folder(tmp_path / "data")
    args = (root, "-n", "2", "-k", "1", "-k", "2", "-e", "5", "-m", "pixels", "--seed", "3")
    first, again = run_fewshot(*args), run_fewshot(*args)
    assert first.returncode == 0, first.stderr
    rows = table_rows(first.stdout)
    assert [r[0] for r in rows] == ["2-way 1-shot", "2-way 2-shot"]
    assert [r[3] for r in rows] == ["1.000 ± 0.000", "1.000 ± 0.000"]
    assert first.stdout == again.stdout


def test_help_explains_protocol_and_exit_status():
    result = run_fewshot("--help")
    assert result.returncode == 0
    for text in ("SOURCE", "fashion-mnist", "--way", "--shot", "--episodes", "nonsense", "Exit status", "95%"):
        assert text in result.stdout


def test_help_says_batch_calibration_reads_the_other_queries():
    help_text = " ".join(run_fewshot("--help").stdout.split())  # click rewraps the epilog
    assert "--orders N scores each query under up to N orders" in help_text
    assert "an answer depends on the other queries" in help_text
    assert "in a 2-way episode with --queries 1 the two answers always differ" in help_text


@pytest.mark.parametrize("case", ["missing", "file", "one-class", "too-few", "loose-image", "bad-image"])
def test_unusable_source_exits_2_with_a_clear_message(tmp_path, case):
    source = tmp_path / "data"
    if case == "missing":
        expected = "does not exist"
    elif case == "file":
        source.write_text("not a folder")
        expected = "is not a folder"
    elif case == "one-class":
        write_two_class_folder(source)
        for f in (source / "bright").iterdir():
            f.unlink()
        (source / "bright").rmdir()
        expected = "need 2 classes with at least 2 images each; 1 of its 1 classes"
    elif case == "too-few":
        write_two_class_folder(source, per_class=1)
        expected = "counts: bright=1, dark=1"
    elif case == "loose-image":
        write_two_class_folder(source)
        Image.new("L", (28, 28)).save(source / "stray.png")
        expected = "stray.png' sits directly in SOURCE"
    else:
        write_two_class_folder(source)
        (source / "dark" / "9.png").write_bytes(b"this is not a png")
        expected = "9.png"
    # In-process (the same click command the console script runs): these fail before any model loads.
    result = CliRunner().invoke(cli, [str(source), "--way", "2", "--shot", "1", "--episodes", "2",
                                      "--method", "pixels"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "lqae-fewshot: error:" in result.stderr and expected in result.stderr
    assert result.stdout == ""


def test_bad_option_is_a_usage_error(tmp_path):
    source = str(write_two_class_folder(tmp_path / "data"))
    result = CliRunner().invoke(cli, [source, "--method", "knn"])
    assert result.exit_code == 2 and "knn not among llm, shuffled, pixels" in result.stderr
    result = CliRunner().invoke(cli, [source, "--way", "1"])
    assert result.exit_code == 2 and "--way" in result.stderr
    result = CliRunner().invoke(cli, [source, "--calibration", "platt"])
    assert result.exit_code == 2 and "Invalid value for '--calibration'" in result.stderr
    result = CliRunner().invoke(cli, [source, "--orders", "0"])
    assert result.exit_code == 2 and "Invalid value for '--orders'" in result.stderr


@pytest.mark.parametrize("options, demonstrations, orders, calibration", [
    ([], None, None, None),  # the classifier's defaults
    (["--orders", "1", "--calibration", "batch"], None, 1, "batch"),
    (["--orders", "2", "--calibration", "content_free"], None, 2, "content_free"),
    (["--orders", "2", "--scoring", "channel", "--demonstrations", "random", "--calibration", "other_classes"],
     "random", 2, "other_classes"),
    (["--orders", "2", "--scoring", "channel", "--demonstrations", "nearest"], "nearest", 2, None),
])
def test_orders_and_calibration_reach_the_classifier(tmp_path, monkeypatch, options, demonstrations, orders,
                                                     calibration):
    from _llm_models import tiny_model_dir

    from lqae_sklearn import LLMFewShotClassifier

    seen = []
    predict_proba = LLMFewShotClassifier.predict_proba

    def recording(self, X):
        used = len(self.orders_) if self.orders_ is not None else None  # None: each class orders its own
        seen.append((self.label_scoring, self.demonstrations, self.n_orders_, used, self.calibration_, len(X)))
        return predict_proba(self, X)

    monkeypatch.setattr(LLMFewShotClassifier, "predict_proba", recording)
    out = tmp_path / "result.json"
    result = CliRunner().invoke(cli, [str(EXAMPLES), "--way", "2", "--shot", "1", "--episodes", "2", "--method", "llm",
                                      "--llm", tiny_model_dir(), "--device", "cpu", "--json", str(out),
                                      "--no-progress", *options])
    assert result.exit_code == 0, result.stderr
    defaults = LLMFewShotClassifier()
    demonstrations = defaults.demonstrations if demonstrations is None else demonstrations
    orders = defaults.n_orders if orders is None else orders
    calibration = defaults.calibration if calibration is None else calibration
    scoring = "channel" if "channel" in options else defaults.label_scoring
    # One shared prompt of 2 demonstrations: min(orders, 2) orders; None where each query's prompt (nearest) or
    # each class's prompt orders its own. Every episode's 2 queries go to one predict_proba call.
    used = min(orders, 2) if scoring == "channel" and demonstrations == "random" else None
    assert seen == [(scoring, demonstrations, orders, used, calibration, 2)] * 2
    record = json.loads(out.read_text())
    assert (record["demonstrations"], record["n_orders"], record["calibration"]) == (demonstrations, orders,
                                                                                     calibration)

"""lqae-eval and evaluate_checkpoint: every figure against an independent computation, on tiny checkpoints.

The checkpoints are tiny and untrained (conftest's tiny config: patch 7, 4 x 4 tokens);
the images are the shipped Fashion-MNIST subset, written as labelled folders.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from conftest import TINY_OVERRIDES, fashion_mnist_subset, tiny_config
from lqae_sklearn import LQAE, load_checkpoint, preset_config, save_checkpoint
from lqae_sklearn.cli.eval import cli
from lqae_sklearn.evaluation import (
    evaluate_checkpoint,
    evaluation_markdown,
    prototype_predict,
    sample_episodes,
    token_overlap_predict,
)
from lqae_sklearn.evaluation._metrics import reconstruction_figures
from lqae_sklearn.model import VQVAE

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat")
K_SMALL, K_LARGE = 4, 16
EPISODES = 30


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, per_class: int, skip: int = 0) -> Path:
    """``per_class`` images of each of the first five classes, as PNGs in class subfolders."""
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[skip:skip + per_class]):
            Image.fromarray(images[index]).save(root / name / f"{i:03d}.png")
    return root


def read_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The folder's images (N, 28, 28) float64 in [0, 1] and labels, in sorted path order, read with Pillow."""
    paths = sorted(p for p in root.rglob("*.png"))
    images = np.stack([np.asarray(Image.open(p), dtype=np.float64) / 255.0 for p in paths])
    return images, np.array([p.parent.name for p in paths], dtype=object)


def patches_by_hand(images: np.ndarray, patch: int) -> np.ndarray:
    """(N, S, S) -> (N, grid * grid, patch * patch), the grid row-major, with explicit loops."""
    grid = images.shape[1] // patch
    return np.stack([np.stack([images[n, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].ravel()
                               for r in range(grid) for c in range(grid)]) for n in range(len(images))])


def psnr_by_hand(reconstructions: np.ndarray, images: np.ndarray) -> tuple[float, float]:
    """(mean of per-image PSNR, dataset-level PSNR)."""
    mse = [float(np.mean((r.astype(np.float64) - x) ** 2)) for r, x in zip(reconstructions, images)]
    return float(np.mean([10 * math.log10(1 / m) for m in mse])), 10 * math.log10(1 / np.mean(mse))


def probe_accuracy(train, y_train, test, y_test, scale=True) -> float:
    model = LogisticRegression(C=0.1, max_iter=5000)
    if scale:
        model = make_pipeline(StandardScaler(), model)
    return float(model.fit(train, y_train).score(test, y_test))


def without_timings(result):
    """The result with its wall-clock fields removed (they are all that may differ between two equal runs)."""
    if isinstance(result, dict):
        return {k: without_timings(v) for k, v in result.items()
                if k not in ("seconds", "fit_seconds", "seconds_per_episode")}
    if isinstance(result, list):
        return [without_timings(v) for v in result]
    return result


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Train (5 classes x 6 images, from the train subset) and test (5 x 3, from the test subset) folders."""
    root = tmp_path_factory.mktemp("eval-folders")
    train = write_folder(root / "train", *fashion_mnist_subset("train"), per_class=6)
    test = write_folder(root / "test", *fashion_mnist_subset("test"), per_class=3)
    return train, test


@pytest.fixture(scope="module")
def lqae_checkpoint(tmp_path_factory, minilm):
    torch.manual_seed(0)
    return save_checkpoint(LQAE(tiny_config(), minilm), tmp_path_factory.mktemp("eval-lqae") / "checkpoint")


@pytest.fixture(scope="module")
def vqvae_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = preset_config("small-28-vqvae", **{**TINY_OVERRIDES, "codebook_size": 64})
    return save_checkpoint(VQVAE(config), tmp_path_factory.mktemp("eval-vqvae") / "checkpoint")


@pytest.fixture(scope="module")
def result(lqae_checkpoint, folders):
    train, test = folders
    return evaluate_checkpoint(lqae_checkpoint, data=str(train), test_data=str(test), kmeans_sizes=(K_LARGE, K_SMALL),
                               n_episodes=EPISODES, device="cpu")


# -- the figures, each against an independent computation --------------------------------------------------
def test_psnr_both_definitions_by_hand_for_three_images():
    # Per-image MSE 0.01, 0.001, 0.1: per-image PSNR 20, 30, 10 dB (mean 20); all pixels at once: MSE 0.037.
    figures = reconstruction_figures(np.array([0.01, 0.001, 0.1]))
    assert figures["psnr_mean_per_image_db"] == pytest.approx(20.0)
    assert figures["psnr_dataset_db"] == pytest.approx(10 * math.log10(1 / 0.037))
    assert figures["psnr_dataset_db"] == pytest.approx(14.3180, abs=1e-4)


def test_checkpoint_reconstruction_and_codebook_figures(result, lqae_checkpoint, folders, minilm):
    images, _ = read_folder(folders[1])
    model = load_checkpoint(lqae_checkpoint, language_model=minilm)
    x = torch.from_numpy(images[:, None].astype(np.float32))
    with torch.inference_mode():
        ids = model.encode(x)
        reconstructions = model.decode(ids)[:, 0].numpy()
    row = result["reconstruction"]["checkpoint"]
    mean_per_image, dataset = psnr_by_hand(reconstructions, images)
    assert row["psnr_mean_per_image_db"] == pytest.approx(mean_per_image, abs=1e-4)
    assert row["psnr_dataset_db"] == pytest.approx(dataset, abs=1e-4)
    assert row["psnr_mean_per_image_db"] != pytest.approx(row["psnr_dataset_db"], abs=1e-3)  # two definitions
    _, counts = np.unique(ids.numpy(), return_counts=True)
    p = counts / counts.sum()
    assert row["distinct_tokens"] == len(counts)
    assert row["codebook_size"] == model.quantizer.codebook_size == 29523
    assert row["codebook_usage"] == pytest.approx(len(counts) / 29523)
    assert row["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert row["tokens_per_image"] == 16


def test_pca_row_against_sklearn(result, folders):
    train, _ = read_folder(folders[0])
    test, _ = read_folder(folders[1])
    pca = PCA(16, random_state=0).fit(train.reshape(len(train), -1))
    reconstructions = np.clip(pca.inverse_transform(pca.transform(test.reshape(len(test), -1))), 0, 1)
    mean_per_image, dataset = psnr_by_hand(reconstructions.reshape(test.shape), test)
    row = result["reconstruction"]["pca"]
    assert row["tokens_per_image"] == 16  # as many coefficients as the checkpoint has tokens
    assert row["psnr_mean_per_image_db"] == pytest.approx(mean_per_image, abs=1e-3)
    assert row["psnr_dataset_db"] == pytest.approx(dataset, abs=1e-3)


@pytest.mark.parametrize("k", [K_SMALL, K_LARGE])
def test_kmeans_rows_against_sklearn(result, folders, k):
    train, _ = read_folder(folders[0])
    test, _ = read_folder(folders[1])
    # Fewer train patches (30 x 16) than the cap: all of them, in image order, grid row-major.
    kmeans = MiniBatchKMeans(k, batch_size=16384, n_init=1, max_iter=20, random_state=0)
    kmeans.fit(patches_by_hand(train, 7).reshape(-1, 49).astype(np.float32))
    tokens = kmeans.predict(patches_by_hand(test, 7).reshape(-1, 49).astype(np.float32)).reshape(len(test), 16)
    centres = kmeans.cluster_centers_
    reconstructions = np.zeros_like(test)
    for n in range(len(test)):
        for t in range(16):
            r, c = divmod(t, 4)
            reconstructions[n, r * 7:(r + 1) * 7, c * 7:(c + 1) * 7] = centres[tokens[n, t]].reshape(7, 7)
    mean_per_image, dataset = psnr_by_hand(reconstructions, test)
    row = result["reconstruction"][f"kmeans_{k}"]
    assert row["psnr_mean_per_image_db"] == pytest.approx(mean_per_image, abs=1e-3)
    assert row["psnr_dataset_db"] == pytest.approx(dataset, abs=1e-3)
    assert row["codebook_size"] == k
    assert row["codebook_usage"] == pytest.approx(len(np.unique(tokens)) / k)
    if k == K_SMALL:  # the smallest K gives the one-hot probe
        _, y_train = read_folder(folders[0])
        _, y_test = read_folder(folders[1])
        train_tokens = kmeans.predict(patches_by_hand(train, 7).reshape(-1, 49).astype(np.float32)).reshape(-1, 16)
        encoder = OneHotEncoder(categories=[list(range(k))] * 16).fit(train_tokens)
        expected = probe_accuracy(encoder.transform(train_tokens), y_train, encoder.transform(tokens), y_test,
                                  scale=False)
        probe = result["linear_probe"][f"kmeans_{k}_one_hot"]
        assert probe["accuracy"] == pytest.approx(expected)
        assert (probe["width"], probe["scaler"]) == (16 * k, "none")


def test_probes_against_sklearn(result, lqae_checkpoint, folders, minilm):
    train, y_train = read_folder(folders[0])
    test, y_test = read_folder(folders[1])
    probes = result["linear_probe"]
    assert probes["raw_pixels"]["accuracy"] == pytest.approx(
        probe_accuracy(train.reshape(len(train), -1), y_train, test.reshape(len(test), -1), y_test))
    model = load_checkpoint(lqae_checkpoint, language_model=minilm)
    layers = {"encoder": [n for n in model.feature_layer_names() if n.startswith("encoder.")],
              "lm_layers": [n for n in model.feature_layer_names() if n.startswith("lm.")]}
    for key, names in layers.items():
        with torch.inference_mode():
            a, b = (model.features(torch.from_numpy(x[:, None].astype(np.float32)), names).numpy()
                    for x in (train, test))
        assert probes[key]["width"] == a.shape[1]
        assert probes[key]["accuracy"] == pytest.approx(probe_accuracy(a, y_train, b, y_test)), key
    for row in probes.values():
        assert row["converged"] and 0 < row["iterations"] < 5000


def test_few_shot_cells_against_the_episode_functions(result, lqae_checkpoint, folders, minilm):
    test, y_test = read_folder(folders[1])
    model = load_checkpoint(lqae_checkpoint, language_model=minilm)
    with torch.inference_mode():
        ids = model.encode(torch.from_numpy(test[:, None].astype(np.float32))).numpy()
    pixels = test.reshape(len(test), -1)
    cells = {cell["ways"]: cell for cell in result["few_shot"]}
    assert set(cells) == {2, 5}
    for n_way, cell in cells.items():
        episodes = sample_episodes(y_test, n_way, 1, 1, EPISODES, seed=0)
        overlap = [np.mean(token_overlap_predict(ids[e.support], e.support_y, ids[e.query]) == e.query_y)
                   for e in episodes]
        prototypes = [np.mean(prototype_predict(pixels[e.support], e.support_y, pixels[e.query]) == e.query_y)
                      for e in episodes]
        assert cell["token_overlap"]["mean"] == pytest.approx(np.mean(overlap))
        assert cell["pixel_prototypes"]["mean"] == pytest.approx(np.mean(prototypes))
        assert cell["token_overlap"]["episodes"] == EPISODES
        sd = np.std(overlap, ddof=1)
        if sd > 0:  # Student t, 29 degrees of freedom
            assert cell["token_overlap"]["ci95_half_width"] == pytest.approx(2.0452 * sd / math.sqrt(EPISODES),
                                                                             rel=1e-3)
        assert 0 <= cell["token_overlap_kmeans"]["mean"] <= 1 and cell["kmeans_clusters"] == K_SMALL
        assert cell["llm"] is None


def test_result_says_what_was_run(result, folders):
    assert result["quick"] is False
    assert result["sizes"] == {"train_images": 30, "test_images": 15, "kmeans_patches": 480,
                               "kmeans_patches_available": 480, "episodes_per_cell": EPISODES,
                               "llm_episodes_per_cell": 0}
    assert result["data"]["split"] == "given" and result["data"]["classes"] == sorted(CLASSES)
    assert result["checkpoint"]["model"] == "LQAE" and result["checkpoint"]["grid"] == 4
    json.dumps(result, allow_nan=False)  # strict JSON
    markdown = evaluation_markdown(result)
    for text in ("Full run", "mean of per-image PSNR", "dataset-level 10·log10(1/mean MSE)", "PCA, 16 coefficients",
                 f"k-means K = {K_LARGE}, 7 x 7 patches", "LM-layer features (every hidden state)",
                 "one-hot position x token", "2-way", "5-way", "evaluate_checkpoint("):
        assert text in markdown, text
    row = f"{result['reconstruction']['pca']['psnr_mean_per_image_db']:.2f} dB"
    assert row in markdown


def test_markdown_calls_a_run_full_only_when_it_read_every_image(result):
    assert "Full run" in evaluation_markdown(result)  # every image of both folders
    for split in ("train", "test"):
        fewer = json.loads(json.dumps(result))
        fewer["data"][f"{split}_available"] += 1  # one image of the split left out
        markdown = evaluation_markdown(fewer)
        assert "**Subsampled run**" in markdown and "Full run" not in markdown, split


# -- reproducibility -----------------------------------------------------------------------------------------
def test_same_seed_same_figures_other_seed_other_split(lqae_checkpoint, folders, tmp_path):
    # One folder, split by the seed: train and test come out of the same 45 images.
    merged = tmp_path / "all"
    for folder in folders:
        for path in folder.rglob("*.png"):
            target = merged / path.parent.name / f"{folder.name}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    run = lambda seed: evaluate_checkpoint(lqae_checkpoint, data=str(merged), kmeans_sizes=(K_SMALL,),  # noqa: E731
                                           ways=(2,), n_episodes=10, random_state=seed, device="cpu")
    first, again, other = run(3), run(3), run(4)
    assert without_timings(first) == without_timings(again)
    assert first["sizes"]["test_images"] == 9  # 0.2 of 45, stratified
    assert without_timings(first)["reconstruction"] != without_timings(other)["reconstruction"]


# -- other data and models -----------------------------------------------------------------------------------
def test_vqvae_checkpoint_has_no_lm_rows(vqvae_checkpoint, folders):
    train, test = folders
    result = evaluate_checkpoint(vqvae_checkpoint, data=str(train), test_data=str(test), kmeans_sizes=(K_SMALL,),
                                 ways=(2,), n_episodes=5, llm_episodes=3, device="cpu")
    assert result["checkpoint"]["model"] == "VQVAE" and result["checkpoint"]["language_model"] is None
    assert result["linear_probe"]["lm_layers"] is None
    assert result["reconstruction"]["checkpoint"]["codebook_size"] == 64
    assert result["sizes"]["llm_episodes_per_cell"] == 0 and result["few_shot"][0]["llm"] is None
    assert "n/a (no language model)" in evaluation_markdown(result)


def test_fashion_mnist_quick_run(lqae_checkpoint, monkeypatch):
    """The default data, through fetch_fashion_mnist (here: the shipped subset), subsampled by --quick."""
    import lqae_sklearn.datasets

    monkeypatch.setattr(lqae_sklearn.datasets, "fetch_fashion_mnist",
                        lambda subset, return_X_y: fashion_mnist_subset(subset))
    result = evaluate_checkpoint(lqae_checkpoint, quick=True, n_train=30, n_test=20, kmeans_sizes=(600,),
                                 ways=(2,), device="cpu")
    assert result["quick"] is True and result["data"]["source"] == "fashion-mnist"
    assert (result["sizes"]["train_images"], result["sizes"]["test_images"]) == (30, 20)
    assert (result["data"]["train_available"], result["data"]["test_available"]) == (1000, 500)
    assert result["sizes"]["episodes_per_cell"] == 200  # quick's default
    assert result["data"]["classes"][0] == "0: T-shirt/top"
    # K = 600 is more than the 480 train patches: capped, and said so.
    row = result["reconstruction"]["kmeans_600"]
    assert (row["requested_clusters"], row["codebook_size"]) == (600, 480)
    assert "capped at 480" in row["label"]
    assert "**Quick run** (subsampled)" in evaluation_markdown(result)


# -- the command ---------------------------------------------------------------------------------------------
def test_cli_writes_json_and_markdown(lqae_checkpoint, folders, tmp_path):
    train, test = folders
    stem = tmp_path / "out" / "eval.v1"  # a dot in the stem is kept; the folder is created
    outcome = CliRunner().invoke(cli, [str(lqae_checkpoint), "--data", str(train), "--test-data", str(test),
                                       "-k", str(K_SMALL), "--way", "2", "--episodes", "5", "--max-iter", "2",
                                       "--device", "cpu", "--out", str(stem), "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    written = json.loads(Path(f"{stem}.json").read_text())
    markdown = Path(f"{stem}.md").read_text()
    assert markdown in outcome.output
    assert written["command"] == (f"lqae-eval {lqae_checkpoint} --data {train} --test-data {test} --kmeans "
                                  f"{K_SMALL} --way 2 --episodes 5 --max-iter 2 --device cpu --out {stem}")
    assert written["command"] in markdown
    # lbfgs stopped by --max-iter 2 is flagged, in the JSON and in the Markdown.
    assert not written["linear_probe"]["raw_pixels"]["converged"]
    assert written["linear_probe"]["raw_pixels"]["iterations"] == 2 and written["linear_probe"]["raw_pixels"]["hit_cap"]
    assert "(**not converged**: hit the cap)" in markdown
    assert sorted(os.listdir(stem.parent)) == ["eval.v1.json", "eval.v1.md"]  # no temporaries left


@pytest.fixture
def invoke():
    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])
    return run


def test_missing_checkpoint_is_a_usage_error_in_a_real_process(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    done = subprocess.run([sys.executable, "-m", "lqae_sklearn.cli.eval", str(missing)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert f"lqae-eval: error: checkpoint {str(missing)!r} does not exist" in done.stderr


def test_bad_folders_are_usage_errors_naming_them(invoke, lqae_checkpoint, folders, tmp_path):
    train, _ = folders

    def folder(name, classes, extra=None):
        root = tmp_path / name
        root.mkdir()
        for label in classes:
            (root / label).mkdir(parents=True)
            for path in sorted((train / "coat").iterdir())[:3]:
                (root / label / path.name).write_bytes(path.read_bytes())
        for relative, data in (extra or {}).items():
            (root / relative).write_bytes(data)
        return root

    empty = folder("empty", [])
    one_class = folder("one-class", ["bag"])
    loose = folder("loose", ["coat", "dress"], {"x.png": (train / "coat" / "000.png").read_bytes()})
    broken = folder("broken", ["coat", "dress"], {"dress/c.png": b"not a png"})
    unseen = folder("unseen", ["coat", "bag"])
    cases = [
        (["--data", tmp_path / "nowhere"], f"data folder {str(tmp_path / 'nowhere')!r} does not exist"),
        (["--data", empty], f"data folder {str(empty)!r} holds no image files"),
        (["--data", one_class], f"data folder {str(one_class)!r} has one class ('bag', 3 images)"),
        (["--data", train, "--test-data", one_class], f"test_data folder {str(one_class)!r} has one class"),
        (["--data", loose], f"{str(loose / 'x.png')!r} sits directly in the folder, so it has no class"),
        (["--data", train, "--test-data", broken], f"{str(broken / 'dress' / 'c.png')!r}): not an image"),
        (["--data", train, "--test-data", unseen], f"test_data {str(unseen)!r} has classes the training data "
                                                   f"{str(train)!r} lacks: bag"),
        (["--data", train, "--out", tmp_path], "must be a file stem"),
        (["--data", train, "--device", "nonsense-device"], "device must be 'auto' or a torch device"),
    ]
    for args, message in cases:
        outcome = invoke(lqae_checkpoint, *args, "--no-progress")
        assert outcome.exit_code == 2, (args, outcome.output)
        assert "lqae-eval: error: " in outcome.output and message in outcome.output, (args, outcome.output)


def test_a_class_of_one_image_cannot_be_split(invoke, lqae_checkpoint, folders, tmp_path):
    single = tmp_path / "single"
    for name, count in (("coat", 1), ("dress", 4)):
        (single / name).mkdir(parents=True)
        for i in range(count):
            (single / name / f"{i}.png").write_bytes((folders[0] / name / f"{i:03d}.png").read_bytes())
    outcome = invoke(lqae_checkpoint, "--data", single, "--no-progress")
    assert outcome.exit_code == 2
    assert f"data folder {str(single)!r}: class 'coat' has 1 image" in outcome.output


def test_a_split_too_small_for_every_class_says_which_fractions_work(invoke, lqae_checkpoint, folders):
    # 5 classes x 6 images: test_fraction 0.1 gives 3 test images, fewer than the 5 classes.
    train, _ = folders
    outcome = invoke(lqae_checkpoint, "--data", train, "--test-fraction", "0.1", "--no-progress")
    assert outcome.exit_code == 2
    assert (f"data {str(train)!r} cannot be split with test_fraction=0.1: its 30 images give 3 test and 27 train "
            f"images for 5 classes, and each split needs one image of every class; give a test_fraction from 0.17 "
            f"to 0.83, or test_data") in outcome.output


def test_benchmark_regenerates_the_model_cards_tables_and_nothing_else(lqae_checkpoint, folders, tmp_path):
    train, test = folders
    card = tmp_path / "card.md"
    before, after = "# Card\n\nProse before.\n", "\nProse after.\n"
    card.write_text(f"{before}<!-- lqae-eval: begin -->\nold tables\n<!-- lqae-eval: end -->\n{after}")
    script = Path(__file__).parents[1] / "benchmarks" / "evaluate_checkpoint.py"
    arguments = [sys.executable, str(script), str(lqae_checkpoint), "--data", str(train), "--test-data", str(test),
                 "-k", str(K_SMALL), "--way", "2", "--episodes", "5", "--llm-episodes", "0", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "eval"), "--model-card", str(card)]
    done = subprocess.run(arguments, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tables = (tmp_path / "eval.md").read_text()
    regenerated = f"<!-- lqae-eval: begin -->\n\n{tables.strip()}\n\n<!-- lqae-eval: end -->\n"
    assert card.read_text() == before + regenerated + after
    # A card without the two lines is refused before the run: nothing is written.
    card.write_text("no markers\n")
    arguments[arguments.index("--out") + 1] = str(tmp_path / "again")
    done = subprocess.run(arguments, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"--model-card {str(card)!r} must hold one line '<!-- lqae-eval: begin -->'" in done.stderr
    assert card.read_text() == "no markers\n" and not (tmp_path / "again.json").exists()


@pytest.mark.slow  # loads the embedded Gemma
def test_llm_rows(lqae_checkpoint, folders):
    train, test = folders
    result = evaluate_checkpoint(lqae_checkpoint, data=str(train), test_data=str(test), kmeans_sizes=(K_SMALL,),
                                 ways=(2,), n_episodes=6, llm_episodes=2, device="cpu")
    cell = result["few_shot"][0]
    assert cell["llm"]["episodes"] == 2 and cell["llm"]["tokens_per_image"] == 16
    assert cell["pixel_prototypes_llm_episodes"]["episodes"] == 2
    assert "LLM, default pipeline" in evaluation_markdown(result)

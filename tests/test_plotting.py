"""lqae_sklearn.plotting: the displays, drawn headless (Agg), on the shipped checkpoint and odd inputs."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from _llm_models import tiny_model_dir
from conftest import tiny_config

from lqae_sklearn import LQAE, LLMFewShotClassifier, LQAETokenizer, save_checkpoint
from lqae_sklearn.plotting import (
    FewShotEpisodeDisplay,
    ReconstructionDisplay,
    TokenMapDisplay,
    _episode,
    _reconstruction,
    _token_map,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = sorted((REPO / "examples" / "fashion-mnist").glob("*/*.png"))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def tokenizer():
    return LQAETokenizer(device="cpu", output="ids").fit()


@pytest.fixture(scope="module")
def coarse_tokenizer():
    return LQAETokenizer(device="cpu", output="ids", token_grid=3).fit()


@pytest.fixture(scope="module")
def rgb_tokenizer(tmp_path_factory, minilm):
    """An untrained RGB checkpoint (patch 7: 4 x 4 tokens): the displays must draw colour as colour."""
    import torch

    torch.manual_seed(0)
    path = save_checkpoint(LQAE(tiny_config(in_channels=3), minilm).eval(), tmp_path_factory.mktemp("rgb") / "ck")
    return LQAETokenizer(path, device="cpu", output="ids").fit()


def _texts(display):
    return [t.get_text() for t in display.texts_]


# -- TokenMapDisplay ------------------------------------------------------------------------------------------
def test_token_map_writes_each_token_on_its_patch(tokenizer, fmnist_uint8):
    display = TokenMapDisplay.from_estimator(tokenizer, fmnist_uint8[0])
    expected = tokenizer.ids_to_text(tokenizer.transform(fmnist_uint8[:1]))[0].split(" ")
    assert _texts(display) == expected and len(expected) == 49
    assert display.image_.get_array().shape == (28, 28)
    assert display.figure_ is display.ax_.figure
    # Token i sits at the centre of patch (i // 7, i % 7): 4 x 4 pixels each.
    for i in (0, 8, 48):
        row, col = divmod(i, 7)
        assert display.texts_[i].get_position() == pytest.approx((4 * col + 2, 4 * row + 2))
    # The words are the ones of output="text", whatever the tokenizer's own output is.
    assert tokenizer.output_ == "ids"


def test_token_map_on_coarse_token_grid_follows_inverse_transform_regions(coarse_tokenizer, fmnist_uint8):
    display = TokenMapDisplay.from_estimator(coarse_tokenizer, fmnist_uint8[3])
    assert _texts(display) == coarse_tokenizer.ids_to_text(coarse_tokenizer.transform(fmnist_uint8[3:4]))[0].split()
    assert len(display.texts_) == 9
    # 7 patches into 3 regions: 3, 2 and 2 patches (12, 8 and 8 pixels), as unpool_tokens spreads the tokens.
    centres = sorted({t.get_position()[0] for t in display.texts_})
    assert centres == pytest.approx([6.0, 16.0, 24.0])
    assert sorted(line.get_xdata()[0] for line in display.ax_.lines if line.get_xdata()[0] == line.get_xdata()[1]) \
        == pytest.approx([12.0, 20.0])


@pytest.mark.parametrize("form", ["path", "pil", "uint8", "float", "rgb", "batch_of_one", "bigger"])
def test_token_map_takes_any_single_image_form(tokenizer, form):
    path = EXAMPLE_IMAGES[0]
    pixels = np.asarray(Image.open(path))
    image = {
        "path": str(path),
        "pil": Image.open(path),
        "uint8": pixels,
        "float": pixels / 255.0,
        "rgb": np.repeat(pixels[..., None], 3, axis=-1),  # a grayscale checkpoint reads RGB as gray
        "batch_of_one": pixels[None],
        "bigger": np.asarray(Image.open(path).resize((56, 56))),
    }[form]
    display = TokenMapDisplay.from_estimator(tokenizer, image)
    assert _texts(display) == tokenizer.ids_to_text(tokenizer.transform([str(path)]))[0].split() or form == "bigger"
    assert len(display.texts_) == 49
    assert display.image_.get_array().shape == (28, 28)  # drawn as the checkpoint reads it


def test_token_map_on_rgb_checkpoint_draws_colour(rgb_tokenizer):
    image = np.random.default_rng(0).random((28, 28, 3))
    display = TokenMapDisplay.from_estimator(rgb_tokenizer, image)
    assert display.image_.get_array().shape == (28, 28, 3)
    assert _texts(display) == rgb_tokenizer.ids_to_text(rgb_tokenizer.transform(image[None]))[0].split()
    assert len(display.texts_) == 16


def test_token_map_fits_long_words_by_shrinking_them_not_cutting_them():
    long_word = "supercalifragilisticexpialidocious"
    display = TokenMapDisplay(np.zeros((28, 28)), ["a", long_word, "bc", "d"]).plot()
    assert _texts(display) == ["a", long_word, "bc", "d"]
    assert display.texts_[1].get_fontsize() < display.texts_[0].get_fontsize()
    display.figure_.canvas.draw()
    renderer = display.figure_.canvas.get_renderer()
    word_box = display.texts_[2].get_window_extent(renderer)
    cell_width = display.ax_.transData.transform((14, 0))[0] - display.ax_.transData.transform((0, 0))[0]
    assert word_box.width < cell_width


def test_token_map_single_token_and_explicit_fontsize():
    fig, ax = plt.subplots()
    display = TokenMapDisplay(np.ones((5, 5, 3)), ["whole"]).plot(ax=ax, fontsize=9, grid_color=None)
    assert display.ax_ is ax and display.figure_ is fig
    assert _texts(display) == ["whole"] and display.texts_[0].get_fontsize() == 9
    assert display.image_.get_array().shape == (5, 5, 3)


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((4, 28, 28)), ValueError, r"image must be one image.*shape \(4, 28, 28\).*X\[0\]"),
        (np.zeros(28), ValueError, r"image must be one image.*shape \(28,\)"),
        ("no/such/file.png", ValueError, r"no such file"),
        ({"a": 1}, TypeError, r"image must be one image.*dict"),
        (np.full((28, 28), 2.0), ValueError, r"pixel values span"),
    ],
)
def test_token_map_bad_image_names_the_input(tokenizer, image, error, match):
    with pytest.raises(error, match=match):
        TokenMapDisplay.from_estimator(tokenizer, image)


def test_token_map_bad_tokenizer_or_tokens_are_named():
    with pytest.raises(TypeError, match=r"tokenizer must be a fitted LQAETokenizer, got str"):
        TokenMapDisplay.from_estimator("not a tokenizer", np.zeros((28, 28)))
    with pytest.raises(NotFittedError):
        TokenMapDisplay.from_estimator(LQAETokenizer(), np.zeros((28, 28)))
    with pytest.raises(ValueError, match=r"tokens must fill a square grid .* got 3"):
        TokenMapDisplay(np.zeros((28, 28)), ["a", "b", "c"]).plot()
    with pytest.raises(TypeError, match=r"not a single string"):
        TokenMapDisplay(np.zeros((28, 28)), "a b c d").plot()
    with pytest.raises(ValueError, match=r"image must have shape \(H, W\) or \(H, W, 3\), got \(2, 28, 28\)"):
        TokenMapDisplay(np.zeros((2, 28, 28)), ["a"]).plot()
    with pytest.raises(ValueError, match=r"patch_grid must be None or an int >= the token grid \(3\)"):
        TokenMapDisplay(np.zeros((28, 28)), list("abcdefghi"), patch_grid=2).plot()


# -- ReconstructionDisplay ------------------------------------------------------------------------------------
def test_reconstructions_are_inverse_transform_of_the_tokens(tokenizer, fmnist_uint8):
    X = fmnist_uint8[:5]
    display = ReconstructionDisplay.from_estimator(tokenizer, X)
    expected = np.clip(tokenizer.inverse_transform(tokenizer.transform(X)), 0, 1)
    np.testing.assert_allclose(display.reconstructions, expected)
    np.testing.assert_allclose(display.originals, X / 255.0, atol=1e-6)
    mosaic = display.image_.get_array()
    assert mosaic.shape == (2 * 28 + 1, 5 * 28 + 4)
    np.testing.assert_allclose(mosaic[29:, 29:57], expected[1])  # second column, bottom row
    assert [t.get_text() for t in display.ax_.get_yticklabels()] == ["original", "from tokens"]
    psnr = 10 * np.log10(1 / ((X / 255.0 - expected) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(display.psnr_, psnr, rtol=1e-4)
    assert [t.get_text() for t in display.ax_.get_xticklabels()] == [f"{p:.1f} dB" for p in display.psnr_]
    assert (display.psnr_ > 10).all()  # the shipped checkpoint reconstructs real images (17.8 dB on average)


def test_reconstructions_single_image_paths_coarse_grid_and_rgb(tokenizer, coarse_tokenizer, rgb_tokenizer):
    one = ReconstructionDisplay.from_estimator(tokenizer, [str(EXAMPLE_IMAGES[0])])
    assert one.image_.get_array().shape == (57, 28) and one.psnr_.shape == (1,)
    coarse = ReconstructionDisplay.from_estimator(coarse_tokenizer, [str(p) for p in EXAMPLE_IMAGES[:3]])
    np.testing.assert_allclose(coarse.reconstructions, np.clip(coarse_tokenizer.inverse_transform(
        coarse_tokenizer.transform([str(p) for p in EXAMPLE_IMAGES[:3]])), 0, 1))
    rgb = ReconstructionDisplay.from_estimator(rgb_tokenizer, np.random.default_rng(0).random((2, 28, 28, 3)))
    assert rgb.image_.get_array().shape == (57, 57, 3)
    exact = ReconstructionDisplay(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))).plot(show_psnr=False)
    assert exact.psnr_[0] == np.inf and exact.ax_.get_xticks().size == 0


def test_reconstructions_bad_input_is_named(tokenizer):
    with pytest.raises(TypeError, match=r"single path"):
        ReconstructionDisplay.from_estimator(tokenizer, str(EXAMPLE_IMAGES[0]))
    with pytest.raises(ValueError, match=r"X has shape \(28, 28\): flat rows must hold .* 784"):
        ReconstructionDisplay.from_estimator(tokenizer, np.zeros((28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"same shape, got \(2, 8, 8\) and \(2, 8, 9\)"):
        ReconstructionDisplay(np.zeros((2, 8, 8)), np.zeros((2, 8, 9))).plot()
    with pytest.raises(ValueError, match=r"originals must hold finite pixel values in \[0, 1\]"):
        ReconstructionDisplay(np.full((1, 8, 8), np.nan), np.zeros((1, 8, 8))).plot()
    with pytest.raises(TypeError, match=r"ax must be a matplotlib Axes or None, got int"):
        ReconstructionDisplay(np.zeros((1, 8, 8)), np.zeros((1, 8, 8))).plot(ax=3)


# -- FewShotEpisodeDisplay ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def episode():
    """Two classes of the shipped example images, two shots each, and a query of the first class."""
    import torch

    torch.set_num_threads(1)
    bags = sorted((REPO / "examples" / "fashion-mnist" / "bag").glob("*.png"))
    boots = sorted((REPO / "examples" / "fashion-mnist" / "ankle-boot").glob("*.png"))
    sneakers = sorted((REPO / "examples" / "fashion-mnist" / "sneaker").glob("*.png"))
    X = [str(p) for p in bags + boots]
    y = np.array(["dax", "dax", "supercalifragilistic", "supercalifragilistic"])
    pipe = make_pipeline(LQAETokenizer(output="text", token_grid=2, device="cpu"),
                         LLMFewShotClassifier(tiny_model_dir(), n_examples_per_class=2, random_state=0))
    return pipe.fit(X, y), X, y, str(sneakers[0])


def test_episode_shows_demonstrations_in_prompt_order_and_the_probabilities(episode):
    pipe, X, y, query = episode
    display = FewShotEpisodeDisplay.from_estimator(pipe, X, y, query, query_label="dax")
    classifier = pipe[-1]
    # The query's own demonstrations (the default shows each query its nearest ones): both of each class,
    # interleaved, and the nearer of each class's two last.
    order = classifier.demonstrations_for(pipe[:-1].transform([query]))[0]
    assert sorted(order.tolist()) == [0, 1, 2, 3] and set(y[order[:2]]) == set(y[order[2:]]) == set(y)
    query_text = pipe[:-1].transform([query])
    for label in ("dax", "supercalifragilistic"):
        lines = classifier.format_prompt(query_text[0], label).split("\n")[:2]
        assert lines == [f"{label}: {classifier.neighbors_.texts_[i]}" for i in order if y[i] == label]
    assert [ax.get_title() for ax in display.support_axes_] == list(y[order])
    tokenizer = pipe[0]
    for ax, i in zip(display.support_axes_, order):
        np.testing.assert_allclose(ax.images[0].get_array(), np.asarray(Image.open(X[i])) / 255.0, atol=1e-6)
    expected = pipe.predict_proba([query])[0]
    np.testing.assert_allclose(display.proba, expected)
    np.testing.assert_allclose([bar.get_width() for bar in display.bars_], expected)
    assert [t.get_text() for t in display.proba_ax_.get_yticklabels()] == list(classifier.classes_)
    assert display.query_ax_.get_xlabel() == "answer: dax"
    assert display.query_ax_.images[0].get_array().shape == (28, 28)
    assert tokenizer.output_ == "text"
    colours = [tuple(bar.get_facecolor()) for bar in display.bars_]
    assert colours[int(np.argmax(expected))] != colours[1 - int(np.argmax(expected))]


def test_episode_single_shot_many_classes_and_rgb_pictures():
    support = np.random.default_rng(0).random((5, 28, 28, 3))
    names = ["dax", "blicket", "wug", "toma", "fep"]
    fig, ax = plt.subplots(figsize=(9, 3))
    display = FewShotEpisodeDisplay(support, names, support[0], np.full(5, 0.2), names).plot(ax=ax)
    assert display.ax_ is ax and display.figure_ is fig
    assert len(display.support_axes_) == 5 and display.support_axes_[0].images[0].get_array().shape == (28, 28, 3)
    assert display.query_ax_.get_xlabel() == ""
    # Support sets whose size is no multiple of the classes still get a grid.
    odd = FewShotEpisodeDisplay(support[:3], ["dax", "dax", "wug"], support[0], [0.9, 0.1], ["dax", "wug"]).plot()
    assert [a.get_title() for a in odd.support_axes_] == ["dax", "dax", "wug"]


def test_episode_bad_input_is_named(episode, tokenizer):
    pipe, X, y, query = episode
    with pytest.raises(TypeError, match=r"estimator must be a fitted Pipeline whose first step is an LQAETokenizer"):
        FewShotEpisodeDisplay.from_estimator(pipe[-1], X, y, query)
    with pytest.raises(ValueError, match=r"X has 4 images but y has 3 labels"):
        FewShotEpisodeDisplay.from_estimator(pipe, X, y[:3], query)
    with pytest.raises(ValueError, match=r"query must be one image.*shape \(2, 28, 28\)"):
        FewShotEpisodeDisplay.from_estimator(pipe, X, y, np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match=r"proba has 3 values for 2 classes"):
        FewShotEpisodeDisplay(np.zeros((2, 8, 8)), ["a", "b"], np.zeros((8, 8)), [0.2, 0.3, 0.5], ["a", "b"]).plot()
    with pytest.raises(ValueError, match=r"support_labels has 1 labels for 2 support_images"):
        FewShotEpisodeDisplay(np.zeros((2, 8, 8)), ["a"], np.zeros((8, 8)), [0.5, 0.5], ["a", "b"]).plot()


# -- the module as a whole ------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [_token_map, _reconstruction, _episode])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_missing_matplotlib_names_the_extra():
    code = textwrap.dedent("""
        import sys
        sys.modules["matplotlib"] = None  # as if it were not installed
        import numpy as np
        from lqae_sklearn.plotting import TokenMapDisplay  # importing needs no matplotlib
        try:
            TokenMapDisplay(np.zeros((4, 4)), ["a"]).plot()
        except ImportError as exc:
            print(exc)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "pip install 'lqae-sklearn[plotting]'" in out

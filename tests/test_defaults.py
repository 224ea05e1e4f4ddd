"""The defaults are the measured best: what a user gets from ``LQAETokenizer()`` and ``LLMFewShotClassifier()``.

The accuracy claims behind them are benchmarks (``benchmarks/default_pipeline.py``,
``docs/benchmarks.md``); these tests pin down what the defaults *are*, so that a change of
default cannot slip in without a new measurement.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from conftest import fashion_mnist_subset
from lqae_sklearn import CheckpointError, LLMFewShotClassifier, LQAETokenizer
from lqae_sklearn.model import DEFAULT_CHECKPOINT

sys.path.insert(0, str(Path(__file__).parent))
from _llm_models import tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def data():
    X, y = fashion_mnist_subset("train")
    keep = np.concatenate([np.flatnonzero(y == c)[:12] for c in range(10)])
    return X[keep], y[keep]


@pytest.fixture(scope="module")
def held_out():
    """The whole shipped subset: 1,000 training images and 500 held-out test images."""
    return fashion_mnist_subset("train"), fashion_mnist_subset("test")


def seeded_noise(X):
    """Gaussian features of the default width that carry nothing of the images: the control."""
    return np.random.default_rng(0).standard_normal((len(X), 4 * 256)).astype(np.float32)


def test_the_default_transform_is_the_probe_features(data):
    X, _ = data
    tok = LQAETokenizer().fit()
    features = tok.transform(X[:20])
    assert tok.output_ == "embeddings" and tok.layers_ == ["encoder.1", "encoder.2", "encoder.3", "encoder.4"]
    assert features.dtype == np.float32 and features.shape == (20, 4 * 256)
    # The model's own encoder-block features, computed here without the tokenizer.
    pixels = torch.from_numpy(X[:20, None].astype(np.float32) / 255.0).to(tok.device_)
    with torch.inference_mode():
        expected = tok.model_.features(pixels, tok.layers_).cpu().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)


def test_the_headline_pipeline_with_every_default_learns(held_out):
    """Held-out accuracy, against a control of seeded noise features through the same probe.

    Measured on the shipped subset (1,000 train -> 500 test): 0.772 with the default features, 0.098 with
    the noise (which scores 1.0 on its own training images: training accuracy in 1,024 dimensions proves
    nothing).
    """
    (X_train, y_train), (X_test, y_test) = held_out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # LogisticRegression's default max_iter, as a user runs it
        pipe = Pipeline([("lqae", LQAETokenizer()), ("logreg", LogisticRegression())]).fit(X_train, y_train)
        control = Pipeline([("noise", FunctionTransformer(seeded_noise)), ("logreg", LogisticRegression())])
        control.fit(X_train, y_train)
    assert pipe.named_steps["logreg"].n_features_in_ == 1024
    real, noise = pipe.score(X_test, y_test), control.score(X_test, y_test)
    assert noise < 0.2, noise  # the control is at chance (0.1): the protocol cannot be passed by noise
    assert real > 0.7 and real - noise > 0.5, (real, noise)


def test_auto_token_grid_follows_the_checkpoint_for_text_only():
    assert json.loads((Path(DEFAULT_CHECKPOINT) / "config.json").read_text())["inference"] == {"text_token_grid": 3}
    assert LQAETokenizer(output="text").fit().token_grid_ == 3
    for output in ("ids", "embeddings"):
        assert LQAETokenizer(output=output).fit().token_grid_ == 7
    assert LQAETokenizer(output="text", token_grid=None).fit().token_grid_ == 7  # the paper's: one per patch
    assert LQAETokenizer(output="text", token_grid=2).fit().token_grid_ == 2


def test_auto_token_grid_without_a_recommendation_is_one_token_per_patch(tmp_path):
    copy = shutil.copytree(DEFAULT_CHECKPOINT, tmp_path / "ck")
    config_file = copy / "config.json"
    config = json.loads(config_file.read_text())
    del config["inference"]
    config_file.write_text(json.dumps(config))
    assert LQAETokenizer(copy, output="text").fit().token_grid_ == 7
    for bad in (0, 8, "3", True):
        config["inference"] = {"text_token_grid": bad}
        config_file.write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match="inference.text_token_grid"):
            LQAETokenizer(copy, output="text").fit()


def test_default_text_is_nine_coarse_tokens(data):
    X, _ = data
    texts = LQAETokenizer(output="text").fit().transform(X[:5])
    assert [len(t.split()) for t in texts] == [9] * 5


def test_the_classifier_scores_the_query_after_each_classs_own_demonstrations_by_default():
    clf = LLMFewShotClassifier(tiny_model_dir(), random_state=0)
    assert clf.label_scoring == "channel_per_class"
    clf.fit(["shoe bag", "wool heel"], ["dax", "wug"])
    assert clf.prompt_.label_scoring == "channel_per_class" and clf.prompt_.template == "{label}: {input}\n"
    # Each class's prompt holds its own demonstration only.
    assert clf.format_prompt("shoe", "dax") == "dax: shoe bag\ndax: shoe\n"
    assert clf.format_prompt("shoe", "wug") == "wug: wool heel\nwug: shoe\n"
    proba = clf.predict_proba(["shoe bag"])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_the_classifier_defaults_five_nearest_demonstrations_one_order_no_calibration():
    # Chosen by measurement (the class docstring, docs/benchmarks.md "Few-shot options" and "Nearest demonstrations
    # by default"); batch calibration stays off so that a query's answer does not depend on the queries predicted
    # with it.
    clf = LLMFewShotClassifier(tiny_model_dir(), random_state=0)
    assert (clf.n_examples_per_class, clf.demonstrations, clf.n_orders, clf.calibration) == (5, "nearest", 1, None)
    X = ["bag bag", "heel heel", "shoe bag", "wool heel"]
    y = ["dax", "wug", "dax", "wug"]
    clf.fit(X, y)
    queries = ["shoe bag wool", "heel", "bag"]
    together = clf.predict_proba(queries)
    alone = np.vstack([clf.predict_proba([q]) for q in queries])
    np.testing.assert_allclose(alone, together, rtol=1e-5)  # float32 padding moves scores by ~1e-6 (test_fewshot)
    # Each class's prompt shows its examples nearest to the query last (random ones keep the order of X), whatever
    # random_state is.
    assert clf.format_prompt("bag", "dax") == "dax: shoe bag\ndax: bag bag\ndax: bag\n"
    assert clf.format_prompt("heel", "wug") == "wug: wool heel\nwug: heel heel\nwug: heel\n"
    assert clf.format_prompt("shoe", "dax") == "dax: bag bag\ndax: shoe bag\ndax: shoe\n"
    np.testing.assert_array_equal(clf.set_params(random_state=1).fit(X, y).predict_proba(queries), together)


def test_with_one_example_per_class_the_default_shows_what_random_demonstrations_show():
    # The 1-shot episode figures measured under demonstrations="random" hold for the default: with one example
    # per class, each class's prompt is that example, for every query.
    X, y = ["shoe bag", "wool heel", "bag bag"], ["dax", "wug", "blicket"]
    queries = ["shoe bag wool", "heel", "bag"]
    nearest = LLMFewShotClassifier(tiny_model_dir()).fit(X, y)
    random = LLMFewShotClassifier(tiny_model_dir(), demonstrations="random", random_state=0).fit(X, y)
    for query in queries:
        for label in y:
            assert nearest.format_prompt(query, label) == random.format_prompt(query, label)
    np.testing.assert_array_equal(nearest.predict_proba(queries), random.predict_proba(queries))

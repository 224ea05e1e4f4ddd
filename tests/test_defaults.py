"""The defaults are the measured best: what a user gets from ``LQAETokenizer()`` and ``LLMFewShotClassifier()``.

The accuracy claims behind them are benchmarks (``benchmarks/default_pipeline.py``,
``docs/benchmarks.md``); these tests pin down what the defaults *are*, so that a change of
default cannot slip in without a new measurement.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

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


def test_the_default_transform_is_the_probe_features(data):
    X, _ = data
    tok = LQAETokenizer().fit()
    features = tok.transform(X[:20])
    assert tok.output_ == "embeddings" and tok.layers_ == ["encoder.1", "encoder.2", "encoder.3", "encoder.4"]
    assert features.dtype == np.float32 and features.shape == (20, 4 * 256)
    np.testing.assert_array_equal(features, LQAETokenizer(output="embeddings", layers="encoder").fit().transform(X[:20]))


def test_the_headline_pipeline_with_every_default_learns(data):
    X, y = data
    pipe = Pipeline([("lqae", LQAETokenizer()), ("logreg", LogisticRegression(max_iter=200))]).fit(X, y)
    assert pipe.named_steps["logreg"].n_features_in_ == 1024
    # Training accuracy on 120 images in 1,024 dimensions: a sanity check that the features carry the
    # labels (ids read as numbers did not); the test-set figure is a benchmark, not a unit test.
    assert pipe.score(X, y) > 0.9


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


def test_the_classifier_scores_through_the_noisy_channel_by_default():
    clf = LLMFewShotClassifier(tiny_model_dir(), random_state=0)
    assert clf.label_scoring == "channel"
    clf.fit(["shoe bag", "wool heel"], ["dax", "wug"])
    assert clf.prompt_.label_scoring == "channel" and clf.prompt_.template == "{label}: {input}\n"
    proba = clf.predict_proba(["shoe bag"])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)

"""LQAETokenizer and the scikit-learn estimator contract.

scikit-learn's whole common-check suite runs through ``parametrize_with_checks``.
The checks that fit on random 2-D data of 1 to 10 columns cannot apply to an
image model (flat rows must hold the checkpoint's 28 x 28 pixels), and are listed
in :data:`WIDTH_CHECKS` as expected failures; the test below the suite does their
job on real images. Then clone, pipelines, grid search and ``Pipeline(memory=...)``.
"""

from __future__ import annotations

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks as checks
from sklearn.utils.estimator_checks import parametrize_with_checks

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.model import DEFAULT_CHECKPOINT

from conftest import fashion_mnist_subset

_NOT_IMAGES = "fits on random rows of 1-10 columns; flat rows must hold the checkpoint's 28 x 28 = 784 pixels"
#: Checks that fit on random 2-D arrays whose width is not an image's, and why each cannot pass.
WIDTH_CHECKS = {
    name: _NOT_IMAGES
    for name in (
        "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
        "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
        "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object",
        "check_pipeline_consistency", "check_estimators_nan_inf", "check_estimators_pickle",
        "check_f_contiguous_array_estimator", "check_transformer_data_not_an_array", "check_transformer_general",
        "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_fit2d_1sample",
        "check_fit2d_1feature", "check_dict_unchanged", "check_fit_idempotent", "check_fit_check_is_fitted",
        "check_n_features_in", "check_fit2d_predict1d",
    )
}


@parametrize_with_checks([LQAETokenizer()], expected_failed_checks=lambda estimator: WIDTH_CHECKS)
def test_scikit_learn_common_checks(estimator, check):
    check(estimator)


def test_the_suite_runs_dozens_of_checks_and_most_pass():
    results = checks.check_estimator(LQAETokenizer(), on_fail=None, expected_failed_checks=WIDTH_CHECKS)
    status = [r["status"] for r in results]
    assert len(results) >= 40, len(results)
    assert "failed" not in status  # every failure is an expected one
    assert status.count("passed") >= 15, status
    assert set(WIDTH_CHECKS) <= {r["check_name"] for r in results if r["status"] == "xfail"}


@pytest.fixture(scope="session")
def checkpoint():
    return DEFAULT_CHECKPOINT  # the shipped, trained checkpoint


@pytest.fixture(scope="module")
def two_classes():
    """Trousers (1) and bags (8): 12 of each, easy to tell apart even for an untrained encoder."""
    X, y = fashion_mnist_subset("test")
    order = np.concatenate([np.flatnonzero(y == 1)[:12], np.flatnonzero(y == 8)[:12]])
    order = order[np.random.default_rng(0).permutation(order.size)]
    return X[order], y[order]


def test_tags_say_what_it_takes(checkpoint):
    tags = LQAETokenizer(checkpoint).__sklearn_tags__()
    assert tags.input_tags.two_d_array and tags.input_tags.three_d_array and tags.input_tags.string
    assert not tags.input_tags.sparse and not tags.input_tags.allow_nan
    assert tags.requires_fit and tags.transformer_tags is not None and not tags.non_deterministic


def test_fit_on_images_returns_self_leaves_params_and_adds_only_fitted_attributes(checkpoint, two_classes):
    """What the width checks ask (fit returns self, leaves the parameters, adds only fitted attributes,
    is idempotent), on real images and on their flat rows."""
    X, y = two_classes
    for data in (X, X.reshape(len(X), -1)):
        tok = LQAETokenizer(checkpoint=str(checkpoint), output="ids", layers=["encoder.4"], batch_size=8)
        params_before = joblib.hash(tok.get_params())
        public_before = {k for k in vars(tok) if not k.startswith("_")}
        assert tok.fit(data, y) is tok
        assert joblib.hash(tok.get_params()) == params_before
        added = {k for k in vars(tok) if not k.startswith("_")} - public_before
        assert added and all(name.endswith("_") for name in added), added
        ids = tok.transform(data[:4])
        assert ids.shape == (4, 49) and len({tuple(row) for row in ids.tolist()}) == 4  # the images' own tokens
        np.testing.assert_array_equal(tok.fit(data).transform(data[:4]), ids)  # fit is idempotent
        np.testing.assert_array_equal(tok.transform(data[:4][::-1]), ids[::-1])  # row order is kept


def test_clone_and_params(checkpoint):
    tok = LQAETokenizer(checkpoint, output="embeddings", layers=["lm.6"], batch_size=32)
    params = tok.get_params()
    assert params == {
        "checkpoint": checkpoint, "output": "embeddings", "layers": ["lm.6"], "batch_size": 32,
        "device": "auto", "language_model": None, "progress": False, "token_grid": "auto",
    }
    copy = clone(tok.fit())
    assert copy.get_params() == params and copy.get_params()["layers"] is not tok.layers
    assert not hasattr(copy, "checkpoint_")
    assert tok.set_params(output="text", batch_size=4) is tok and tok.output == "text" and tok.batch_size == 4
    with pytest.raises(ValueError, match="Invalid parameter"):
        tok.set_params(colour="red")


def test_pipeline_with_a_linear_probe(checkpoint, two_classes):
    X, y = two_classes
    probe = Pipeline([
        ("tokenizer", LQAETokenizer(checkpoint, output="embeddings", layers="last", batch_size=16)),
        ("scale", StandardScaler()),
        ("classify", LogisticRegression(max_iter=1000)),
    ])
    probe.fit(X[:16], y[:16])
    predictions = probe.predict(X[16:])
    assert predictions.shape == (8,) and set(predictions) <= {1, 8}
    assert probe.score(X[16:], y[16:]) >= 0.75  # chance is 0.5
    assert probe.named_steps["tokenizer"].get_feature_names_out().size == probe.named_steps["scale"].n_features_in_


def test_text_output_feeds_a_bag_of_tokens_probe(checkpoint, two_classes):
    X, y = two_classes
    bag = Pipeline([
        ("tokenizer", LQAETokenizer(checkpoint, output="text", token_grid=None, batch_size=16)),
        ("count", CountVectorizer(analyzer=str.split)),
        ("classify", LogisticRegression(max_iter=1000)),
    ])
    bag.fit(X, y)
    vocabulary = bag.named_steps["count"].vocabulary_
    words = sorted(vocabulary)
    rows = np.resize(np.array(words, dtype=object), -(-len(words) // 49) * 49).reshape(-1, 49)
    ids = bag.named_steps["tokenizer"].text_to_ids([" ".join(row) for row in rows])
    assert ids.shape == (len(rows), 49)  # every counted word is a codebook piece
    assert bag.score(X, y) >= 0.75


def test_grid_search_with_pipeline_memory_encodes_once_per_tokenizer_setting(checkpoint, two_classes, tmp_path, monkeypatch):
    """Probe candidates (C) reuse the cached encoding; only tokenizer settings re-encode."""
    X, y = two_classes
    fits = {"n": 0}
    original = LQAETokenizer.fit_transform

    def counting_fit_transform(self, X, y=None, **params):
        fits["n"] += 1
        return original(self, X, y, **params)

    monkeypatch.setattr(LQAETokenizer, "fit_transform", counting_fit_transform)
    # Encoder-only layer sets: no quantizer or LM pass, so the test stays quick.
    grid = {"tokenizer__layers": ["encoder.4", ["encoder.2", "encoder.3"]], "classify__C": [0.1, 1.0, 10.0]}
    cv = KFold(n_splits=2, shuffle=True, random_state=0)

    def search(memory):
        pipe = Pipeline(
            [("tokenizer", LQAETokenizer(checkpoint, output="embeddings", batch_size=16)),
             ("classify", LogisticRegression(max_iter=1000))],
            memory=memory,
        )
        fits["n"] = 0
        return GridSearchCV(pipe, grid, cv=cv).fit(X, y)

    cached = search(str(tmp_path / "cache"))
    # 2 tokenizer settings x 2 folds, + 1 refit on all of X; the 3 values of C add none.
    assert fits["n"] == 2 * 2 + 1
    uncached = search(None)
    assert fits["n"] == 6 * 2 + 1
    np.testing.assert_array_equal(cached.cv_results_["mean_test_score"], uncached.cv_results_["mean_test_score"])
    assert cached.best_params_ == uncached.best_params_
    best = cached.best_estimator_.named_steps["tokenizer"]
    assert best.layers == cached.best_params_["tokenizer__layers"]
    assert cached.predict(X).shape == y.shape

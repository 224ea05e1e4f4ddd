"""LQAETokenizer and the scikit-learn estimator contract.

``check_estimator`` skips every check for estimators whose input is not a 2-D
array, so the applicable checks from ``sklearn.utils.estimator_checks`` are run
one by one here, plus clone, pipelines, grid search and ``Pipeline(memory=...)``.
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

from lqae_sklearn import LQAETokenizer
from lqae_sklearn._checkpoint import DEFAULT_CHECKPOINT

from conftest import fashion_mnist_subset


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


def test_mixin_order_and_tags(checkpoint):
    assert LQAETokenizer.__mro__.index(checks.TransformerMixin) < LQAETokenizer.__mro__.index(checks.BaseEstimator)
    tags = LQAETokenizer(checkpoint).__sklearn_tags__()
    assert not tags.input_tags.two_d_array and tags.input_tags.three_d_array and tags.input_tags.string
    assert tags.requires_fit and tags.transformer_tags is not None and not tags.non_deterministic


@pytest.mark.parametrize(
    "check",
    [
        checks.check_no_attributes_set_in_init,
        checks.check_do_not_raise_errors_in_init_or_set_params,
        checks.check_mixin_order,
        checks.check_estimator_repr,
        checks.check_get_params_invariance,
        checks.check_set_params,
        checks.check_parameters_default_constructible,
        checks.check_estimators_unfitted,
        checks.check_estimator_cloneable,
        checks.check_estimator_tags_renamed,
        checks.check_valid_tag_types,
    ],
    ids=lambda check: check.__name__,
)
def test_sklearn_check(check, checkpoint):
    # Only checks that need no fit on their own data: the fit-based ones feed random 2-D arrays,
    # which fit ignores, so they would pass without testing anything (the next test does their job
    # on images).
    check("LQAETokenizer", LQAETokenizer(checkpoint=str(checkpoint)))


def test_fit_on_images_returns_self_leaves_params_and_adds_only_fitted_attributes(checkpoint, two_classes):
    """What check_estimators_fit_returns_self / _overwrite_params / check_dont_overwrite_parameters ask,
    on real images."""
    X, y = two_classes
    tok = LQAETokenizer(checkpoint=str(checkpoint), layers=["encoder.4"], batch_size=8)
    params_before = joblib.hash(tok.get_params())
    public_before = {k for k in vars(tok) if not k.startswith("_")}
    assert tok.fit(X, y) is tok
    assert joblib.hash(tok.get_params()) == params_before
    added = {k for k in vars(tok) if not k.startswith("_")} - public_before
    assert added and all(name.endswith("_") for name in added), added
    ids = tok.transform(X[:4])
    assert ids.shape == (4, 49) and len({tuple(row) for row in ids.tolist()}) == 4  # the images' own tokens


def test_clone_and_params(checkpoint):
    tok = LQAETokenizer(checkpoint, output="embeddings", layers=["lm.6"], batch_size=32)
    params = tok.get_params()
    assert params == {
        "checkpoint": checkpoint, "output": "embeddings", "layers": ["lm.6"], "batch_size": 32,
        "device": "auto", "language_model": None, "progress": False, "token_grid": None,
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
        ("tokenizer", LQAETokenizer(checkpoint, output="text", batch_size=16)),
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

"""LQAETokenizer and the scikit-learn estimator contract.

scikit-learn's whole common-check suite runs through ``parametrize_with_checks``.
The checks that fit on random 2-D data of 1 to 10 columns cannot apply to an
image model (flat rows must hold the checkpoint's 28 x 28 pixels): each is listed
in :data:`EXPECTED_FAILURES` with the error it must fail with, and fails the test
if it passes or fails for any other reason. The tests below the suite do those
checks' job on real images (state unchanged by transform, pickling, idempotent
fit). Then clone, pipelines, grid search and ``Pipeline(memory=...)``.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from functools import partial

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import estimator_checks_generator, parametrize_with_checks

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.model import DEFAULT_CHECKPOINT

from conftest import fashion_mnist_subset


@dataclass(frozen=True)
class ExpectedFailure:
    """Why a common check cannot pass, and the error that shows it fails for that reason."""

    reason: str
    error: type
    pattern: str  # searched in the error's message and in those of the errors it was raised from


_WIDTH = r"X has \d+ features per row, but this checkpoint reads flat rows of 28 x 28 x 1 = 784 pixels"
_NOT_IMAGES = "fits on random rows of 1-10 columns; flat rows must hold the checkpoint's 28 x 28 = 784 pixels"
EXPECTED_FAILURES = {
    name: ExpectedFailure(_NOT_IMAGES, ValueError, _WIDTH)
    for name in (
        "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
        "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
        "check_estimators_dtypes", "check_dtype_object", "check_pipeline_consistency", "check_estimators_nan_inf",
        "check_estimators_pickle", "check_f_contiguous_array_estimator", "check_transformer_data_not_an_array",
        "check_transformer_general", "check_methods_sample_order_invariance", "check_methods_subset_invariance",
        "check_dict_unchanged", "check_fit_idempotent", "check_fit_check_is_fitted", "check_n_features_in",
        "check_fit2d_predict1d",
    )
}
EXPECTED_FAILURES.update(
    check_positive_only_tag_during_fit=ExpectedFailure(
        f"{_NOT_IMAGES} (the check reports the width error as a failure on negative values; negative floats "
        f"are refused by transform, as out of [0, 1], not by fit)", AssertionError, _WIDTH),
    check_fit2d_1sample=ExpectedFailure(
        "fits one random row of 10 columns and accepts only an error about a single sample; the row is refused "
        "for its width (one row of 784 pixels is accepted)", AssertionError, "Got " + _WIDTH),
    check_fit2d_1feature=ExpectedFailure(
        "fits rows of 1 column and accepts only an error that says '1 feature(s)'; the error says it in the "
        "checkpoint's terms (pixels per row)", AssertionError, "Got " + _WIDTH),
)


def check_name(check) -> str:
    while isinstance(check, partial):
        check = check.func
    return check.__name__


def messages(error: BaseException) -> str:
    """The message of ``error`` and of every error it was raised from or during."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return " <- ".join(f"{type(e).__name__}: {e}" for e in seen)


@parametrize_with_checks([LQAETokenizer()])
def test_scikit_learn_common_checks(estimator, check):
    """Every check passes, or fails with the error its entry in EXPECTED_FAILURES names (strictly)."""
    expected = EXPECTED_FAILURES.get(check_name(check))
    if expected is None:
        check(estimator)
        return
    with pytest.raises(expected.error) as info:
        check(estimator)
    assert re.search(expected.pattern, messages(info.value)), (
        f"{check_name(check)} is expected to fail because it {expected.reason}, but it failed with "
        f"{messages(info.value)}"
    )


def test_every_expected_failure_is_a_check_of_the_suite():
    """A stale entry (a check renamed or dropped by scikit-learn) would excuse nothing, silently."""
    names = {check_name(check) for _, check in estimator_checks_generator(LQAETokenizer())}
    assert set(EXPECTED_FAILURES) <= names, set(EXPECTED_FAILURES) - names
    assert len(names - set(EXPECTED_FAILURES)) >= 15, sorted(names - set(EXPECTED_FAILURES))


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


#: What the methods may add to a fitted estimator: private caches filled on first use (the class Notes say so).
LAZY_CACHES = {"_model", "_vocabulary"}


def state_of(estimator) -> dict:
    """Every attribute of ``estimator``: the model by identity, anything else by the hash of its pickle."""
    return {name: id(value) if name == "_model" else joblib.hash(value) for name, value in vars(estimator).items()}


def call_every_method(tok, X) -> None:
    tok.transform(X.reshape(len(X), -1))
    tok.transform(list(X))
    ids = tok.encode(X, ("ids", "text", "embeddings"))["ids"]
    tok.text_to_ids(tok.ids_to_text(ids))
    tok.inverse_transform(ids)
    tok.get_feature_names_out()


def test_methods_change_nothing_in_the_estimator(checkpoint, two_classes):
    """check_dict_unchanged's job, on real images: after fit, no method adds or changes an attribute, public or
    private, apart from the lazy caches; also on an unpickled estimator, which reloads its model lazily."""
    X = two_classes[0][:8]
    fitted = LQAETokenizer(checkpoint, output="text", batch_size=4).fit(X.reshape(len(X), -1))
    for tok in (fitted, pickle.loads(pickle.dumps(fitted))):
        before = state_of(tok)
        call_every_method(tok, X)
        after = state_of(tok)
        assert set(after) - set(before) <= LAZY_CACHES, set(after) - set(before)
        assert {name: after.get(name) for name in before} == before


@pytest.mark.parametrize("output", ["ids", "text", "embeddings"])
def test_a_pickled_copy_transforms_exactly_the_same(checkpoint, two_classes, output):
    """check_estimators_pickle's job, on real images and their flat rows."""
    X = two_classes[0][:8]
    flat = X.reshape(len(X), -1)
    tok = LQAETokenizer(checkpoint, output=output, batch_size=8).fit(flat)
    expected = tok.transform(flat)
    for copy in (pickle.loads(pickle.dumps(tok)), pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(tok))))):
        assert "_model" not in vars(copy) and copy.n_features_in_ == 784
        np.testing.assert_array_equal(np.asarray(copy.transform(flat)), np.asarray(expected))
        np.testing.assert_array_equal(np.asarray(copy.transform(X)), np.asarray(expected))


@pytest.mark.parametrize("output", ["ids", "text", "embeddings"])
def test_fitting_again_gives_the_same_transform(checkpoint, two_classes, output):
    """check_fit_idempotent's job: a refit, on the same images or on others, gives identical output."""
    X = two_classes[0][:8]
    tok = LQAETokenizer(checkpoint, output=output, batch_size=8).fit(X[:4])
    expected = tok.transform(X)
    for data in (X[:4], X[4:], X.reshape(len(X), -1), None):
        np.testing.assert_array_equal(np.asarray(tok.fit(data).transform(X)), np.asarray(expected))


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

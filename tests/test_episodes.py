"""The few-shot episode protocol: sampling, confidence intervals, the pixel baseline, token controls."""

import numpy as np
import pytest

from lqae_sklearn.evaluation import (
    NONSENSE_LABELS,
    LLMEpisodeRunner,
    evaluate_grid,
    format_table,
    mean_confidence_interval,
    prototype_predict,
    sample_episodes,
    shuffle_tokens,
    token_overlap_predict,
)

Y = np.repeat(np.arange(6), 12)  # 6 classes, 12 items each


def _key(episode):
    return (tuple(episode.classes), episode.names, tuple(episode.support), tuple(episode.query), episode.seed)


def test_same_seed_gives_same_episodes_and_prefixes_are_stable():
    first = sample_episodes(Y, 3, 2, 2, 10, seed=7)
    again = sample_episodes(Y, 3, 2, 2, 10, seed=7)
    longer = sample_episodes(Y, 3, 2, 2, 25, seed=7)
    other = sample_episodes(Y, 3, 2, 2, 10, seed=8)
    assert [_key(e) for e in first] == [_key(e) for e in again]
    # Episode i does not depend on how many episodes are asked for.
    assert [_key(e) for e in first] == [_key(e) for e in longer[:10]]
    assert [_key(e) for e in first] != [_key(e) for e in other]


def test_episodes_are_balanced_disjoint_and_named_consistently():
    for episode in sample_episodes(Y, 4, 3, 2, 30, seed=1):
        assert len(set(episode.classes.tolist())) == 4
        assert len(set(episode.names)) == 4 and set(episode.names) <= set(NONSENSE_LABELS)
        assert len(episode.support) == 4 * 3 and len(episode.query) == 4 * 2
        # Support and query items are all distinct.
        both = np.concatenate([episode.support, episode.query])
        assert len(np.unique(both)) == len(both)
        # Each name stands for one real class, the same in support and query.
        for name, c in zip(episode.names, episode.classes):
            assert (Y[episode.support[episode.support_y == name]] == c).all()
            assert (Y[episode.query[episode.query_y == name]] == c).all()
            assert (episode.support_y == name).sum() == 3 and (episode.query_y == name).sum() == 2


def test_names_and_classes_vary_between_episodes():
    episodes = sample_episodes(Y, 2, 1, 1, 50, seed=0)
    assert len({e.names for e in episodes}) > 10
    assert len({tuple(sorted(e.classes.tolist())) for e in episodes}) > 5


def test_too_small_classes_are_refused_with_the_counts():
    y = np.array([0] * 5 + [1] * 5 + [2] * 2)
    sample_episodes(y, 2, 3, 2, 3)  # classes 0 and 1 have the 5 items needed
    with pytest.raises(ValueError, match=r"3 classes with at least 5 items.*only 2 of the 3"):
        sample_episodes(y, 3, 3, 2, 3)
    with pytest.raises(ValueError, match="n_way must be an int >= 2"):
        sample_episodes(y, 1, 1, 1, 3)
    with pytest.raises(ValueError, match="distinct names"):
        sample_episodes(Y, 3, 1, 1, 2, names=("a", "b"))


def test_confidence_interval_on_known_numbers():
    mean, half = mean_confidence_interval([0.0, 1.0, 0.0, 1.0])
    # sd = 0.57735, sem = 0.288675, t(0.975, df=3) = 3.182446
    assert mean == 0.5
    assert half == pytest.approx(3.182446 * 0.288675, rel=1e-5)
    mean, half = mean_confidence_interval(np.full(200, 0.75))
    assert (mean, half) == (0.75, 0.0)
    # With many episodes t tends to the normal 1.96.
    values = np.tile([0.0, 1.0], 5000)
    mean, half = mean_confidence_interval(values)
    assert half == pytest.approx(1.96 * values.std(ddof=1) / np.sqrt(values.size), rel=1e-3)
    assert np.isnan(mean_confidence_interval([0.4])[1])


def test_pixel_prototypes_are_perfect_on_separable_data():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    centres = rng.normal(size=(5, 8, 8)) * 10
    x = centres[y] + rng.normal(scale=0.1, size=(100, 8, 8))
    predict = lambda e: prototype_predict(x[e.support], e.support_y, x[e.query])  # noqa: E731
    cells = evaluate_grid(y, {"pixels": predict}, ways=[2, 5], shots=[1, 3], n_query=2, n_episodes=10)
    assert [c["methods"]["pixels"]["mean"] for c in cells] == [1.0] * 4
    assert [(c["way"], c["shot"], c["chance"]) for c in cells] == [(2, 1, 0.5), (2, 3, 0.5), (5, 1, 0.2), (5, 3, 0.2)]
    # And it is not trivially right: swapped support labels make every answer wrong.
    episode = sample_episodes(y, 2, 1, 3, 1, seed=3)[0]
    wrong = prototype_predict(x[episode.support], episode.support_y[::-1], x[episode.query])
    assert (wrong != episode.query_y).all()


def test_prototype_uses_the_class_mean():
    support = np.array([[0.0], [4.0], [10.0]])
    # Class "a" has mean 2; a query at 5.9 is nearer 2 than 10 only through the mean, not the nearest member 4.
    assert prototype_predict(support, np.array(["a", "a", "b"]), np.array([[5.9], [6.1]])).tolist() == ["a", "b"]


def test_shuffle_controls_keep_tokens_but_move_them():
    ids = np.arange(40).reshape(4, 10)
    rng = np.random.default_rng(0)
    within = shuffle_tokens(ids, "within", rng)
    assert all(sorted(a) == sorted(b) for a, b in zip(within, ids)) and not np.array_equal(within, ids)
    across = shuffle_tokens(ids, "across", rng)
    assert across.shape == ids.shape and sorted(across.ravel()) == sorted(ids.ravel())
    assert any(set(row) - set(orig) for row, orig in zip(across, ids))  # tokens changed images
    with pytest.raises(ValueError, match="shuffle must be one of"):
        shuffle_tokens(ids, "rows", rng)


class _RecordingClassifier:
    """Stands in for LLMFewShotClassifier to check what the runner hands it (no LLM needed)."""

    def set_params(self, **params):
        self.params = params
        return self

    def fit(self, texts, y):
        self.fitted = (list(texts), list(y))
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, texts):
        self.queries = list(texts)
        # Answer the class whose demonstration text equals the query, else the first class.
        support, labels = self.fitted
        proba = np.zeros((len(texts), len(self.classes_)))
        for i, t in enumerate(texts):
            k = list(self.classes_).index(labels[support.index(t)]) if t in support else 0
            proba[i, k] = 1.0
        return proba


def test_llm_runner_writes_the_episode_as_text_and_shuffles_on_request():
    y = np.repeat(np.arange(3), 4)
    ids = np.repeat(y[:, None], 5, axis=1) * 10 + np.arange(5)  # each class has its own tokens
    ids[1::4] = ids[0::4]  # item 1 of each class is identical to item 0
    to_text = lambda a: [" ".join(f"t{v}" for v in row) for row in a]  # noqa: E731
    episode = sample_episodes(y, 3, 1, 1, 1, seed=0)[0]
    clf = _RecordingClassifier()
    predicted, proba = LLMEpisodeRunner(clf, to_text)(episode, ids)
    assert clf.params == {"n_examples_per_class": 1, "random_state": episode.seed}
    assert clf.fitted == (to_text(ids[episode.support]), list(episode.support_y))
    assert clf.queries == to_text(ids[episode.query])
    assert proba.shape == (3, 3) and predicted.shape == (3,)

    shuffled = LLMEpisodeRunner(clf, to_text, shuffle="across")
    shuffled(episode, ids)
    texts = clf.fitted[0] + clf.queries
    assert texts != to_text(ids[np.concatenate([episode.support, episode.query])])
    assert sorted(" ".join(texts).split()) == sorted(" ".join(to_text(ids[np.concatenate(
        [episode.support, episode.query])])).split())
    with pytest.raises(ValueError, match="shuffle must be None or one of"):
        LLMEpisodeRunner(clf, to_text, shuffle="yes")


def test_format_table_shows_every_cell_and_method():
    y = np.repeat(np.arange(4), 6)
    x = np.repeat(np.arange(4.0), 6)[:, None]
    predict = lambda e: prototype_predict(x[e.support], e.support_y, x[e.query])  # noqa: E731
    always_first = lambda e: np.repeat(e.names[0], len(e.query))  # noqa: E731
    cells = evaluate_grid(y, {"pixels": predict, "first": always_first}, ways=[2, 4], shots=[1], n_query=1,
                          n_episodes=4)
    assert [c["methods"]["first"]["mean"] for c in cells] == [0.5, 0.25]  # exactly one query per class is right
    table = format_table(cells, {"pixels": "pixel prototypes"})
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["cell", "episodes", "chance", "pixel prototypes", "first"]
    assert "2-way 1-shot" in lines[2] and "1.000 ± 0.000" in lines[2] and "0.500 ± 0.000" in lines[2]
    assert "4-way 1-shot" in lines[3] and "0.250 ± 0.000" in lines[3]


class _BiasedClassifier(_RecordingClassifier):
    """Prefers the first class 4:1 for every input, and the right class 3:1 on top of that."""

    def predict_proba(self, texts):
        self.queries = list(texts)
        support, labels = self.fitted
        odds = np.ones((len(texts), len(self.classes_)))
        odds[:, 0] *= 4.0
        for i, t in enumerate(texts):
            if t in support:
                odds[i, list(self.classes_).index(labels[support.index(t)])] *= 3.0
        return odds / odds.sum(axis=1, keepdims=True)


def test_content_free_calibration_removes_a_constant_label_preference():
    y = np.repeat(np.arange(2), 3)
    ids = np.repeat(y[:, None], 4, axis=1) * 10 + np.arange(4)
    ids[1::3] = ids[0::3]  # each class's second item repeats its first, so a query can match its demonstration
    to_text = lambda a: [" ".join(f"t{v}" for v in row) for row in a]  # noqa: E731
    episodes = [e for e in sample_episodes(y, 2, 1, 1, 40, seed=0)
                if all(to_text(ids[[q]]) == to_text(ids[[s]]) for q, s in zip(e.query, e.support))]
    assert episodes, "no episode where every query repeats its demonstration"
    episode = episodes[0]
    clf = _BiasedClassifier()
    plain, _ = LLMEpisodeRunner(clf, to_text)(episode, ids)
    assert (plain == clf.classes_[0]).all()  # the 4:1 preference beats the 3:1 evidence
    runner = LLMEpisodeRunner(clf, to_text, content_free="")
    calibrated, proba = runner(episode, ids)
    assert clf.queries[-1] == "" and len(clf.queries) == len(episode.query) + 1
    assert (calibrated == episode.query_y).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba.max(axis=1), 0.75)  # odds 3:1 once the 4:1 preference is divided out
    assert runner.last_proba_.shape == (len(episode.query) + 1, 2)


def test_content_free_calibration_is_refused_for_channel_scoring():
    from lqae_sklearn import LLMFewShotClassifier

    with pytest.raises(ValueError, match="channel scoring has no label prior"):
        LLMEpisodeRunner(LLMFewShotClassifier(label_scoring="channel"), str, content_free="")
    LLMEpisodeRunner(LLMFewShotClassifier(label_scoring="channel"), str)  # no calibration: fine


def test_token_overlap_counts_shared_tokens_as_multisets():
    support = np.array([[1, 1, 2, 3], [7, 8, 9, 9], [1, 5, 6, 6]])
    support_y = np.array(["a", "b", "a"])
    query = np.array([[1, 1, 9, 9], [9, 8, 4, 4], [6, 6, 1, 2]])
    # Query 0 shares {1, 1} with a's first item and {1} with its second (mean 1.5) but {9, 9} with b (2).
    # Query 1 shares {9, 8} with b only; query 2 shares {1, 2} and {1, 6, 6} with a.
    np.testing.assert_array_equal(token_overlap_predict(support, support_y, query), ["b", "b", "a"])
    # No overlap anywhere: the first class in sorted order.
    assert token_overlap_predict(support, support_y, np.array([[0, 0, 0, 0]]))[0] == "a"

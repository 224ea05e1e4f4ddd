"""Few-shot episodes: the N-way K-shot evaluation protocol, its statistics and its baselines.

An *episode* draws ``n_way`` classes, then ``n_shot`` support and ``n_query`` query
items per class, all distinct. Each chosen class gets a nonsense name ("dax",
"blicket", ...) drawn afresh per episode, so that a language model must bind names
to images from the demonstrations alone (the Open-Ended protocol of Frozen,
Tsimpoukelli et al. 2021, that LQAE follows). A method predicts every query of an
episode from its support set; the episode's accuracy is the fraction of queries
right, and a cell (way, shot) reports the mean over episodes with a 95% confidence
interval.

Episodes come from a seed alone: episode ``i`` of a cell is the same whatever the
number of episodes asked for, and every method sees the same episodes, so methods
compare paired.

The methods here work on precomputed inputs: :func:`prototype_predict` on pixel
arrays, :func:`token_overlap_predict` and :class:`LLMEpisodeRunner` on LQAE token
ids (written as text for the LLM).
Images are encoded once, before any episode, by whoever calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np

from ..llm._prompt import CHANNEL_SCORINGS

#: Made-up class names (Frozen's Open-Ended setting uses "dax" and "blicket").
NONSENSE_LABELS = ("dax", "blicket", "wug", "toma", "fep", "zib", "kiki", "lorp", "mib", "tufa")

#: Token controls for the LLM: destroy the image -> token link ("across") or only the order ("within").
SHUFFLES = ("across", "within")


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode, as indices into the pool of items it was drawn from.

    Parameters
    ----------
    classes : ndarray of shape (n_way,)
        The classes drawn (values of the pool's labels), in draw order.
    names : tuple of str
        The nonsense name given to each drawn class in this episode.
    support : ndarray of int, shape (n_way * n_shot,)
        Pool indices of the demonstrations, class by class.
    support_y : ndarray of str
        Nonsense name of each support item.
    query : ndarray of int, shape (n_way * n_query,)
        Pool indices of the queries, class by class.
    query_y : ndarray of str
        Nonsense name of each query (the right answer).
    seed : int
        A seed derived from the episode's, for choices a method makes inside it
        (demonstration order, token shuffles).

    Examples
    --------
    >>> from lqae_sklearn.evaluation import sample_episodes
    >>> episode = sample_episodes([0, 0, 1, 1, 2, 2], n_way=2, n_shot=1, n_query=1, n_episodes=1)[0]
    >>> len(episode.support), len(episode.query), len(episode.names)
    (2, 2, 2)
    """

    classes: np.ndarray
    names: tuple
    support: np.ndarray
    support_y: np.ndarray
    query: np.ndarray
    query_y: np.ndarray
    seed: int


def sample_episodes(y, n_way, n_shot, n_query, n_episodes, *, seed=0, names=NONSENSE_LABELS) -> list[Episode]:
    """Draw ``n_episodes`` episodes from items labelled ``y``, reproducibly from ``seed``.

    Parameters
    ----------
    y : array-like of shape (n_items,)
        Class of each item of the pool.
    n_way, n_shot, n_query : int
        Classes per episode, support items per class, query items per class.
    n_episodes : int
        How many episodes.
    seed : int, default=0
        Episode ``i`` depends only on ``(seed, n_way, n_shot, n_query, i)``.
    names : sequence of str, default=NONSENSE_LABELS
        Pool of class names; each episode gives its classes ``n_way`` of them in a
        random order.

    Returns
    -------
    list of Episode
        The episodes, in order; episode ``i`` is the same whatever ``n_episodes``.

    Examples
    --------
    >>> from lqae_sklearn.evaluation import sample_episodes
    >>> y = [0] * 5 + [1] * 5 + [2] * 5
    >>> episodes = sample_episodes(y, n_way=2, n_shot=2, n_query=1, n_episodes=3, seed=0)
    >>> [e.support.shape for e in episodes]
    [(4,), (4,), (4,)]
    """
    y = np.asarray(y)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y must be a non-empty 1-D array of labels, got shape {y.shape}")
    for name, value, low in (("n_way", n_way, 2), ("n_shot", n_shot, 1), ("n_query", n_query, 1),
                             ("n_episodes", n_episodes, 1)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    names = tuple(str(n) for n in names)
    if len(set(names)) < n_way:
        raise ValueError(f"{n_way}-way episodes need {n_way} distinct names, got {len(set(names))}: {names}")
    classes, counts = np.unique(y, return_counts=True)
    usable = classes[counts >= n_shot + n_query]
    if len(usable) < n_way:
        raise ValueError(
            f"{n_way}-way {n_shot}-shot episodes with {n_query} queries per class need {n_way} classes with at "
            f"least {n_shot + n_query} items each; only {len(usable)} of the {len(classes)} classes have that many "
            f"(smallest class: {counts.min()} items)"
        )
    members = {c: np.flatnonzero(y == c) for c in usable}
    # One child seed per episode: episode i does not depend on how many come after it.
    children = np.random.SeedSequence([int(seed), n_way, n_shot, n_query]).spawn(n_episodes)
    episodes = []
    for child in children:
        rng = np.random.default_rng(child)
        drawn = usable[np.sort(rng.choice(len(usable), n_way, replace=False))]
        drawn = drawn[rng.permutation(n_way)]
        episode_names = tuple(np.asarray(names)[rng.choice(len(names), n_way, replace=False)].tolist())
        support, query = [], []
        for c in drawn:
            picked = rng.choice(members[c], n_shot + n_query, replace=False)
            support.append(picked[:n_shot])
            query.append(picked[n_shot:])
        episodes.append(Episode(
            classes=drawn,
            names=episode_names,
            support=np.concatenate(support),
            support_y=np.repeat(np.array(episode_names, dtype=object), n_shot),
            query=np.concatenate(query),
            query_y=np.repeat(np.array(episode_names, dtype=object), n_query),
            seed=int(rng.integers(2**31 - 1)),
        ))
    return episodes


def mean_confidence_interval(values, confidence=0.95) -> tuple[float, float]:
    """Mean of per-episode accuracies and the half-width of its confidence interval.

    The interval is Student's t on the episode means, ``t * sd / sqrt(n)`` with the
    sample standard deviation (ddof=1): the usual few-shot report ("mean ± 95% CI
    over episodes"), slightly wider than the normal approximation for few episodes.

    Parameters
    ----------
    values : array-like of shape (n_episodes,)
        Per-episode accuracies.
    confidence : float, default=0.95
        Coverage of the interval, in (0, 1).

    Returns
    -------
    mean : float
        The mean accuracy.
    half_width : float
        Half-width of the interval; NaN for a single episode (no spread to estimate).

    Examples
    --------
    >>> from lqae_sklearn.evaluation import mean_confidence_interval
    >>> mean, half = mean_confidence_interval([0.5, 1.0, 0.5, 1.0])
    >>> round(mean, 3), round(half, 3)
    (0.75, 0.459)
    """
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array of per-episode accuracies, got shape {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    mean = float(values.mean())
    if values.size == 1:
        return mean, float("nan")
    sem = values.std(ddof=1) / np.sqrt(values.size)
    return mean, float(t.ppf((1 + confidence) / 2, values.size - 1) * sem)


def prototype_predict(support_x, support_y, query_x) -> np.ndarray:
    """Nearest class mean (squared L2 on flattened inputs): the non-LLM baseline.

    Parameters
    ----------
    support_x : array of shape (n_support, ...)
        The demonstrations (e.g. pixel arrays).
    support_y : array of shape (n_support,)
        Their labels.
    query_x : array of shape (n_query, ...)
        The items to classify, shaped as the demonstrations.

    Returns
    -------
    ndarray of shape (n_query,)
        The support label of the nearest prototype (ties: the first class in
        sorted order).

    Examples
    --------
    >>> import numpy as np
    >>> from lqae_sklearn.evaluation import prototype_predict
    >>> prototype_predict(np.array([[0.0], [1.0]]), np.array(["dax", "wug"]), np.array([[0.2], [0.9]]))
    array(['dax', 'wug'], dtype='<U3')
    """
    support_x = np.asarray(support_x, dtype=np.float64).reshape(len(support_x), -1)
    query_x = np.asarray(query_x, dtype=np.float64).reshape(len(query_x), -1)
    support_y = np.asarray(support_y)
    if support_x.shape[1] != query_x.shape[1]:
        raise ValueError(f"support items have {support_x.shape[1]} features, queries {query_x.shape[1]}")
    classes = np.unique(support_y)
    prototypes = np.stack([support_x[support_y == c].mean(axis=0) for c in classes])
    distances = ((query_x[:, None, :] - prototypes[None, :, :]) ** 2).sum(axis=-1)
    return classes[np.argmin(distances, axis=1)]


def token_overlap_predict(support_ids, support_y, query_ids) -> np.ndarray:
    """Class whose support items share the most tokens with the query: a non-LLM baseline on the LLM's input.

    The score of a class is the mean, over its support items, of the size of the
    multiset intersection of their token ids with the query's (order ignored).
    It measures how much class evidence the token texts carry as plain word
    overlap, which is what an LLM reading them can most easily pick up.

    Parameters
    ----------
    support_ids : array of int of shape (n_support, n_tokens)
        Token ids of the demonstrations.
    support_y : array of shape (n_support,)
        Their labels.
    query_ids : array of int of shape (n_query, n_tokens)
        Token ids of the items to classify.

    Returns
    -------
    ndarray of shape (n_query,)
        The support label of the best class (ties: the first class in sorted order).

    Examples
    --------
    >>> import numpy as np
    >>> from lqae_sklearn.evaluation import token_overlap_predict
    >>> support = np.array([[1, 1, 2], [7, 8, 9]])
    >>> token_overlap_predict(support, np.array(["dax", "wug"]), np.array([[1, 2, 9]]))
    array(['dax'], dtype='<U3')
    """
    support_ids, query_ids = np.asarray(support_ids), np.asarray(query_ids)
    support_y = np.asarray(support_y)
    vocab, inverse = np.unique(np.concatenate([support_ids.ravel(), query_ids.ravel()]), return_inverse=True)
    counts = np.zeros((len(support_ids) + len(query_ids), len(vocab)), dtype=np.int64)
    rows = np.repeat(np.arange(len(counts)), support_ids.shape[1])
    np.add.at(counts, (rows, inverse), 1)
    support_counts, query_counts = counts[: len(support_ids)], counts[len(support_ids):]
    shared = np.minimum(query_counts[:, None, :], support_counts[None, :, :]).sum(-1)  # (n_query, n_support)
    classes = np.unique(support_y)
    scores = np.stack([shared[:, support_y == c].mean(axis=1) for c in classes], axis=1)
    return classes[np.argmax(scores, axis=1)]


def shuffle_tokens(ids, mode, rng) -> np.ndarray:
    """Token-shuffle control over one episode's token ids (n_items, n_tokens).

    ``"across"`` pools every token of the episode and deals them back out at
    random: each item keeps its length and the episode its token counts, but an
    item's tokens no longer come from its image, so a fair method scores chance.
    ``"within"`` permutes each item's own tokens: the bag of tokens survives, only
    their patch order is lost (how much the LLM uses order versus token overlap).

    Parameters
    ----------
    ids : array of int of shape (n_items, n_tokens)
        The episode's token ids.
    mode : {"across", "within"}
        Which control.
    rng : numpy.random.Generator
        Source of the permutation.

    Returns
    -------
    ndarray of shape (n_items, n_tokens)
        The shuffled ids.

    Examples
    --------
    >>> import numpy as np
    >>> from lqae_sklearn.evaluation import shuffle_tokens
    >>> ids = np.array([[1, 2, 3], [4, 5, 6]])
    >>> shuffled = shuffle_tokens(ids, "within", np.random.default_rng(0))
    >>> sorted(shuffled[0]) == [1, 2, 3]
    True
    """
    ids = np.asarray(ids)
    if mode == "across":
        return rng.permutation(ids.reshape(-1)).reshape(ids.shape)
    if mode == "within":
        return rng.permuted(ids, axis=1)
    raise ValueError(f"shuffle must be one of {SHUFFLES}, got {mode!r}")


class LLMEpisodeRunner:
    """Run :class:`~lqae_sklearn.LLMFewShotClassifier` on episodes of precomputed token ids.

    Parameters
    ----------
    classifier : LLMFewShotClassifier
        Its ``n_examples_per_class`` and ``random_state`` are set per episode; the
        rest (prompt, instruction, label_scoring, max_tokens_per_item, llm) is used as given.
        The LLM is loaded once and reused by every episode.
    ids_to_text : callable
        Token ids (n, T) -> list of n strings, e.g. ``LQAETokenizer.ids_to_text``.
    shuffle : {None, "across", "within"}, default=None
        Apply :func:`shuffle_tokens` to the episode's ids (support and queries
        together) before writing them as text: the shuffled-token control.
    content_free : str or None, default=None
        Also score this input (e.g. ``""``) after the demonstrations, in the same
        call, and divide every query's class probabilities by its probabilities
        (contextual calibration, Zhao et al. 2021): it removes the LLM's prior
        preference for one label, such as the label of the last demonstration.

    Examples
    --------
    >>> from lqae_sklearn import LLMFewShotClassifier, LQAETokenizer
    >>> from lqae_sklearn.evaluation import LLMEpisodeRunner, episode_accuracies, sample_episodes
    >>> tokenizer = LQAETokenizer(output="ids", token_grid=3).fit()
    >>> runner = LLMEpisodeRunner(LLMFewShotClassifier(), tokenizer.ids_to_text)
    >>> ids, y = tokenizer.transform(images), labels  # doctest: +SKIP
    >>> episodes = sample_episodes(y, n_way=2, n_shot=1, n_query=1, n_episodes=10)  # doctest: +SKIP
    >>> episode_accuracies(episodes, lambda e: runner(e, ids)[0]).mean()  # doctest: +SKIP
    """

    def __init__(self, classifier, ids_to_text, shuffle=None, content_free=None):
        if shuffle is not None and shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be None or one of {SHUFFLES}, got {shuffle!r}")
        if content_free is not None and getattr(classifier, "label_scoring", None) in CHANNEL_SCORINGS:
            raise ValueError("content_free calibration divides label probabilities given an empty input; channel "
                             "scoring has no label prior to remove, so it takes content_free=None")
        self.classifier = classifier
        self.ids_to_text = ids_to_text
        self.shuffle = shuffle
        self.content_free = content_free

    def __call__(self, episode: Episode, ids) -> tuple[np.ndarray, np.ndarray]:
        """Predictions and class probabilities for the episode's queries.

        ``ids`` is the token-id array of the whole pool; ``episode`` indexes it.
        Returns ``(predicted names, proba)`` with ``proba`` columns in the
        classifier's ``classes_`` order. All queries go in one ``predict_proba``
        call, so the demonstrations' keys and values are computed once; its
        output (with the content-free row last, if any) is kept in ``last_proba_``.
        """
        items = np.asarray(ids)[np.concatenate([episode.support, episode.query])]
        if self.shuffle is not None:
            items = shuffle_tokens(items, self.shuffle, np.random.default_rng(episode.seed))
        texts = self.ids_to_text(items)
        n_support = len(episode.support)
        n_shot = n_support // len(episode.classes)
        clf = self.classifier.set_params(n_examples_per_class=n_shot, random_state=episode.seed)
        clf.fit(texts[:n_support], episode.support_y)
        queries = list(texts[n_support:])
        if self.content_free is None:
            proba = self.last_proba_ = clf.predict_proba(queries)
        else:
            raw = self.last_proba_ = clf.predict_proba(queries + [self.content_free])
            proba = raw[:-1] / raw[-1:]
            proba /= proba.sum(axis=1, keepdims=True)
        return clf.classes_[np.argmax(proba, axis=1)], proba


def episode_accuracies(episodes, predict) -> np.ndarray:
    """Per-episode accuracy of ``predict(episode) -> predicted names of its queries``.

    Parameters
    ----------
    episodes : list of Episode
        The episodes, e.g. from :func:`sample_episodes`.
    predict : callable
        ``predict(episode)`` returns the predicted names of the episode's queries.

    Returns
    -------
    ndarray of shape (n_episodes,)
        The fraction of each episode's queries predicted right.

    Examples
    --------
    >>> from lqae_sklearn.evaluation import episode_accuracies, sample_episodes
    >>> episodes = sample_episodes([0, 0, 1, 1], n_way=2, n_shot=1, n_query=1, n_episodes=2)
    >>> episode_accuracies(episodes, lambda e: e.query_y)  # an oracle
    array([1., 1.])
    """
    return np.array([np.mean(np.asarray(predict(e)) == e.query_y) for e in episodes], dtype=np.float64)


def evaluate_grid(y, methods, *, ways, shots, n_query, n_episodes, seed=0, names=NONSENSE_LABELS,
                  on_episode=None) -> list[dict]:
    """Run every method on the same episodes of every (way, shot) cell.

    Parameters
    ----------
    y : array-like of shape (n_items,)
        Class of each pool item.
    methods : dict of str -> callable
        ``methods[name](episode)`` returns the predicted names of the episode's queries.
    ways, shots : sequence of int
        The grid: every way with every shot.
    n_query : int
        Query items per class, as in :func:`sample_episodes`.
    n_episodes : int
        Episodes per cell, as in :func:`sample_episodes`.
    seed : int, default=0
        As in :func:`sample_episodes`.
    names : sequence of str, default=NONSENSE_LABELS
        As in :func:`sample_episodes`.
    on_episode : callable or None, default=None
        Called as ``on_episode(cell_index, episode_index)`` after each episode (progress).

    Returns
    -------
    list of dict
        One per cell: ``way``, ``shot``, ``n_query``, ``episodes``, ``chance``
        and ``methods[name]`` = ``{"mean", "ci95", "seconds", "accuracies"}``.

    Examples
    --------
    >>> from lqae_sklearn.evaluation import evaluate_grid
    >>> y = [0] * 4 + [1] * 4 + [2] * 4
    >>> cells = evaluate_grid(y, {"oracle": lambda e: e.query_y}, ways=[2], shots=[1, 2], n_query=1,
    ...                       n_episodes=3)
    >>> [(c["shot"], c["methods"]["oracle"]["mean"]) for c in cells]
    [(1, 1.0), (2, 1.0)]
    """
    import time

    cells = []
    for way in ways:
        for shot in shots:
            episodes = sample_episodes(y, way, shot, n_query, n_episodes, seed=seed, names=names)
            accuracies = {name: [] for name in methods}
            seconds = dict.fromkeys(methods, 0.0)
            for i, episode in enumerate(episodes):
                for name, predict in methods.items():
                    start = time.perf_counter()
                    predicted = np.asarray(predict(episode))
                    seconds[name] += time.perf_counter() - start
                    accuracies[name].append(float(np.mean(predicted == episode.query_y)))
                if on_episode is not None:
                    on_episode(len(cells), i)
            summary = {}
            for name in methods:
                mean, half = mean_confidence_interval(accuracies[name])
                summary[name] = {"mean": mean, "ci95": half, "seconds": seconds[name],
                                 "accuracies": accuracies[name]}
            cells.append({"way": way, "shot": shot, "n_query": n_query, "episodes": n_episodes,
                          "chance": 1.0 / way, "methods": summary})
    return cells


def format_table(cells, labels=None) -> str:
    """A Markdown table of ``evaluate_grid`` results: one row per cell, mean ± 95% CI per method.

    Parameters
    ----------
    cells : list of dict
        The output of :func:`evaluate_grid`.
    labels : dict of str -> str or None, default=None
        Column titles by method name (default: the names).

    Returns
    -------
    str
        The table, one line per cell after the header and rule lines.

    Examples
    --------
    >>> from lqae_sklearn.evaluation import evaluate_grid, format_table
    >>> cells = evaluate_grid([0, 0, 1, 1] * 2, {"oracle": lambda e: e.query_y}, ways=[2], shots=[1],
    ...                       n_query=1, n_episodes=2)
    >>> print(format_table(cells).splitlines()[0])
    | cell         | episodes | chance | oracle        |
    """
    if not cells:
        raise ValueError("no cells to tabulate")
    names = list(cells[0]["methods"])
    labels = labels or {}
    header = ["cell", "episodes", "chance"] + [labels.get(n, n) for n in names]
    rows = []
    for cell in cells:
        row = [f"{cell['way']}-way {cell['shot']}-shot", str(cell["episodes"]), f"{cell['chance']:.2f}"]
        for n in names:
            result = cell["methods"][n]
            half = result["ci95"]
            row.append(f"{result['mean']:.3f}" + ("" if np.isnan(half) else f" ± {half:.3f}"))
        rows.append(row)
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])

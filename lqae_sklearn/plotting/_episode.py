"""`FewShotEpisodeDisplay`: the demonstrations, the query and the LLM's probability for each label."""

from __future__ import annotations

import math

import numpy as np

from ._matplotlib import axes_or_new, hide_frame, import_pyplot
from ._pixels import as_batch_of_one, check_pictures, check_tokenizer, draw_picture, model_view, take

_PREDICTED_COLOR = "#1f77b4"
_OTHER_COLOR = "#b0b0b0"


class FewShotEpisodeDisplay:
    """One few-shot episode: the labelled demonstrations, the query and the label probabilities.

    The left panel shows the demonstrations in the order the prompt gives them
    (one row per round of one demonstration per class), each titled with its
    label; the middle panel the query; the right panel the LLM's probability
    for each label, the predicted one highlighted, with chance (one over the
    number of labels) as a dashed line.

    Everything is drawn inside one bounding axes (``ax_``, its frame hidden),
    as scikit-learn's multi-panel displays do; the panels are its inset axes.

    Build it with :meth:`from_estimator`; the constructor takes precomputed
    values.

    Parameters
    ----------
    support_images : ndarray of shape (n_support, H, W) or (n_support, H, W, 3)
        The demonstrations, float in [0, 1] (or uint8), in prompt order.
    support_labels : sequence of str of length n_support
        The label of each demonstration.
    query_image : ndarray of shape (H, W) or (H, W, 3)
        The query, float in [0, 1] (or uint8).
    proba : array-like of shape (n_classes,)
        The predicted probability of each class.
    classes : sequence of length n_classes
        The class labels, in the order of ``proba``.
    query_label : str or None, default=None
        The query's right answer, if known: written under the query and
        marked on its bar.

    Attributes
    ----------
    support_axes_ : list of matplotlib.axes.Axes
        One axes per demonstration, in prompt order.
    query_ax_ : matplotlib.axes.Axes
        Axes of the query.
    proba_ax_ : matplotlib.axes.Axes
        Axes of the bar chart of probabilities.
    bars_ : matplotlib.container.BarContainer
        One bar per class, in the order of ``classes``.
    ax_ : matplotlib.axes.Axes
        The bounding axes that holds the panels.
    figure_ : matplotlib.figure.Figure
        Figure holding ``ax_``.

    See Also
    --------
    lqae_sklearn.LLMFewShotClassifier : The classifier whose episode is drawn.
    lqae_sklearn.evaluation.sample_episodes : Draws N-way K-shot episodes.

    Examples
    --------
    >>> import numpy as np
    >>> from lqae_sklearn.plotting import FewShotEpisodeDisplay
    >>> support = np.stack([np.zeros((28, 28)), np.ones((28, 28))])
    >>> display = FewShotEpisodeDisplay(support, ["dax", "blicket"], np.ones((28, 28)),
    ...                                 [0.3, 0.7], ["blicket", "dax"]).plot()
    >>> [label.get_text() for label in display.proba_ax_.get_yticklabels()]
    ['blicket', 'dax']
    """

    def __init__(self, support_images, support_labels, query_image, proba, classes, *, query_label=None):
        self.support_images = support_images
        self.support_labels = support_labels
        self.query_image = query_image
        self.proba = proba
        self.classes = classes
        self.query_label = query_label

    def plot(self, ax=None, *, cmap="gray"):
        """Draw the demonstrations, the query and the probabilities.

        Parameters
        ----------
        ax : matplotlib.axes.Axes, default=None
            Bounding axes to draw the panels in; None creates a figure sized to
            the episode.
        cmap : str, default="gray"
            Colormap of grayscale images (ignored for RGB).

        Returns
        -------
        display : FewShotEpisodeDisplay
            This object, with the drawn artists as attributes.

        Examples
        --------
        >>> import numpy as np
        >>> from lqae_sklearn.plotting import FewShotEpisodeDisplay
        >>> images = np.zeros((4, 28, 28))
        >>> display = FewShotEpisodeDisplay(images, ["a", "b", "a", "b"], images[0], [0.5, 0.5], ["a", "b"])
        >>> len(display.plot().support_axes_)
        4
        """
        import_pyplot()
        support = check_pictures(self.support_images, "support_images", batch=True)
        query = check_pictures(self.query_image, "query_image", batch=False)
        labels = [str(label) for label in np.asarray(self.support_labels, dtype=object).reshape(-1)]
        if len(labels) != len(support):
            raise ValueError(f"support_labels has {len(labels)} labels for {len(support)} support_images")
        classes = [str(c) for c in np.asarray(self.classes, dtype=object).reshape(-1)]
        proba = np.asarray(self.proba, dtype=np.float64).reshape(-1)
        if len(proba) != len(classes) or not classes:
            raise ValueError(f"proba has {len(proba)} values for {len(classes)} classes; give one per class")
        if not np.isfinite(proba).all() or proba.min() < 0 or proba.max() > 1:
            raise ValueError(f"proba must hold probabilities in [0, 1], got {proba}")

        n_columns = len(classes) if len(support) % len(classes) == 0 else math.ceil(math.sqrt(len(support)))
        n_rows = math.ceil(len(support) / n_columns)
        ax = axes_or_new(ax, figsize=(1.3 * n_columns + 5.5, max(2.6, 1.35 * n_rows + 0.9)))
        hide_frame(ax)

        # Panel widths as fractions of the bounding axes: demonstrations | gap | query | gap | bars.
        total = n_columns + 0.4 + 1.0 + 1.0 + 2.6
        unit = 1.0 / total
        height = min(1.0, 1.0 / n_rows)
        self.support_axes_ = []
        for i, (picture, label) in enumerate(zip(support, labels)):
            row, col = divmod(i, n_columns)
            sub = ax.inset_axes([col * unit, 1 - (row + 1) * height, unit * 0.92, height * 0.78])
            draw_picture(sub, picture, cmap)
            hide_frame(sub, keep_border=True)  # a thin border keeps white images visible on white
            sub.set_title(label, fontsize="small", pad=2)
            self.support_axes_.append(sub)
        ax.text(n_columns * unit / 2, 1.0, "demonstrations", transform=ax.transAxes, ha="center", va="bottom")

        query_left = (n_columns + 0.4) * unit
        self.query_ax_ = ax.inset_axes([query_left, 0.5 - 0.5 * min(height, 0.6), unit, min(height, 0.6)])
        draw_picture(self.query_ax_, query, cmap)
        hide_frame(self.query_ax_, keep_border=True)
        self.query_ax_.set_title("query", fontsize="small", pad=2)
        if self.query_label is not None:
            self.query_ax_.set_xlabel(f"answer: {self.query_label}", fontsize="small")

        self.proba_ax_ = ax.inset_axes([(n_columns + 2.4) * unit + 0.02, 0.1, 2.6 * unit - 0.02, 0.8])
        predicted = int(np.argmax(proba))
        colors = [_PREDICTED_COLOR if k == predicted else _OTHER_COLOR for k in range(len(classes))]
        positions = np.arange(len(classes))
        self.bars_ = self.proba_ax_.barh(positions, proba, color=colors)
        self.proba_ax_.set_yticks(positions, classes)
        self.proba_ax_.invert_yaxis()  # first class on top, as in a table
        self.proba_ax_.set_xlim(0, 1)
        self.proba_ax_.axvline(1 / len(classes), color="black", linestyle="--", linewidth=1)
        self.proba_ax_.text(1 / len(classes), 1.0, " chance", transform=self.proba_ax_.get_xaxis_transform(),
                            fontsize="small", va="bottom")
        for position, value in zip(positions, proba):
            self.proba_ax_.text(min(value + 0.02, 0.8), position, f"{value:.2f}", va="center", fontsize="small")
        if self.query_label is not None and str(self.query_label) in classes:
            self.proba_ax_.get_yticklabels()[classes.index(str(self.query_label))].set_fontweight("bold")
        self.proba_ax_.set_xlabel("probability")
        self.proba_ax_.spines[["top", "right"]].set_visible(False)

        self.ax_ = ax
        self.figure_ = ax.figure
        return self

    @classmethod
    def from_estimator(cls, estimator, X, y, query, *, query_label=None, ax=None, cmap="gray"):
        """Draw a fitted few-shot pipeline's demonstrations, a query and its prediction.

        Parameters
        ----------
        estimator : Pipeline
            A fitted :class:`~sklearn.pipeline.Pipeline` whose first step is a
            :class:`~lqae_sklearn.LQAETokenizer` and whose last step is a
            classifier with ``predict_proba`` (an
            :class:`~lqae_sklearn.LLMFewShotClassifier`): the tokenizer draws the
            images as its checkpoint reads them.
        X : images
            The images ``estimator`` was fitted on, in any form the tokenizer
            takes. When the classifier says which of them the query's prompt
            shows (``demonstrations_for``, or ``example_indices_`` for a prompt
            every query shares), only those are drawn, in prompt order.
        y : array-like of shape (n_samples,)
            Their labels, as given to ``fit``.
        query : array-like, str, path-like or PIL.Image.Image
            One image to classify (an array (H, W) or (H, W, C), a path or a
            PIL image).
        query_label : str or None, default=None
            The query's right answer, if known.
        ax : matplotlib.axes.Axes, default=None
            Bounding axes to draw in; None creates a figure.
        cmap : str, default="gray"
            Colormap of grayscale images (ignored for RGB).

        Returns
        -------
        display : FewShotEpisodeDisplay
            The drawn display; ``display.proba`` holds the probabilities.

        Examples
        --------
        >>> from sklearn.pipeline import make_pipeline
        >>> from lqae_sklearn import LLMFewShotClassifier, LQAETokenizer
        >>> from lqae_sklearn.plotting import FewShotEpisodeDisplay
        >>> X = ["examples/fashion-mnist/bag/00018.png", "examples/fashion-mnist/sneaker/00012.png"]
        >>> y = ["dax", "blicket"]
        >>> few_shot = make_pipeline(LQAETokenizer(output="text"),
        ...                          LLMFewShotClassifier()).fit(X, y)  # doctest: +SKIP
        >>> display = FewShotEpisodeDisplay.from_estimator(
        ...     few_shot, X, y, "examples/fashion-mnist/bag/00030.png", query_label="dax")  # doctest: +SKIP
        >>> display.proba.shape  # doctest: +SKIP
        (2,)
        """
        steps = getattr(estimator, "steps", None)
        if not steps:
            raise TypeError(f"estimator must be a fitted Pipeline whose first step is an LQAETokenizer, got "
                            f"{type(estimator).__name__}")
        tokenizer = check_tokenizer(steps[0][1], "the pipeline's first step")
        classifier = steps[-1][1]
        if not hasattr(estimator, "predict_proba"):
            raise TypeError(f"the pipeline's last step ({type(classifier).__name__}) has no predict_proba")
        y = np.asarray(y, dtype=object).reshape(-1)
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} images but y has {len(y)} labels")
        query_batch = as_batch_of_one(query, "query")
        if hasattr(classifier, "demonstrations_for"):  # the query's own demonstrations (nearest ones differ by query)
            shown = classifier.demonstrations_for(estimator[:-1].transform(query_batch))[0]
        else:
            shown = getattr(classifier, "example_indices_", None)
        shown = np.arange(len(y)) if shown is None else np.asarray(shown)
        support = model_view(tokenizer, take(X, shown))
        query_picture = model_view(tokenizer, query_batch)[0]
        proba = estimator.predict_proba(query_batch)[0]
        display = cls(support, y[shown], query_picture, proba, classifier.classes_, query_label=query_label)
        return display.plot(ax=ax, cmap=cmap)

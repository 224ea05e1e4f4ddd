"""`TokenMapDisplay`: an image with each token written on the patch or region it stands for."""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np

from ._matplotlib import axes_or_new, hide_frame, import_pyplot
from ._pixels import as_batch_of_one, check_pictures, check_tokenizer, draw_picture, model_view

# Width of an average character as a fraction of the font size, for fitting a word into its cell.
_CHAR_WIDTH = 0.6
_MIN_FONTSIZE = 3.0


class TokenMapDisplay:
    """Token map: an image with each token written on the patch (or region) it stands for.

    The shipped checkpoint cuts a 28 x 28 image into 7 x 7 patches of 4 x 4
    pixels and writes each patch as one word of its language model's vocabulary;
    this display draws that grid over the image and writes each word in its cell.
    With a coarser ``token_grid``, each cell is the block of patches that
    :meth:`~lqae_sklearn.LQAETokenizer.inverse_transform` spreads the token over.

    Build it with :meth:`from_estimator`; the constructor takes precomputed
    values.

    Parameters
    ----------
    image : ndarray of shape (H, W) or (H, W, 3)
        The picture, float in [0, 1] (or uint8), as the checkpoint reads it.
    tokens : sequence of str
        The tokens, row-major over a square grid: ``token_grid ** 2`` of them.
    patch_grid : int or None, default=None
        Side of the checkpoint's patch grid. With fewer tokens per side, each
        token's cell covers the patches it stands for, so cells may differ by a
        patch in size (7 patches into 3 regions: 3, 2 and 2). None draws cells of
        equal size.

    Attributes
    ----------
    image_ : matplotlib.image.AxesImage
        The drawn picture.
    texts_ : list of matplotlib.text.Text
        One text per token, row-major; ``texts_[i].get_text() == tokens[i]``.
    ax_ : matplotlib.axes.Axes
        Axes the map is drawn on.
    figure_ : matplotlib.figure.Figure
        Figure holding ``ax_``.

    See Also
    --------
    ReconstructionDisplay : Originals over their reconstructions from tokens.
    lqae_sklearn.LQAETokenizer : The tokenizer whose tokens are drawn.

    Examples
    --------
    >>> import numpy as np
    >>> from lqae_sklearn.plotting import TokenMapDisplay
    >>> image = np.linspace(0, 1, 28 * 28).reshape(28, 28)
    >>> display = TokenMapDisplay(image, ["top", "left", "bottom", "right"]).plot()
    >>> [t.get_text() for t in display.texts_]
    ['top', 'left', 'bottom', 'right']
    """

    def __init__(self, image, tokens, *, patch_grid=None):
        self.image = image
        self.tokens = tokens
        self.patch_grid = patch_grid

    def plot(self, ax=None, *, fontsize=None, text_color="white", grid_color="#ffbf00", cmap="gray"):
        """Draw the image, the cell borders and one word per cell.

        Parameters
        ----------
        ax : matplotlib.axes.Axes, default=None
            Axes to draw on; None creates a figure with one axes.
        fontsize : float or None, default=None
            Font size of every word. None fits each word into its cell: short
            words get up to 14 points, long ones are made smaller rather than
            cut.
        text_color : str, default="white"
            Colour of the words; each has a black outline, to stay readable on
            light and dark pixels alike.
        grid_color : str or None, default="#ffbf00"
            Colour of the cell borders; None draws no borders.
        cmap : str, default="gray"
            Colormap of a grayscale image (ignored for RGB).

        Returns
        -------
        display : TokenMapDisplay
            This object, with the drawn artists as attributes.

        Examples
        --------
        >>> import numpy as np
        >>> from lqae_sklearn.plotting import TokenMapDisplay
        >>> display = TokenMapDisplay(np.zeros((28, 28)), ["a", "b", "c", "d"])
        >>> display.plot(fontsize=8).texts_[0].get_fontsize()
        8.0
        """
        import_pyplot()
        from matplotlib import patheffects

        picture = check_pictures(self.image, "image", batch=False)
        tokens = _check_tokens(self.tokens)
        grid = math.isqrt(len(tokens))
        row_edges = _cell_edges(grid, self.patch_grid, picture.shape[0])
        col_edges = _cell_edges(grid, self.patch_grid, picture.shape[1])

        ax = axes_or_new(ax, figsize=(5, 5))
        self.image_ = draw_picture(ax, picture, cmap)
        hide_frame(ax)
        if grid_color is not None:
            for edge in row_edges[1:-1]:
                ax.axhline(edge, color=grid_color, linewidth=0.8, alpha=0.8)
            for edge in col_edges[1:-1]:
                ax.axvline(edge, color=grid_color, linewidth=0.8, alpha=0.8)

        points_per_pixel = _points_per_pixel(ax, picture.shape[:2])
        outline = [patheffects.withStroke(linewidth=2, foreground="black")]
        self.texts_ = []
        for index, token in enumerate(tokens):
            row, col = divmod(index, grid)
            cell_width = (col_edges[col + 1] - col_edges[col]) * points_per_pixel
            size = fontsize if fontsize is not None else _fitting_fontsize(token, cell_width)
            self.texts_.append(ax.text(
                (col_edges[col] + col_edges[col + 1]) / 2, (row_edges[row] + row_edges[row + 1]) / 2, token,
                ha="center", va="center", fontsize=size, color=text_color, path_effects=outline,
            ))
        self.ax_ = ax
        self.figure_ = ax.figure
        return self

    @classmethod
    def from_estimator(cls, tokenizer, image, *, ax=None, fontsize=None, text_color="white",
                       grid_color="#ffbf00", cmap="gray"):
        """Encode one image with a fitted tokenizer and draw its token map.

        The image is drawn as the checkpoint reads it (resized to its size and
        converted to its colour mode), so the cells fall on its patches. The
        tokenizer's ``output`` does not matter: the words are those of
        ``output="text"``, at its ``token_grid``.

        Parameters
        ----------
        tokenizer : LQAETokenizer
            A fitted tokenizer.
        image : array-like, str, path-like or PIL.Image.Image
            One image: an array (H, W) or (H, W, C) with C in 1, 3, 4 (uint8,
            or float in [0, 1]), a file path or a PIL image. A batch holding
            exactly one image is accepted too.
        ax : matplotlib.axes.Axes, default=None
            Axes to draw on; None creates a figure with one axes.
        fontsize : float or None, default=None
            See :meth:`plot`.
        text_color : str, default="white"
            See :meth:`plot`.
        grid_color : str or None, default="#ffbf00"
            See :meth:`plot`.
        cmap : str, default="gray"
            See :meth:`plot`.

        Returns
        -------
        display : TokenMapDisplay
            The drawn display; ``display.tokens`` holds the words.

        Examples
        --------
        >>> from lqae_sklearn import LQAETokenizer
        >>> from lqae_sklearn.plotting import TokenMapDisplay
        >>> tokenizer = LQAETokenizer(token_grid=3).fit()
        >>> image = "examples/fashion-mnist/sneaker/00012.png"
        >>> display = TokenMapDisplay.from_estimator(tokenizer, image)  # doctest: +SKIP
        >>> len(display.texts_)  # doctest: +SKIP
        9
        """
        tokenizer = check_tokenizer(tokenizer)
        batch = as_batch_of_one(image, "image")
        picture = model_view(tokenizer, batch)[0]
        ids = tokenizer.encode(batch, ("ids",))["ids"]
        tokens = tokenizer.ids_to_text(ids)[0].split(" ")
        patch_grid = tokenizer.checkpoint_config_["model"]["image_size"] // tokenizer.checkpoint_config_["model"][
            "patch_size"]
        display = cls(picture, tokens, patch_grid=patch_grid)
        return display.plot(ax=ax, fontsize=fontsize, text_color=text_color, grid_color=grid_color, cmap=cmap)


def _check_tokens(tokens) -> list[str]:
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of strings, one per cell, not a single string (split it first)")
    try:
        tokens = list(tokens)
    except TypeError:
        raise TypeError(f"tokens must be a sequence of strings, got {type(tokens).__name__}") from None
    grid = math.isqrt(len(tokens))
    if not tokens or grid * grid != len(tokens):
        raise ValueError(f"tokens must fill a square grid (1, 4, 9, 16, ... of them), got {len(tokens)}")
    bad = [i for i, t in enumerate(tokens) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokens[{bad[0]}] is a {type(tokens[bad[0]]).__name__}, not a string")
    return tokens


def _cell_edges(grid: int, patch_grid, size: int) -> np.ndarray:
    """Pixel coordinates of the ``grid + 1`` cell edges along one side of ``size`` pixels."""
    if patch_grid is None or patch_grid == grid:
        return np.linspace(0, size, grid + 1)
    if not isinstance(patch_grid, Integral) or isinstance(patch_grid, bool) or patch_grid < grid:
        raise ValueError(f"patch_grid must be None or an int >= the token grid ({grid}), got {patch_grid!r}")
    # Patch p belongs to region p * grid // patch_grid, as unpool_tokens (inverse_transform) assigns it.
    regions = np.arange(patch_grid) * grid // patch_grid
    first_patch = np.searchsorted(regions, np.arange(grid))
    return np.append(first_patch, patch_grid) * size / patch_grid


def _points_per_pixel(ax, shape) -> float:
    """Typographic points per image pixel, for an image drawn with equal aspect filling ``ax``."""
    box = ax.get_position()
    width_in = box.width * ax.figure.get_figwidth()
    height_in = box.height * ax.figure.get_figheight()
    height, width = shape
    return 72.0 * min(width_in / width, height_in / height)


def _fitting_fontsize(token: str, cell_width_points: float) -> float:
    """The largest size (at most 14 pt, at least 3 pt) at which ``token`` fits its cell's width."""
    fitting = 0.9 * cell_width_points / (_CHAR_WIDTH * max(len(token), 2))
    return float(min(14.0, max(_MIN_FONTSIZE, fitting)))

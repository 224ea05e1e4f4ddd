"""`ReconstructionDisplay`: originals over their reconstructions from tokens."""

from __future__ import annotations

import numpy as np

from ._matplotlib import axes_or_new, import_pyplot
from ._pixels import check_pictures, check_tokenizer, draw_picture, model_view

_GAP = 1  # pixels of white between pictures
_ROW_NAMES = ("original", "from tokens")


class ReconstructionDisplay:
    """Originals over their reconstructions: what the tokens say about each image.

    All pictures are drawn in one axes: the originals in the top row, the
    reconstructions below, one column per image, with each column's PSNR
    (peak signal-to-noise ratio, in dB; higher is closer) under it.

    Build it with :meth:`from_estimator`; the constructor takes precomputed
    values.

    Parameters
    ----------
    originals : ndarray of shape (n_images, H, W) or (n_images, H, W, 3)
        The images as the checkpoint reads them, float in [0, 1] (or uint8).
    reconstructions : ndarray of the same shape as ``originals``
        Their reconstructions, float in [0, 1] (or uint8).

    Attributes
    ----------
    psnr_ : ndarray of shape (n_images,)
        PSNR of each reconstruction in dB (``inf`` for an exact one).
    image_ : matplotlib.image.AxesImage
        The drawn mosaic.
    ax_ : matplotlib.axes.Axes
        Axes the mosaic is drawn on.
    figure_ : matplotlib.figure.Figure
        Figure holding ``ax_``.

    See Also
    --------
    TokenMapDisplay : One image with its tokens written on its patches.
    lqae_sklearn.LQAETokenizer.inverse_transform : Images from token ids or texts.

    Examples
    --------
    >>> import numpy as np
    >>> from lqae_sklearn.plotting import ReconstructionDisplay
    >>> originals = np.zeros((3, 28, 28))
    >>> display = ReconstructionDisplay(originals, originals + 0.1).plot()
    >>> display.psnr_.round(1)
    array([20., 20., 20.], dtype=float32)
    """

    def __init__(self, originals, reconstructions):
        self.originals = originals
        self.reconstructions = reconstructions

    def plot(self, ax=None, *, show_psnr=True, cmap="gray"):
        """Draw the mosaic of originals (top) and reconstructions (bottom).

        Parameters
        ----------
        ax : matplotlib.axes.Axes, default=None
            Axes to draw on; None creates a figure sized to the images.
        show_psnr : bool, default=True
            Write each column's PSNR under it.
        cmap : str, default="gray"
            Colormap of grayscale images (ignored for RGB).

        Returns
        -------
        display : ReconstructionDisplay
            This object, with the drawn artists as attributes.

        Examples
        --------
        >>> import numpy as np
        >>> from lqae_sklearn.plotting import ReconstructionDisplay
        >>> display = ReconstructionDisplay(np.zeros((2, 8, 8)), np.ones((2, 8, 8)))
        >>> display.plot(show_psnr=False).ax_.get_yticklabels()[0].get_text()
        'original'
        """
        import_pyplot()
        originals = check_pictures(self.originals, "originals", batch=True)
        reconstructions = check_pictures(self.reconstructions, "reconstructions", batch=True)
        if originals.shape != reconstructions.shape:
            raise ValueError(f"originals and reconstructions must have the same shape, got {originals.shape} "
                             f"and {reconstructions.shape}")
        n_images, height, width = originals.shape[:3]
        errors = ((originals - reconstructions) ** 2).reshape(n_images, -1).mean(axis=1)
        with np.errstate(divide="ignore"):
            self.psnr_ = (10 * np.log10(1.0 / errors)).astype(np.float32)

        mosaic = np.ones((2 * height + _GAP, n_images * (width + _GAP) - _GAP) + originals.shape[3:], np.float32)
        for i in range(n_images):
            left = i * (width + _GAP)
            mosaic[:height, left:left + width] = originals[i]
            mosaic[height + _GAP:, left:left + width] = reconstructions[i]

        ax = axes_or_new(ax, figsize=(min(1.1 * n_images + 1.2, 16), 2.8))
        self.image_ = draw_picture(ax, mosaic, cmap)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_yticks([height / 2, height + _GAP + height / 2], _ROW_NAMES)
        ax.tick_params(length=0)
        centers = np.arange(n_images) * (width + _GAP) + width / 2
        if show_psnr:
            ax.set_xticks(centers, [f"{p:.1f} dB" for p in self.psnr_], fontsize="small")
        else:
            ax.set_xticks([])
        self.ax_ = ax
        self.figure_ = ax.figure
        return self

    @classmethod
    def from_estimator(cls, tokenizer, X, *, ax=None, show_psnr=True, cmap="gray"):
        """Encode images with a fitted tokenizer, decode their tokens and draw both.

        The originals are drawn as the checkpoint reads them (resized, in its
        colour mode); the reconstructions are ``inverse_transform`` of their
        token ids, at the tokenizer's ``token_grid`` (a coarser grid gives
        blockier reconstructions).

        Parameters
        ----------
        tokenizer : LQAETokenizer
            A fitted tokenizer.
        X : images
            Any collection :meth:`~lqae_sklearn.LQAETokenizer.transform` takes:
            an array (n, H, W) or (n, H, W, C), a list of paths, PIL images or
            arrays. One column per image: a handful reads best.
        ax : matplotlib.axes.Axes, default=None
            Axes to draw on; None creates a figure sized to the images.
        show_psnr : bool, default=True
            Write each column's PSNR under it.
        cmap : str, default="gray"
            Colormap of grayscale images (ignored for RGB).

        Returns
        -------
        display : ReconstructionDisplay
            The drawn display.

        Examples
        --------
        >>> from lqae_sklearn import LQAETokenizer
        >>> from lqae_sklearn.plotting import ReconstructionDisplay
        >>> tokenizer = LQAETokenizer().fit()
        >>> paths = ["examples/fashion-mnist/bag/00018.png", "examples/fashion-mnist/sneaker/00012.png"]
        >>> display = ReconstructionDisplay.from_estimator(tokenizer, paths)  # doctest: +SKIP
        >>> display.psnr_.shape  # doctest: +SKIP
        (2,)
        """
        tokenizer = check_tokenizer(tokenizer)
        originals = model_view(tokenizer, X)
        ids = tokenizer.encode(X, ("ids",))["ids"]
        reconstructions = np.clip(tokenizer.inverse_transform(ids), 0.0, 1.0)
        return cls(originals, reconstructions).plot(ax=ax, show_psnr=show_psnr, cmap=cmap)

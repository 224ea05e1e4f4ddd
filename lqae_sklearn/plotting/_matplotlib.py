"""matplotlib, imported only when a display draws, and the axes it draws on."""

from __future__ import annotations

INSTALL_HINT = "pip install 'lqae-sklearn[plotting]'"


def import_pyplot():
    """``matplotlib.pyplot``, or an ImportError that names the extra to install."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # ModuleNotFoundError, or a matplotlib that fails to import
        raise ImportError(
            f"lqae_sklearn.plotting draws with matplotlib, which is not installed: {INSTALL_HINT}"
        ) from exc
    return plt


def axes_or_new(ax, figsize):
    """``ax`` itself, or the single axes of a new figure of ``figsize`` inches."""
    plt = import_pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    elif not hasattr(ax, "figure") or not hasattr(ax, "imshow"):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


def hide_frame(ax, *, keep_border=False) -> None:
    """No ticks (and no spines unless ``keep_border``): the axes shows a picture, not data coordinates."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(keep_border)
        spine.set_color("#808080")

"""Token grids: averaging patch latents over coarser regions, and spreading coarse ids back over the patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_tokens(z: torch.Tensor, token_grid: int | None) -> torch.Tensor:
    """Average (B, n*n, D) patch latents over a ``token_grid`` x ``token_grid`` grid of regions.

    Region edges follow ``adaptive_avg_pool2d`` (regions overlap by a patch when
    the grids do not divide). None, or the patch grid itself, returns ``z``.

    Parameters
    ----------
    z : torch.Tensor
        Patch latents (B, n * n, D) over an n x n patch grid.
    token_grid : int or None
        Side of the coarse grid.

    Returns
    -------
    pooled : torch.Tensor
        (B, token_grid ** 2, D), or ``z`` itself.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import pool_tokens
    >>> pool_tokens(torch.ones(2, 49, 8), 3).shape
    torch.Size([2, 9, 8])
    """
    grid = int(round(z.shape[1] ** 0.5))
    if token_grid is None or token_grid == grid:
        return z
    b, _, d = z.shape
    pooled = F.adaptive_avg_pool2d(z.transpose(1, 2).reshape(b, d, grid, grid).float(), token_grid)
    return pooled.flatten(2).transpose(1, 2).to(z.dtype)


def unpool_tokens(ids: torch.Tensor, grid: int) -> torch.Tensor:
    """Ids of a coarse g x g token grid (B, g*g) -> (B, grid*grid): each patch takes its nearest region's id.

    Parameters
    ----------
    ids : torch.Tensor
        Token ids (B, g * g) of a coarse grid.
    grid : int
        Side of the patch grid (at least g).

    Returns
    -------
    ids : torch.Tensor
        (B, grid * grid): patch ``p`` of a row takes region ``p * g // grid``.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.model import unpool_tokens
    >>> unpool_tokens(torch.tensor([[1, 2, 3, 4]]), 3)
    tensor([[1, 1, 2, 1, 1, 2, 3, 3, 4]])
    """
    b, t = ids.shape
    coarse = int(round(t**0.5))
    if coarse * coarse != t or coarse > grid:
        raise ValueError(f"{t} tokens per image do not form a square grid of at most {grid} x {grid}")
    index = (torch.arange(grid, device=ids.device) * coarse) // grid  # region row/column of each patch
    square = ids.view(b, coarse, coarse)
    return square[:, index][:, :, index].reshape(b, grid * grid)

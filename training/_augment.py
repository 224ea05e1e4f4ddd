"""The paper's augmentation (random resized crop + horizontal flip), batched on the device.

One affine ``grid_sample`` per batch: each image gets its own crop box and flip,
drawn from the step's generator so that a resumed run sees the same crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> torch.Tensor:
    """Crop a random box of ``scale`` x the area and ``ratio`` aspect, resize back, maybe flip.

    Parameters
    ----------
    images : torch.Tensor
        Float images (B, C, H, W).
    generator : torch.Generator
        Source of every random choice (boxes and flips), for exact resumption.
    scale : tuple of float, default=(0.2, 1.0)
        Range of the box's area as a fraction of the image's.
    ratio : tuple of float, default=(3 / 4, 4 / 3)
        Range of the box's aspect ratio.
    hflip : bool, default=True
        Flip each image horizontally with probability 1/2.

    Returns
    -------
    torch.Tensor
        The augmented images, same shape as ``images``.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.training import random_resized_crop
    >>> out = random_resized_crop(torch.rand(4, 1, 28, 28), torch.Generator().manual_seed(0), scale=(0.5, 1.0))
    >>> out.shape
    torch.Size([4, 1, 28, 28])
    """
    b, device = images.shape[0], images.device

    def uniform(low, high):
        return torch.rand(b, device=device, generator=generator) * (high - low) + low

    area = uniform(*scale)
    log_ratio = uniform(math.log(ratio[0]), math.log(ratio[1]))
    # Box sides as fractions of the image side, clipped so the box fits.
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = uniform(-1.0, 1.0) * (1 - w)
    cy = uniform(-1.0, 1.0) * (1 - h)
    flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if hflip else torch.ones(b, device=device)
    theta = torch.zeros(b, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

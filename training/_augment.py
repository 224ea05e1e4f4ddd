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

    ``images`` is float (B, C, H, W); the output has the same shape.
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

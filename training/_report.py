"""What a training run writes for people: a JSONL metrics log and image grids."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]."""
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def code_statistics(counts: torch.Tensor, codebook_size: int) -> dict:
    """Usage (fraction of codebook rows seen) and perplexity of a histogram of token ids."""
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return {"codebook_usage": 0.0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    return {
        "codebook_usage": float((counts > 0).sum()) / codebook_size,
        "perplexity": float(torch.exp(-(p * p.log()).sum())),
    }


class MetricsLog:
    """Append-only JSONL log; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a killed run


def save_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> None:
    """Two rows of images: originals on top, reconstructions below (PNG)."""
    rows = [originals, reconstructions.clamp(0, 1)]
    tiles = [torch.cat(list(row.float().cpu()), dim=2) for row in rows]  # (C, H, n*W)
    grid = torch.cat(tiles, dim=1)
    array = (grid.numpy() * 255).round().astype(np.uint8)
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    image = Image.fromarray(array)
    scale = max(1, 256 // max(1, originals.shape[-1]))  # upscale tiny images so they can be seen
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)

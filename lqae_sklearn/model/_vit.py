"""Vision Transformer encoder and decoder of the autoencoder.

Two block styles: the standard pre-LN ViT block, and the official LQAE block
(extra LayerNorm after attention, gated GELU feed-forward with a depthwise 3x3
convolution over the patch grid). Attention runs through
``F.scaled_dot_product_attention`` so CUDA gets flash attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out(x.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvGLU(nn.Module):
    """Official LQAE feed-forward: gelu(fc1 x) * fc2 x, depthwise 3x3 conv, LN, fc_out."""

    def __init__(self, dim: int, hidden: int, grid: int):
        super().__init__()
        self.grid = grid
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = F.gelu(self.fc1(x)) * self.fc2(x)
        # Channels-last view of the patch grid; the conv mixes each patch with its 8 neighbours.
        h = h.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        h = self.dwconv(h).flatten(2).transpose(1, 2)
        return self.fc_out(self.norm(h))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, style: str, grid: int):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        if style == "lqae":
            self.attn = Attention(dim, heads, bias=False)
            self.post_attn_norm = nn.LayerNorm(dim)
            self.ffn = ConvGLU(dim, hidden, grid)
        else:
            self.attn = Attention(dim, heads)
            self.post_attn_norm = nn.Identity()
            self.ffn = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.norm1(x)))
        return x + self.ffn(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks over a fixed grid of tokens with learned positions."""

    def __init__(self, dim, depth, heads, mlp_ratio, style, grid):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, style, grid) for _ in range(depth))

    def forward(self, x: torch.Tensor, return_layers: bool = False):
        x = x + self.pos
        layers = []
        for block in self.blocks:
            x = block(x)
            if return_layers:
                layers.append(x)
        return (x, layers) if return_layers else x


class ViTEncoder(nn.Module):
    """Image (B, C, H, W) in [0, 1] -> one vector per patch (B, T, out_dim)."""

    def __init__(self, image_size, patch_size, in_channels, dim, depth, heads, mlp_ratio, style, out_dim):
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=style != "lqae")
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, style, grid)
        # The official encoder has no final norm; we project only when the
        # encoder is narrower or wider than the language model's embeddings.
        self.proj = nn.Identity() if dim == out_dim else nn.Linear(dim, out_dim)

    def forward(self, images: torch.Tensor, return_layers: bool = False):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if return_layers:
            x, layers = self.transformer(x, return_layers=True)
            return self.proj(x), layers
        return self.proj(self.transformer(x))


class ViTDecoder(nn.Module):
    """LM hidden states (B, T, in_dim) -> image (B, C, H, W)."""

    def __init__(self, image_size, patch_size, out_channels, dim, depth, heads, mlp_ratio, style, in_dim):
        super().__init__()
        self.grid = image_size // patch_size
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.proj = nn.Identity() if dim == in_dim else nn.Linear(in_dim, dim)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, style, self.grid)
        self.norm = nn.LayerNorm(dim)
        # A linear map per patch: the same function as the official ConvTranspose(k=stride=patch).
        self.to_pixels = nn.Linear(dim, out_channels * patch_size * patch_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.to_pixels(self.norm(self.transformer(self.proj(hidden))))
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.out_channels
        x = x.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)

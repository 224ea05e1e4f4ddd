"""Cross-entropy of a linear projection onto a large vocabulary, a chunk of rows at a time.

The LQAE's MLM term scores LM hidden states against every vocabulary row (30,522 for
MiniLM, 50,265 for RoBERTa). Written plainly, ``F.cross_entropy(F.linear(h, W, b).float(), t)``
keeps the whole (rows x vocabulary) float32 logits tensor alive until the backward pass, and
autograd adds its gradient and the low-precision copy: 0.2 GB of float32 per 1,000 rows at
RoBERTa's vocabulary. Here the rows go through in chunks; each chunk's logits give its loss
and, when a gradient is wanted, are turned at once into that chunk's gradient (softmax minus
the one-hot target, times W). No (rows x vocabulary) tensor outlives its chunk, and the
backward pass has nothing left to multiply: the work is the plain computation's, forward and
backward, in the same precisions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Logits (rows x vocabulary, float32) held at once: 64 MiB on a CPU, 512 MiB on a GPU.
CHUNK_LOGITS = {"cpu": 2**24, "cuda": 2**27}


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, row_weights: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """``sum_i row_weights[i] * cross_entropy(hidden[i] @ weight.T + bias, targets[i])``, chunk by chunk.

    Under autocast the projection runs in the autocast dtype and the softmax in float32, as
    ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` would. Gradients flow
    to ``hidden``, ``weight`` and ``bias`` where they require one (never to ``row_weights``).

    Parameters
    ----------
    hidden : torch.Tensor
        Rows to score (N, D).
    weight : torch.Tensor
        The projection (V, D): one row per class.
    bias : torch.Tensor or None
        Class biases (V,).
    targets : torch.Tensor
        The right class of each row (N,), int64.
    row_weights : torch.Tensor
        Each row's weight in the sum (N,); ``1 / n`` on n rows gives the mean, 0 drops a row.
    chunk_rows : int or None, default=None
        Rows per chunk; None holds at most :data:`CHUNK_LOGITS` logits at once.

    Returns
    -------
    torch.Tensor
        The weighted sum, a float32 scalar.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from lqae_sklearn.model._linear_cross_entropy import linear_cross_entropy
    >>> h, w, t = torch.randn(6, 4), torch.randn(10, 4), torch.arange(6)
    >>> loss = linear_cross_entropy(h, w, None, t, torch.full((6,), 1 / 6), chunk_rows=4)
    >>> torch.allclose(loss, F.cross_entropy(h @ w.T, t))
    True
    """
    device_type = hidden.device.type
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_LOGITS.get(device_type, CHUNK_LOGITS["cpu"]) // weight.shape[0])
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    grad_enabled = torch.is_grad_enabled()
    needs = tuple(grad_enabled and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, row_weights, chunk_rows, compute_dtype, needs)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The loss and its gradients in one pass over the chunks; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_weights, chunk_rows, compute_dtype, needs):
        need_hidden, need_weight, need_bias = needs
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(h) if need_hidden else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, min(start + chunk_rows, h.shape[0]))
                loss, d_logits = _chunk(h[rows], w, b, targets[rows], row_weights[rows], any(needs))
                total = total + loss
                if need_hidden:
                    grad_h[rows] = d_logits @ w
                if need_weight:
                    grad_w += (d_logits.T @ h[rows]).float()
                if need_bias:
                    grad_b += d_logits.float().sum(dim=0)
                del d_logits  # before the next chunk's logits: one chunk alive at a time
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.needs = needs
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved).float() * grad_total).to(dtype) if need else None
                 for need, dtype in zip(ctx.needs, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def _chunk(h, w, b, targets, row_weights, with_grad: bool):
    """Weighted loss sum of some rows and, with ``with_grad``, d loss / d logits in the projection's dtype."""
    scale = row_weights.float()
    logits = F.linear(h, w, b).float()
    lse = logits.logsumexp(dim=1)
    loss = (scale * (lse - logits.gather(1, targets[:, None]).squeeze(1))).sum()
    if not with_grad:
        return loss, None
    # scale * (softmax - one_hot(target)), built in the logits' own memory.
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, targets[:, None], torch.full_like(targets[:, None], -1, dtype=probs.dtype))
    return loss, probs.mul_(scale[:, None]).to(w.dtype)

"""Peak tensor memory of the MLM term, plain against chunked, on the CPU.

The term is the LQAE's masked-token loss: the frozen LM's MLM head over the masked positions and a
cross-entropy against the image's own ids, forward and backward (to the hidden states). Shape by
default: batch 8 x 256 tokens, half masked, a RoBERTa-base-shaped head (width 768, vocabulary
50,265; random weights: they do not change the memory).

- plain: ``F.cross_entropy(lm.mlm_logits(hidden[mask]).float(), ids[mask])``, the former code;
- chunked, masked rows: what an eager training step runs (``LQAE._mlm_loss``);
- chunked, every row weighted by the mask: what a compiled step runs (one shape every step).

Memory is counted by :class:`~lqae_sklearn.training._accounting.TensorMemoryPeak` (bytes of tensor
storage alive at once, created inside the measured call).

    python benchmarks/mlm_memory.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lqae_sklearn import FrozenLanguageModel
from lqae_sklearn.training._accounting import TensorMemoryPeak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50265)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    args = parser.parse_args()
    from transformers import RobertaConfig

    torch.manual_seed(0)
    hf = RobertaConfig(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=1,
                       num_attention_heads=args.width // 64, intermediate_size=4 * args.width)
    lm = FrozenLanguageModel.from_hf_config(hf, name="random-roberta")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.tokens, args.width, generator=g)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g)
    mask = torch.rand(args.batch, args.tokens, generator=g) < args.mask_ratio
    count = mask.sum().clamp(min=1)

    def plain(h):
        return F.cross_entropy(lm.mlm_logits(h[mask]).float(), ids[mask])

    def chunked_masked(h):
        rows = h[mask]
        return lm.mlm_loss(rows, ids[mask], (1.0 / count).expand(rows.shape[0]))

    def chunked_all_rows(h):
        return lm.mlm_loss(h.flatten(0, 1), ids.flatten(), mask.flatten().float() / count)

    losses = {}
    for name, fn in (("plain", plain), ("chunked_masked_rows", chunked_masked), ("chunked_all_rows", chunked_all_rows)):
        h = hidden.clone().requires_grad_()
        start = time.perf_counter()
        with TensorMemoryPeak() as memory:
            loss = fn(h)
            loss.backward()
        seconds = time.perf_counter() - start
        losses[name] = (loss.detach(), h.grad)
        print(json.dumps({
            "what": name, "rows_masked": int(mask.sum()), "rows": mask.numel(), "vocab": args.vocab,
            "width": args.width, "peak_mib": round(memory.peak / 2**20, 1), "seconds": round(seconds, 2),
            "loss": float(loss.detach()),
        }))
    ref_loss, ref_grad = losses["plain"]
    for name in ("chunked_masked_rows", "chunked_all_rows"):
        loss, grad = losses[name]
        print(json.dumps({"what": "difference_from_plain", "variant": name,
                          "loss_abs": float((loss - ref_loss).abs()),
                          "grad_max_abs_over_max": float((grad - ref_grad).abs().max() / ref_grad.abs().max())}))


if __name__ == "__main__":
    main()

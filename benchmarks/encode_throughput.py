"""CPU encoding throughput of LQAETokenizer, as a fraction of the machine's matmul rate.

Measured in one run, on ``--threads`` CPU threads (2 by default, the target machine):

- the machine's float32 matmul rate (2048 x 2048 x 2048, torch), the ceiling;
- images/s of ``LQAETokenizer.encode`` for ``"ids"`` and for ``"embeddings"``
  (uint8 Fashion-MNIST test images in, numpy out, batch 256: everything a user
  pays for);
- FLOPs per image, counted analytically (matmul-shaped work only, a
  multiply-add = 2 FLOPs) and cross-checked with ``torch.utils.flop_counter``:
    encoder   patch embedding + per block: qkv, attention scores and values,
              output projection, MLP; + projection to the LM width
    quantizer cosine scores of every token against every allowed codebook row
              (exact nearest-neighbour search: T x D x V_allowed)
    LM        (embeddings only) per layer: qkv, attention, output, feed-forward
- achieved FLOP/s = FLOPs/image x images/s, and its fraction of the matmul rate;
- where one batch's time goes (encoder, quantizer, LM), each timed alone.

Rounds interleave the matmul measurement with the encodings, so a neighbour
slowing the machine down affects numerator and denominator alike; the report
gives each round and the median.

    python benchmarks/encode_throughput.py                  # shipped checkpoint
    python benchmarks/encode_throughput.py --checkpoint /tmp/ck-random --images 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.datasets import fetch_fashion_mnist


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Median float32 FLOP/s of an n x n x n torch matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def analytic_flops(tok: LQAETokenizer) -> dict:
    """Matmul FLOPs per image of each stage (multiply-add = 2)."""
    model = tok.model_
    c = model.config
    lm = model.language_model
    t, d, w = c.num_tokens, c.encoder_dim, lm.hidden_size
    hidden = int(d * c.mlp_ratio)
    attention = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d
    if c.block == "vit":
        ffn = 2 * 2 * t * d * hidden
    else:  # gated fc1/fc2, depthwise 3x3 conv, fc_out
        ffn = 2 * 2 * t * d * hidden + 2 * t * hidden * 9 + 2 * t * hidden * d
    encoder = 2 * t * c.in_channels * c.patch_size**2 * d + c.encoder_depth * (attention + ffn)
    if d != w:
        encoder += 2 * t * d * w
    quantizer = 2 * t * w * model.quantizer.codebook_size
    lm_ffn = lm.encoder.config.intermediate_size
    lm_layer = 2 * t * w * 3 * w + 2 * 2 * t * t * w + 2 * t * w * w + 2 * 2 * t * w * lm_ffn
    return {"encoder": encoder, "quantizer": quantizer, "lm": lm.num_layers * lm_layer}


def counted_flops(tok: LQAETokenizer, images: np.ndarray, layers: list[str]) -> float:
    """FLOPs per image as torch's flop counter sees one forward pass."""
    batch = torch.from_numpy(images[:8, None].astype(np.float32) / 255.0)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        tok.model_.encode_with_features(batch, layers, with_ids=True)
    return counter.get_total_flops() / len(batch)


def stage_times(tok: LQAETokenizer, images: np.ndarray) -> dict:
    """Seconds per image of each stage on one batch, each timed alone (after a warm-up)."""
    model = tok.model_
    batch = torch.from_numpy(images[: tok.batch_size, None].astype(np.float32) / 255.0)
    out = {}
    with torch.inference_mode():
        z = model.encoder(batch)
        ids = model.quantizer.nearest(z)
        embedded = model.embed_ids(ids)
        for name, fn in [
            ("encoder", lambda: model.encoder(batch)),
            ("quantizer", lambda: model.quantizer.nearest(z)),
            ("lm", lambda: model.language_model(embedded, output_hidden_states=True)),
        ]:
            fn()
            start = time.perf_counter()
            fn()
            out[name] = (time.perf_counter() - start) / len(batch)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint path (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=1024, help="images encoded per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", default="default", help="layers for the embeddings output")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    images, _ = fetch_fashion_mnist(subset="test", return_X_y=True)
    images = images[: args.images]
    ids_tok = LQAETokenizer(args.checkpoint, output="ids", batch_size=args.batch_size, device="cpu").fit()
    emb_tok = LQAETokenizer(args.checkpoint, output="embeddings", layers=args.layers,
                            batch_size=args.batch_size, device="cpu").fit()

    stages = analytic_flops(ids_tok)
    uses_lm = any(name.startswith("lm.") for name in emb_tok.layers_)
    flops = {
        "ids": stages["encoder"] + stages["quantizer"],
        "embeddings": stages["encoder"] + (stages["quantizer"] + stages["lm"] if uses_lm else 0),
    }
    counted = {
        "ids": counted_flops(ids_tok, images, []),
        "embeddings": counted_flops(emb_tok, images, emb_tok.layers_),
    }

    for output, tok in (("ids", ids_tok), ("embeddings", emb_tok)):
        tok.encode(images[: args.batch_size], (output,))  # warm up allocator and kernels

    rounds = []
    for _ in range(args.rounds):
        record = {"matmul_flops_per_s": matmul_rate()}
        for output, tok in (("ids", ids_tok), ("embeddings", emb_tok)):
            start = time.perf_counter()
            result = tok.encode(images, (output,))[output]
            seconds = time.perf_counter() - start
            assert len(result) == len(images)
            record[f"{output}_images_per_s"] = len(images) / seconds
        record["matmul_flops_per_s"] = (record["matmul_flops_per_s"] + matmul_rate()) / 2
        for output in ("ids", "embeddings"):
            achieved = flops[output] * record[f"{output}_images_per_s"]
            record[f"{output}_fraction_of_matmul"] = achieved / record["matmul_flops_per_s"]
        rounds.append(record)
        print(json.dumps({k: round(v, 4) if v < 10 else round(v, 1) for k, v in record.items()}), flush=True)

    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    report = {
        "checkpoint": ids_tok.checkpoint_,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "images": len(images),
        "embedding_layers": emb_tok.layers_,
        "analytic_gflops_per_image": {k: v / 1e9 for k, v in {**stages, **{f"total_{k}": v for k, v in flops.items()}}.items()},
        "flop_counter_gflops_per_image": {k: v / 1e9 for k, v in counted.items()},
        "stage_ms_per_image": {k: v * 1e3 for k, v in stage_times(ids_tok, images).items()},
        "rounds": rounds,
        "median": median,
    }
    print(json.dumps(report, indent=1))
    print(
        f"\nids: {median['ids_images_per_s']:.1f} img/s, {flops['ids'] / 1e9:.3f} GFLOP/img, "
        f"{median['ids_fraction_of_matmul']:.1%} of matmul | embeddings: {median['embeddings_images_per_s']:.1f} img/s, "
        f"{flops['embeddings'] / 1e9:.3f} GFLOP/img, {median['embeddings_fraction_of_matmul']:.1%} of matmul | "
        f"matmul {median['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s on {args.threads} threads"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

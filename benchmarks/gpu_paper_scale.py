"""Throughput of LQAE at the paper's scale on one GPU (issue: train and encode close to the hardware limit).

Paper configuration: 256x256 RGB, patch 16 (256 tokens), ViT-B encoder and decoder,
a frozen RoBERTa-base-shaped LM (50,265 x 768 codebook) with random weights (the
weights do not change the FLOPs), batch 256, bf16 autocast, fused AdamW.

Measured in one run:
- the card's bf16 matmul rate (8192^3), the ceiling for MFU;
- FLOPs per image, counted by ``torch.utils.flop_counter`` on the real modules;
- training images/s, eager and ``torch.compile``d, for the standard ViT block and
  the official LQAE block;
- where a training step's time goes (each stage timed alone with CUDA events);
- encoding to ids and to embeddings, images/s;
- agreement of the bf16-scored + float32-rescored nearest-neighbour search with
  the all-float32 search;
- peak memory per image and the largest batch that fits.

``--tiny`` runs the same code on a toy configuration (CPU-friendly) to check it.
Results are printed as JSON lines and a final table, and written to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lqae_sklearn import LQAE, FrozenLanguageModel, preset_config


def log(results: list, out, **record):
    results.append(record)
    print(json.dumps(record), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


def timeit(fn, device, iters: int, warmup: int = 2) -> float:
    """Median seconds per call (CUDA events when on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_rate(device, n: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b, device, iters=10, warmup=3)


def build(block: str, tiny: bool, device) -> LQAE:
    from transformers import RobertaConfig

    if tiny:
        config = preset_config("paper", image_size=32, patch_size=8, encoder_dim=64, encoder_depth=2, encoder_heads=2,
                               decoder_dim=64, decoder_depth=2, decoder_heads=2, block=block)
        hf = RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    else:
        config = preset_config("paper", block=block)
        hf = RobertaConfig()  # roberta-base shape: 50,265 x 768, 12 layers
    lm = FrozenLanguageModel.from_hf_config(hf, name="random-roberta-base")
    model = LQAE(config, lm).to(device)
    if device.type == "cuda":
        model.language_model.to(torch.bfloat16)
    return model


def make_step(model, optimizer, images, autocast):
    def step():
        with autocast:
            out = model(images)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def count_flops(model, images, autocast, train: bool) -> float:
    """FLOPs per image of one training step (forward + backward) or of encoding."""
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        if train:
            model.train()
            model(images).loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model.encode(images)
    return counter.get_total_flops() / images.shape[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--encode-batch", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: list = []
    torch.manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    peak = matmul_rate(device, 256 if args.tiny else 8192)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(results, args.out, what="matmul_rate", device=name, tflops=peak / 1e12, torch=torch.__version__)

    size = 32 if args.tiny else 256
    batch = 4 if args.tiny else args.batch
    for block in ("vit", "lqae"):
        model = build(block, args.tiny, device)
        images = torch.rand(batch, 3, size, size, device=device)
        small = images[:2]
        train_flops = count_flops(model, small, autocast, train=True)
        encode_flops = count_flops(model, small, autocast, train=False)
        params = sum(p.numel() for p in model.trainable_parameters())
        log(results, args.out, what="flops", block=block, train_gflop_per_image=train_flops / 1e9,
            encode_gflop_per_image=encode_flops / 1e9, trainable_params=params)

        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=5e-4,
                                      fused=device.type == "cuda")
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = make_step(model, optimizer, images, autocast)
        t = timeit(step, device, args.iters)
        mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        log(results, args.out, what="train", block=block, compiled=False, batch=batch, images_per_s=batch / t,
            mfu=batch / t * train_flops / peak, peak_memory_gib=mem / 2**30)

        if block == "vit":
            stage_times(model, images, autocast, device, args.iters, results, args.out)
            memory_scaling(model, optimizer, size, autocast, device, results, args.out, args.tiny)
            encode_ids_and_embeddings(model, size, autocast, device, args, results, args.out, encode_flops, peak, compiled=False)
            quantizer_agreement(model, size, device, results, args.out, args.tiny)

        if not args.no_compile and block == "vit":  # compile time is device time: the standard block only
            try:
                for part in (model.encoder, model.decoder, model.language_model):
                    part.compile()
                t0 = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                t = timeit(step, device, args.iters)
                log(results, args.out, what="train", block=block, compiled=True, batch=batch, images_per_s=batch / t,
                    mfu=batch / t * train_flops / peak, compile_s=compile_s)
                encode_ids_and_embeddings(model, size, autocast, device, args, results, args.out, encode_flops, peak, compiled=True)
            except Exception as exc:  # keep the eager figures if compilation fails on this stack
                log(results, args.out, what="compile_failed", block=block, error=repr(exc)[:500])
        del model, optimizer, step
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\nSUMMARY")
    for r in results:
        if r["what"] in ("train", "encode", "embeddings", "matmul_rate", "flops", "agreement", "memory"):
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def stage_times(model, images, autocast, device, iters, results, out):
    """Each stage of a training step timed alone (forward + backward where it trains)."""
    lm = model.language_model
    with torch.no_grad(), autocast:
        z = model.encoder(images)
        ids = model.quantizer.nearest(z)
        q = F.embedding(ids, lm.codebook)
        hidden = lm(q)
        mask = torch.rand(ids.shape, device=device) < 0.5

    def encoder_fb():
        with autocast:
            model.encoder(images).float().sum().backward()

    def quantize():
        model.quantizer.nearest(z)

    def lm_fb():
        x = q.detach().requires_grad_()
        with autocast:
            lm(x).float().sum().backward()

    def mlm_fb():
        h = hidden.detach().requires_grad_()
        with autocast:
            F.cross_entropy(lm.mlm_logits(h[mask]).float(), ids[mask]).backward()

    def decoder_fb():
        with autocast:
            model.decoder(hidden.detach()).float().sum().backward()

    timings = {name: timeit(fn, device, iters) for name, fn in
               [("encoder_fwd_bwd", encoder_fb), ("quantizer", quantize), ("lm_fwd_bwd_input", lm_fb),
                ("mlm_head_fwd_bwd", mlm_fb), ("decoder_fwd_bwd", decoder_fb)]}
    model.zero_grad(set_to_none=True)
    log(results, out, what="stage_times_ms", batch=images.shape[0], **{k: v * 1e3 for k, v in timings.items()})


def memory_scaling(model, optimizer, size, autocast, device, results, out, tiny):
    """Peak memory at two batch sizes -> memory per image and the largest batch that fits."""
    if device.type != "cuda":
        return
    peaks = {}
    for b in (64, 128):
        images = torch.rand(b, 3, size, size, device=device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        make_step(model, optimizer, images, autocast)()
        torch.cuda.synchronize()
        peaks[b] = torch.cuda.max_memory_allocated()
    per_image = (peaks[128] - peaks[64]) / 64
    fixed = peaks[64] - 64 * per_image
    total = torch.cuda.get_device_properties(device).total_memory
    log(results, out, what="memory", per_image_mib=per_image / 2**20, fixed_gib=fixed / 2**30,
        largest_batch_estimate=int((0.95 * total - fixed) / per_image), total_gib=total / 2**30)


def encode_ids_and_embeddings(model, size, autocast, device, args, results, out, encode_flops, peak, compiled):
    model.eval()
    batch = 8 if args.tiny else args.encode_batch
    images = torch.rand(batch, 3, size, size, device=device)
    layers = [f"lm.{model.language_model.num_layers}"]
    with torch.inference_mode():
        def enc():
            with autocast:
                model.encode(images)

        def emb():
            with autocast:
                model.features(images, layers)
        t = timeit(enc, device, args.iters)
        log(results, out, what="encode", compiled=compiled, batch=batch, images_per_s=batch / t,
            mfu=batch / t * encode_flops / peak)
        t = timeit(emb, device, args.iters)
        log(results, out, what="embeddings", compiled=compiled, batch=batch, images_per_s=batch / t)
    model.train()


def quantizer_agreement(model, size, device, results, out, tiny):
    """Fraction of tokens where the bf16+rescore search equals the exact float32 search."""
    model.eval()
    images = torch.rand(16 if tiny else 256, 3, size, size, device=device)
    with torch.inference_mode():
        z = model.encoder(images).float()
        quant = model.quantizer
        flat = F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)
        exact = quant._nearest_exact(flat)
        fast = quant._nearest_rescored(flat) if device.type == "cuda" else exact
    log(results, out, what="agreement", tokens=int(exact.numel()), equal_fraction=float((exact == fast).float().mean()))
    model.train()


if __name__ == "__main__":
    main()

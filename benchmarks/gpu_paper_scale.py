"""LQAE at the paper's scale on one GPU: training and encoding throughput, plain against optimised.

The one prepared device command of issue 22. Paper configuration: 256x256 RGB, patch 16 (256 tokens),
ViT-B encoder and decoder, a frozen RoBERTa-base-shaped LM (50,265 x 768 codebook; random weights, which
do not change the work), batch 256, bf16 autocast, LM weights in bf16.

Three parts, each one call of at most ~9 minutes (``--time-limit-s``, default 510: a measurement that
would not fit is recorded as skipped), all writing into ``docs/results/gpu_paper_scale_<card>.json``
(a part run again replaces its own records; each part measures the bf16 matmul rate again, so every
MFU is against a rate measured in the same run)::

    python benchmarks/gpu_paper_scale.py --part train      # standard ViT block, est. 5 min
    python benchmarks/gpu_paper_scale.py --part official   # the official LQAE block, est. 5 min
    python benchmarks/gpu_paper_scale.py --part encode     # encoding, est. 4 min (estimates from the 2026-11-28 compile times)

- ``train`` (standard block): FLOPs per image; the *plain* step (eager; the MLM logits of the masked
  rows materialised in float32; AdamW with torch's defaults) and the plain step with each module
  ``torch.compile``d (the earlier best, 665 img/s on an H200); the *optimised* step (what
  ``lqae-train --compile`` runs: :class:`~lqae_sklearn.training._step.TrainStep` compiled as one
  graph with ``fullgraph=True``, chunked MLM term, fused AdamW, mask drawn outside the graph, token
  counts by ``index_add_``); the two steps' losses and gradients on the same first batch; host syncs
  in steady state (``torch.cuda.set_sync_debug_mode("error")`` around 3 optimised steps); peak
  memory; where the eager step's time goes, stage by stage.
- ``official``: the same for the official block (NormFormer LN, gated FFN with a depthwise 3x3
  conv), FLOPs with the depthwise convolution counted as grouped, and its MFU. Batch 256 on a card
  of at least 120 GiB, else 128 (the eager step held 131 GiB at 256 on an H200).
- ``encode``: images -> ids (encoder + nearest-row search) eager and compiled as one graph, batch
  1024; the compiled ids against the eager ones, and the search's ids against an exact float32
  cosine argmax over the LM's codebook; embeddings (encoder + search + LM) eager and compiled.

A step that runs out of memory at its batch is measured again at half the batch (recorded).
Targets (issue 22): training >= 1,100 img/s with the standard block, encoding >= 6,000 img/s.

``--smoke`` runs every part on a toy configuration (CPU-friendly) and writes nothing unless
``--out`` is given: the check that the script runs end to end::

    python benchmarks/gpu_paper_scale.py --smoke --out /tmp/gpu_paper_scale_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lqae_sklearn import LQAE, FrozenLanguageModel, preset_config
from lqae_sklearn.training._accounting import count_flops
from lqae_sklearn.training._step import TrainStep, make_optimizer

PARTS = ("train", "official", "encode")
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
# Seconds a measurement is expected to take at the paper's scale (compiles dominate), to skip what would not fit.
NEEDS = {"eager_step": 30, "stages": 30, "compile_step": 200, "compile_encode": 120}


class Results:
    """Records printed as JSON lines and kept in the card's file, replacing this part's earlier records."""

    def __init__(self, path: Path | None, part: str):
        self.path, self.part = path, part
        self.records = []
        if path is not None and path.exists():
            self.records = [r for r in json.loads(path.read_text()) if r.get("part") != part]

    def add(self, **record):
        record = {"part": self.part, **record}
        self.records.append(record)
        print(json.dumps(record), flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.records, indent=1) + "\n")
            tmp.replace(self.path)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def allows(self, what: str, results: Results, smoke: bool) -> bool:
        left = self.end - time.monotonic()
        if smoke or left >= NEEDS[what]:
            return True
        results.add(what="skipped", measurement=what, seconds_left=round(left), needs_s=NEEDS[what])
        return False


def card_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200"."""
    model = re.search(r"\b([A-Za-z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return (model.group(1) if model else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, iters: int, warmup: int = 2) -> float:
    """Median seconds per call (CUDA events on a GPU)."""
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


def build(block: str, smoke: bool, device) -> LQAE:
    """The model, seeded: two builds of a block have the same weights."""
    from transformers import RobertaConfig

    torch.manual_seed(0)
    if smoke:
        config = preset_config("paper", image_size=32, patch_size=8, encoder_dim=64, encoder_depth=2, encoder_heads=2,
                               decoder_dim=64, decoder_depth=2, decoder_heads=2, block=block)
        hf = RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128)
    else:
        config = preset_config("paper", block=block)
        hf = RobertaConfig()  # roberta-base's shape: 50,265 x 768, 12 layers
    lm = FrozenLanguageModel.from_hf_config(hf, name="random-roberta-base")
    model = LQAE(config, lm).to(device).train()
    if device.type == "cuda":
        model.language_model.to(torch.bfloat16)  # frozen: no float32 copy needed (as lqae-train does)
    return model


def release():
    """Free what the caller has dropped: compiled graphs, cached CUDA blocks."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_loss_terms(model: LQAE, images: torch.Tensor, mask: torch.Tensor):
    """The step as first written: LQAE's forward with the masked rows' MLM logits materialised in float32."""
    c, lm = model.config, model.language_model
    z = model.encoder(images)
    q, ids, codebook_loss, commitment = model.quantizer(z, lm.codebook, c.normalize_latents)
    q = torch.where(mask.unsqueeze(-1), lm.codebook[lm.mask_token_id].to(q.dtype), q)
    hidden = lm(q)
    recon = F.mse_loss(model.decoder(hidden).float(), images.float())
    mlm = F.cross_entropy(lm.mlm_logits(hidden[mask]).float(), ids[mask])
    total = recon + codebook_loss + c.commitment_weight * commitment + c.mlm_weight * mlm
    return torch.stack([total, recon, commitment, mlm]), ids


def plain_step(model, images, mask, autocast):
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=5e-4)

    def step():
        with autocast:
            terms, _ = plain_loss_terms(model, images, mask)
        terms[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def optimised_step(model, batch, device, bf16, compile_mode, compile: bool = True, fullgraph: bool = True):
    """lqae-train's step (training/_trainer.py ``_step``) without data loading and crops."""
    optimizer = make_optimizer(model.trainable_parameters(), 1e-4, (0.9, 0.95), 5e-4, device)
    train_step = TrainStep(model, device.type, bf16=bf16, compile=compile, compile_mode=compile_mode,
                           fullgraph=fullgraph)
    generator = torch.Generator(device=device).manual_seed(0)
    sums = torch.zeros(4, device=device)
    counts = torch.zeros(model.quantizer.vocab_size, dtype=torch.int64, device=device)

    def step(images):
        mask = model.draw_mask(batch, generator)
        terms, ids = train_step(images, mask)
        sums.add_(terms)
        counts.index_add_(0, ids.flatten(), torch.ones_like(ids.flatten()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, train_step


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def with_smaller_batch_on_oom(measure, batch: int, results: Results, what: str):
    """``measure(batch)``; on a CUDA out-of-memory error, again at half the batch (once)."""
    try:
        return measure(batch)
    except torch.cuda.OutOfMemoryError as exc:
        results.add(what="out_of_memory", measurement=what, batch=batch, error=str(exc)[:200])
    release()  # out of the except clause: its traceback no longer holds the failed call's tensors
    return measure(batch // 2)


def train_flops(model, size, device, bf16) -> float:
    """FLOPs per image of a training step as the model defines it (eager: MLM logits at the masked rows only)."""
    images = torch.rand(2, 3, size, size, device=device)
    mask = model.draw_mask(2, torch.Generator(device=device).manual_seed(0))

    def fb():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images, mask=mask)
        out.loss.backward()
    flops = count_flops(fb)
    model.zero_grad(set_to_none=True)
    return flops / 2


def encode_flops(model, size, device, bf16) -> float:
    images = torch.rand(2, 3, size, size, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return count_flops(lambda: model.encode(images)) / 2


# -- parts ------------------------------------------------------------------------------------------
def part_train(args, ctx, results: Results, deadline: Deadline, block: str = "vit"):
    device, bf16, size, peak = ctx["device"], ctx["bf16"], ctx["size"], ctx["peak"]
    batch = ctx["batch"] if block == "vit" else ctx["official_batch"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    model = build(block, args.smoke, device)
    flops = train_flops(model, size, device, bf16)
    results.add(what="flops", block=block, train_gflop_per_image=flops / 1e9,
                trainable_params=sum(p.numel() for p in model.trainable_parameters()),
                note="matmuls, convolutions (grouped counted as grouped) and attention; forward + backward; "
                     "MLM logits at the masked rows only")

    # Plain, eager; its losses and two gradients on the first batch are the reference for the optimised step.
    g = torch.Generator(device=device).manual_seed(1)
    images0 = torch.rand(batch, 3, size, size, device=device, generator=g)
    mask0 = model.draw_mask(batch, torch.Generator(device=device).manual_seed(2))
    reference = None

    def measure_plain(b):
        nonlocal reference
        images, mask = images0[:b], mask0[:b]
        if reference is None or reference[0] != b:
            with autocast:
                terms, _ = plain_loss_terms(model, images, mask)
            terms[0].backward()
            reference = (b, terms.detach().float().cpu(), probe_grads(model))
            model.zero_grad(set_to_none=True)
        reset_peak(device)
        seconds = timeit(plain_step(model, images, mask, autocast), device, args.iters)
        results.add(what="train", block=block, step="plain", compiled=False, batch=b, images_per_s=b / seconds,
                    mfu=b / seconds * flops / peak, peak_memory_gib=peak_gib(device))
        return b

    if deadline.allows("eager_step", results, args.smoke):
        batch = with_smaller_batch_on_oom(measure_plain, batch, results, "plain eager step")
    if block == "vit" and deadline.allows("stages", results, args.smoke):
        stage_times(model, images0[:batch], mask0[:batch], autocast, device, args.iters, results)
    step = None
    if block == "vit" and not args.no_compile and deadline.allows("compile_step", results, args.smoke):
        try:
            for part in (model.encoder, model.decoder, model.language_model):
                part.compile()  # the earlier trainer's compile: module by module, in place
            step = plain_step(model, images0[:batch], mask0[:batch], autocast)
            start = time.perf_counter()
            step()
            synchronize(device)
            compile_s = time.perf_counter() - start
            seconds = timeit(step, device, args.iters)
            results.add(what="train", block=block, step="plain", compiled="per module", batch=batch,
                        images_per_s=batch / seconds, mfu=batch / seconds * flops / peak, compile_s=compile_s)
        except Exception as exc:  # keep the other figures if this stack cannot compile it
            results.add(what="compile_failed", step="plain per module", error=repr(exc)[:500])
    model = step = None  # drop the plain model before the optimised one is built
    release()

    if not deadline.allows("compile_step", results, args.smoke):
        return

    def measure_optimised(b):
        model = build(block, args.smoke, device)  # the same initial weights as the plain step's model
        compile = not args.no_compile
        step, train_step = optimised_step(model, b, device, bf16, args.compile_mode, compile=compile)
        images, mask = images0[:b], mask0[:b]
        start = time.perf_counter()
        fullgraph = True
        try:
            terms, _ = train_step(images, mask)  # compiles the forward and backward graphs
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as exc:
            # A graph break (e.g. in a search changed since the CPU tests): record it, measure the split graph.
            results.add(what="graph_break", step="optimised", block=block, error=repr(exc)[:500])
            fullgraph = False
        if not fullgraph:
            model.zero_grad(set_to_none=True)
            torch._dynamo.reset()
            step, train_step = optimised_step(model, b, device, bf16, args.compile_mode, compile, fullgraph=False)
            terms, _ = train_step(images, mask)
        synchronize(device)
        compile_s = time.perf_counter() - start
        if reference is not None and reference[0] == b:
            compare_with_plain(results, block, reference, terms.float().cpu(), probe_grads(model))
        model.zero_grad(set_to_none=True)
        reset_peak(device)
        seconds = timeit(lambda: step(images), device, args.iters)
        results.add(what="train", block=block, step="optimised", compiled=compile, compile_mode=args.compile_mode,
                    fullgraph=fullgraph, batch=b, images_per_s=b / seconds, mfu=b / seconds * flops / peak,
                    compile_s=compile_s, peak_memory_gib=peak_gib(device))
        if block == "vit":
            sync_check(lambda: step(images), device, results)

    try:
        with_smaller_batch_on_oom(measure_optimised, ctx["batch"] if block == "vit" else ctx["official_batch"],
                                  results, "optimised step")
    except Exception as exc:
        results.add(what="compile_failed", step="optimised", block=block, error=repr(exc)[:500])
    release()


def probe_grads(model) -> dict:
    """Two gradients to compare across steps: the first and the last trained layer."""
    return {name: model.get_parameter(name).grad.float().cpu()
            for name in ("encoder.patch_embed.weight", "decoder.to_pixels.weight")}


def compare_with_plain(results, block, reference, terms, grads):
    _, ref_terms, ref_grads = reference
    results.add(
        what="agreement_with_plain", block=block, names=["loss", "reconstruction", "commitment", "mlm"],
        relative_difference=((terms - ref_terms).abs() / ref_terms.abs().clamp(min=1e-12)).tolist(),
        gradient_difference_over_max={name: float((grads[name] - g).abs().max() / g.abs().max().clamp(min=1e-30))
                                      for name, g in ref_grads.items()},
        note="first batch, same weights and mask; bf16 rounds differently in the fused and unfused graphs")


def sync_check(step, device, results):
    """Steady-state optimised steps with CUDA's sync debug mode at "error": any host sync raises."""
    if device.type != "cuda":
        results.add(what="host_syncs", result="not checked (no CUDA)")
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
        result = "none in 3 steady-state steps"
    except RuntimeError as exc:
        result = f"sync: {str(exc)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    results.add(what="host_syncs", result=result)


def stage_times(model, images, mask, autocast, device, iters, results):
    """Each stage of the eager step timed alone (forward + backward where it trains)."""
    lm = model.language_model
    with torch.no_grad(), autocast:
        z = model.encoder(images)
        ids = model.quantizer.nearest(z)
        q = F.embedding(ids, lm.codebook)
        hidden = lm(q)
    count = mask.sum().clamp(min=1)

    def encoder_fb():
        with autocast:
            model.encoder(images).float().sum().backward()

    def lm_fb():
        x = q.detach().requires_grad_()
        with autocast:
            lm(x).float().sum().backward()

    def mlm_plain_fb():
        h = hidden.detach().requires_grad_()
        with autocast:
            F.cross_entropy(lm.mlm_logits(h[mask]).float(), ids[mask]).backward()

    def mlm_chunked_fb():
        h = hidden.detach().requires_grad_()
        with autocast:
            rows = h[mask]
            lm.mlm_loss(rows, ids[mask], (1.0 / count).expand(rows.shape[0])).backward()

    def mlm_chunked_all_rows_fb():  # the compiled step's form: every row, weighted by the mask
        h = hidden.detach().requires_grad_()
        with autocast:
            lm.mlm_loss(h.flatten(0, 1), ids.flatten(), mask.flatten().float() / count).backward()

    def decoder_fb():
        with autocast:
            model.decoder(hidden.detach()).float().sum().backward()

    stages = [("encoder_fwd_bwd", encoder_fb), ("search", lambda: model.quantizer.nearest(z)),
              ("lm_fwd_bwd_input", lm_fb), ("mlm_plain_fwd_bwd", mlm_plain_fb),
              ("mlm_chunked_masked_rows_fwd_bwd", mlm_chunked_fb), ("mlm_chunked_all_rows_fwd_bwd", mlm_chunked_all_rows_fb),
              ("decoder_fwd_bwd", decoder_fb)]
    timings = {name: timeit(fn, device, iters) * 1e3 for name, fn in stages}
    model.zero_grad(set_to_none=True)
    results.add(what="stage_times_ms", batch=images.shape[0], **timings)


def part_encode(args, ctx, results: Results, deadline: Deadline):
    device, bf16, size, peak = ctx["device"], ctx["bf16"], ctx["size"], ctx["peak"]
    model = build("vit", args.smoke, device).eval()
    flops = encode_flops(model, size, device, bf16)
    results.add(what="flops", block="vit", encode_gflop_per_image=flops / 1e9)
    batch = ctx["encode_batch"]
    images = torch.rand(batch, 3, size, size, device=device, generator=torch.Generator(device=device).manual_seed(3))
    layers = [f"lm.{model.language_model.num_layers}"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def run(encode, features):
        with torch.inference_mode(), autocast:
            seconds = timeit(lambda: encode(images), device, args.iters)
            ids = encode(images)
            emb_seconds = timeit(lambda: features(images, layers), device, args.iters)
        return seconds, ids, emb_seconds

    eager_s, eager_ids, eager_emb_s = run(model.encode, model.features)
    results.add(what="encode", compiled=False, batch=batch, images_per_s=batch / eager_s, mfu=batch / eager_s * flops / peak)
    results.add(what="embeddings", compiled=False, batch=batch, images_per_s=batch / eager_emb_s)
    results.add(what="search_equal_exact_float32", **search_agreement(model, images))
    if args.no_compile or not deadline.allows("compile_encode", results, args.smoke):
        return
    try:
        encode = torch.compile(model.encode, fullgraph=True, mode=args.encode_compile_mode)
        features = torch.compile(model.features, mode=args.encode_compile_mode)
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            try:
                encode(images)
            except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as exc:
                results.add(what="graph_break", step="encode", error=repr(exc)[:500])
                torch._dynamo.reset()
                encode = torch.compile(model.encode, mode=args.encode_compile_mode)
                encode(images)
            features(images, layers)
        synchronize(device)
        compile_s = time.perf_counter() - start
        seconds, ids, emb_seconds = run(encode, features)
        results.add(what="encode", compiled=True, compile_mode=args.encode_compile_mode, batch=batch,
                    images_per_s=batch / seconds, mfu=batch / seconds * flops / peak, compile_s=compile_s)
        results.add(what="embeddings", compiled=True, compile_mode=args.encode_compile_mode, batch=batch,
                    images_per_s=batch / emb_seconds)
        results.add(what="ids_compiled_equal_eager", fraction=float((ids == eager_ids).float().mean()))
    except Exception as exc:
        results.add(what="compile_failed", step="encode", error=repr(exc)[:500])


@torch.no_grad()
def search_agreement(model, images) -> dict:
    """Fraction of the search's ids (``quantizer.nearest``) equal to a float32 cosine argmax over every
    allowed row of the LM's codebook, on the encoder outputs of the first 64 images."""
    lm = model.language_model
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16,
                                                enabled=images.device.type == "cuda"):
        z = model.encoder(images[:64])
        ids = model.quantizer.nearest(z)
    flat = F.normalize(z.float().reshape(-1, z.shape[-1]), dim=-1)
    codebook = F.normalize(lm.codebook.float(), dim=-1)
    excluded = torch.tensor(lm.excluded_token_ids(), device=flat.device, dtype=torch.long)
    best = []
    for part in flat.split(4096):
        scores = part @ codebook.T
        scores[:, excluded] = -torch.inf
        best.append(scores.argmax(dim=1))
    exact = torch.cat(best).view(ids.shape)
    return {"tokens": exact.numel(), "fraction": float((exact == ids).float().mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=PARTS, action="append", help="what to measure (repeatable; --smoke: all)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, every part, to check the script on a CPU")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--official-batch", type=int, default=None, help="default: 256 on >= 120 GiB cards, else 128")
    parser.add_argument("--encode-batch", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the optimised training step")
    parser.add_argument("--encode-compile-mode", default=None, help="torch.compile mode of encoding")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--time-limit-s", type=float, default=510)
    parser.add_argument("--out", default=None, help="default: docs/results/gpu_paper_scale_<card>.json (none with --smoke)")
    args = parser.parse_args()
    parts = list(PARTS) if args.smoke and not args.part else args.part
    if not parts:
        parser.error("give --part (train, official or encode) or --smoke")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else (None if args.smoke else RESULTS / f"gpu_paper_scale_{card_slug(name)}.json")
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    ctx = {
        "device": device, "bf16": device.type == "cuda", "size": 32 if args.smoke else 256,
        "batch": 4 if args.smoke else args.batch, "encode_batch": 8 if args.smoke else args.encode_batch,
        "official_batch": 4 if args.smoke else args.official_batch or (256 if total_gib >= 120 else 128),
    }
    if args.smoke:
        args.iters = min(args.iters, 2)
    for part in parts:
        deadline = Deadline(args.time_limit_s)
        results = Results(out, part + (f"@{args.compile_mode}" if args.compile_mode and part != "encode" else "")
                          + (f"@{args.encode_compile_mode}" if args.encode_compile_mode and part == "encode" else ""))
        torch.manual_seed(0)
        ctx["peak"] = matmul_rate(device, 256 if args.smoke else 8192)
        results.add(what="matmul_rate", device=name, dtype="bf16" if ctx["bf16"] else "float32",
                    tflops=ctx["peak"] / 1e12, torch=torch.__version__, memory_gib=round(total_gib, 1),
                    smoke=args.smoke, date=time.strftime("%Y-%m-%d"))
        if part == "train":
            part_train(args, ctx, results, deadline, "vit")
        elif part == "official":
            part_train(args, ctx, results, deadline, "lqae")
        else:
            part_encode(args, ctx, results, deadline)
    if out is not None:
        print(f"\nwritten: {out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

"""The training loop: one function, :func:`train`, driven by a :class:`TrainConfig`.

The same code runs on a laptop CPU and under ``torchrun`` on many GPUs
(DistributedDataParallel; gloo on CPU, NCCL on CUDA). All randomness of a step
(data order, crops, masks) is drawn from generators seeded by (seed, step,
micro-batch, rank), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lqae_sklearn._checkpoint import _replace_dir, load_checkpoint, preprocessing_of, save_checkpoint
from lqae_sklearn._config import preset_config
from lqae_sklearn._language_model import FrozenLanguageModel
from lqae_sklearn._model import LQAE

from ._augment import random_resized_crop
from ._data import EpochOrder, iterate_batches, open_training_data
from ._report import MetricsLog, code_statistics, psnr, save_grid
from ._state import has_training_state, load_optimizer, save_optimizer

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    """Everything a training run needs; stored in the checkpoint it writes."""

    out_dir: str = "runs/lqae"
    preset: str = "small-28"
    model_overrides: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_home: str | None = None  # fetch_fashion_mnist's cache folder
    eval_data: str | None = None  # default: the Fashion-MNIST test split when training on Fashion-MNIST
    eval_images: int = 1000
    steps: int = 1000
    batch_size: int = 256  # global: micro-batch x accumulation x processes
    accumulation: int = 1
    lr: float | None = None  # default: the paper's 1.5e-4 x batch / 256
    warmup_steps: int | None = None  # default: 5% of the steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 42
    augment: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    device: str = "auto"
    bf16: bool | None = None  # default: on for CUDA
    compile: bool = False
    save_every: int = 500
    log_every: int = 50
    num_workers: int = 0
    resume: bool = False
    progress: bool = True

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 1.5e-4 * self.batch_size / 256

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def lr_at(self, step: int) -> float:
        """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` x peak."""
        peak, warmup = self.peak_lr, self.warmup
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.steps - warmup))
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# The settings that must not change across a resume, or the run is no longer the same run.
_RESUME_INVARIANTS = ("data", "batch_size", "accumulation", "seed", "augment", "crop_scale", "hflip", "preset")


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_type: str) -> _Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _step_generator(device: torch.device, seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 997 + rank)
    return g


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) an LQAE; returns the checkpoint folder."""
    device_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    ddp = _init_distributed(device_type)
    device = _resolve_device(cfg.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples").mkdir(exist_ok=True)

    # -- model and optimizer -------------------------------------------------------
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    resuming = cfg.resume and has_training_state(ckpt_dir)
    if resuming:
        model = load_checkpoint(ckpt_dir)
        model_config = model.config
    else:
        model_config = preset_config(cfg.preset, **cfg.model_overrides)
        model = LQAE(model_config, FrozenLanguageModel.from_pretrained(model_config.language_model))
    model.to(device).train()
    if device.type == "cuda" and use_bf16:
        model.language_model.to(torch.bfloat16)  # frozen: no fp32 master copy needed
    optimizer = torch.optim.AdamW(
        model.trainable_parameters(), lr=cfg.peak_lr, betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay, fused=device.type == "cuda",
    )
    start_step = 0
    if resuming:
        saved = load_optimizer(optimizer, ckpt_dir)
        for key in _RESUME_INVARIANTS:
            if _jsonable(getattr(cfg, key)) != saved["config"].get(key):
                raise ValueError(
                    f"cannot resume {ckpt_dir}: {key} was {saved['config'].get(key)!r}, now {getattr(cfg, key)!r}"
                )
        start_step = saved["step"]
    if cfg.compile:
        for part in (model.encoder, model.decoder, model.language_model):
            part.compile()  # in place: parameter names (and checkpoints) stay unchanged
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # buffers are constants derived from the frozen LM
        )

    # -- data ------------------------------------------------------------------------
    preprocessing = preprocessing_of(model_config)
    data = open_training_data(cfg.data, preprocessing, cfg.data_home)
    if cfg.batch_size % (ddp.world * cfg.accumulation):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by processes x accumulation ({ddp.world} x {cfg.accumulation})")
    order = EpochOrder(len(data), cfg.batch_size, ddp.world, cfg.accumulation, cfg.seed)
    eval_source = cfg.eval_data or ("fashion-mnist:test" if cfg.data.startswith("fashion-mnist") else None)
    eval_images = None
    if eval_source and ddp.main:
        eval_set = open_training_data(eval_source, preprocessing, cfg.data_home)
        n = min(cfg.eval_images, len(eval_set))
        eval_images = torch.stack([eval_set[i] for i in range(n)])

    # -- loop --------------------------------------------------------------------------
    log = MetricsLog(out_dir / "metrics.jsonl", start_step if resuming else None) if ddp.main else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    batches = iterate_batches(data, order, ddp.rank, start_step, cfg.steps, cfg.num_workers)
    sums = torch.zeros(4, device=device)  # loss, reconstruction, commitment, mlm
    counts = torch.zeros(model.language_model.vocab_size, device=device)
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (ddp.main and cfg.progress), unit="step")
    last_eval: dict = {}
    for step in range(start_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        for micro in range(cfg.accumulation):
            images = next(batches).to(device, non_blocking=True).float().div_(255)
            g = _step_generator(device, cfg.seed, step, micro, ddp.rank)
            if cfg.augment:
                images = random_resized_crop(images, g, tuple(cfg.crop_scale), hflip=cfg.hflip)
            sync = micro == cfg.accumulation - 1 or ddp.world == 1
            with autocast, (contextlib.nullcontext() if sync else net.no_sync()):
                out = net(images, generator=g)
                (out.loss / cfg.accumulation).backward()
            with torch.no_grad():
                sums += torch.stack([out.loss, out.reconstruction_loss, out.commitment_loss, out.mlm_loss]).float() / cfg.accumulation
                counts += torch.bincount(out.ids.flatten(), minlength=counts.numel())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_steps += 1
        done = step + 1
        bar.update(1)

        if done % cfg.log_every == 0 or done == cfg.steps:
            if ddp.world > 1:
                dist.all_reduce(sums)
                dist.all_reduce(counts)
                sums /= ddp.world
            elapsed = time.perf_counter() - window_start
            loss, recon, commit, mlm = (float(v) / window_steps for v in sums)
            record = {
                "step": done, "epoch": done / order.steps_per_epoch, "lr": cfg.lr_at(step),
                "loss": loss, "reconstruction_loss": recon, "commitment_loss": commit, "mlm_loss": mlm,
                "psnr": psnr(recon), **code_statistics(counts, model.quantizer.codebook_size),
                "images_per_s": window_steps * cfg.batch_size / elapsed,
            }
            if ddp.main:
                log.write(record)
                bar.set_postfix(loss=f"{loss:.4f}", psnr=f"{record['psnr']:.2f}")
            sums.zero_()
            counts.zero_()
            window_start, window_steps = time.perf_counter(), 0

        if done % cfg.save_every == 0 or done == cfg.steps:
            if ddp.main:
                if eval_images is not None:
                    last_eval = evaluate(model, eval_images, device, autocast, cfg.batch_size)
                    samples = last_eval.pop("samples")
                    save_grid(eval_images[: len(samples)].float() / 255, samples, out_dir / "samples" / f"step_{done:07d}.png")
                    log.write({"step": done, **{f"eval_{k}": v for k, v in last_eval.items()}})
                _save(model, optimizer, cfg, ddp, data.description, done, last_eval, ckpt_dir)
            if ddp.world > 1:
                dist.barrier()
            window_start = time.perf_counter()  # keep checkpoint time out of images/s
    bar.close()
    return ckpt_dir


@torch.no_grad()
def evaluate(model: LQAE, images: torch.Tensor, device, autocast, batch_size: int) -> dict:
    """Reconstruction PSNR and code statistics with no masking (as at inference)."""
    model.eval()
    squared_error, pixels = 0.0, 0
    counts = torch.zeros(model.language_model.vocab_size, device=device)
    samples: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float() / 255
        with autocast:
            out = model(x, mask_ratio=0.0)
        recon = out.reconstruction.float().clamp(0, 1)
        squared_error += float(((recon - x) ** 2).sum())
        pixels += x.numel()
        counts += torch.bincount(out.ids.flatten(), minlength=counts.numel())
        if len(samples) < 16:
            samples.extend(recon[: 16 - len(samples)].cpu())
    model.train()
    stats = code_statistics(counts, model.quantizer.codebook_size)
    return {"psnr": psnr(squared_error / pixels), **stats, "samples": torch.stack(samples)}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _save(model, optimizer, cfg, ddp, data_description, step, eval_metrics, ckpt_dir: Path) -> None:
    """Model checkpoint + optimizer state in one folder, swapped in atomically."""
    config = {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()}
    training = {"data": data_description, "steps": step, "world_size": ddp.world, "config": config}
    metrics = {f"eval_{k}": v for k, v in eval_metrics.items()}
    tmp_parent = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=ckpt_dir.parent))
    try:
        folder = save_checkpoint(model, tmp_parent / CHECKPOINT_DIR, training=training, metrics=metrics)
        save_optimizer(optimizer, folder, {"step": step, "config": config})
        _replace_dir(folder, ckpt_dir)
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)

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

from lqae_sklearn._atomic import replace_dir
from lqae_sklearn._loading import resolve_device
from lqae_sklearn.model import (
    LQAE, VQVAE, LQAEConfig, build_model, load_checkpoint, preprocessing_of, preset_config, read_checkpoint_config,
    save_checkpoint,
)

from ._augment import random_resized_crop
from ._data import EpochOrder, iterate_batches, open_training_data
from ._report import MetricsLog, code_statistics, psnr, save_grid
from ._state import has_training_state, load_optimizer, save_optimizer
from ._step import TrainStep, make_optimizer

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    """Everything a training run needs; stored in the checkpoint it writes.

    Parameters
    ----------
    out_dir : str, default="runs/lqae"
        Run folder: ``checkpoint/``, ``metrics.jsonl``, ``samples/``.
    preset : str, default="small-28"
        Model preset (:data:`~lqae_sklearn.model.PRESETS`); ``"small-28-vqvae"``
        trains the paper's VQ-VAE baseline (:class:`~lqae_sklearn.model.VQVAE`).
    model_overrides : dict, default={}
        :class:`~lqae_sklearn.model.LQAEConfig` fields to change from the preset.
    data : str, default="fashion-mnist"
        Training images: ``"fashion-mnist"``, a ``.npy`` array or a folder
        (:func:`open_training_data`).
    data_home : str or None, default=None
        Cache folder of :func:`~lqae_sklearn.datasets.fetch_fashion_mnist`.
    eval_data : str or None, default=None
        Evaluation images; None is the Fashion-MNIST test split when training on
        Fashion-MNIST, else no evaluation.
    eval_images : int, default=1000
        Evaluation images used at each checkpoint.
    steps : int, default=1000
        Optimizer steps.
    batch_size : int, default=256
        Global batch: micro-batch x accumulation x processes.
    accumulation : int, default=1
        Micro-batches per step.
    lr : float or None, default=None
        Peak learning rate; None is the paper's 1.5e-4 x batch_size / 256.
    warmup_steps : int or None, default=None
        Linear warmup steps; None is 5% of the steps.
    min_lr_ratio : float, default=0.0
        Learning rate at the end of the cosine decay, as a fraction of the peak.
    weight_decay : float, default=5e-4
        AdamW weight decay.
    betas : tuple of float, default=(0.9, 0.95)
        AdamW betas.
    seed : int, default=42
        Seed of the initialisation, data order, crops and masks.
    augment : bool, default=True
        Random resized crops (and flips).
    crop_scale : tuple of float, default=(0.2, 1.0)
        Area range of the crops (:func:`random_resized_crop`).
    hflip : bool, default=True
        Random horizontal flips.
    device : str, default="auto"
        Torch device; ``"auto"`` uses CUDA when present.
    bf16 : bool or None, default=None
        Use bf16 autocast; None turns it on for CUDA.
    compile : bool, default=False
        ``torch.compile`` the training step: the forward pass with its losses as one
        graph, and its backward pass.
    compile_mode : str or None, default=None
        The ``torch.compile`` mode: None (the default mode), ``"reduce-overhead"``
        (CUDA graphs), ``"max-autotune-no-cudagraphs"`` or ``"max-autotune"``.
    save_every : int, default=500
        Steps between checkpoints (and one at the end).
    log_every : int, default=50
        Steps between ``metrics.jsonl`` records.
    num_workers : int, default=0
        Data-loading worker processes.
    resume : bool, default=False
        Continue the run in ``out_dir`` exactly where its checkpoint stopped.
    progress : bool, default=True
        Show a progress bar.

    Examples
    --------
    >>> from lqae_sklearn.training import TrainConfig
    >>> config = TrainConfig(steps=300, batch_size=16)
    >>> config.peak_lr, config.warmup
    (9.375e-06, 15)
    """

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
    compile_mode: str | None = None
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
        """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` x peak.

        Parameters
        ----------
        step : int
            Zero-based optimizer step.

        Returns
        -------
        float
            The learning rate at ``step``.
        """
        peak, warmup = self.peak_lr, self.warmup
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.steps - warmup))
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# The settings that must not change across a resume, or the run is no longer the same run.
# model_overrides, betas and weight_decay come back from the checkpoint and the optimizer state, so a new value
# would be ignored while the next checkpoint recorded it.
_RESUME_INVARIANTS = ("data", "batch_size", "accumulation", "seed", "augment", "crop_scale", "hflip", "preset",
                      "model_overrides", "betas", "weight_decay")


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


def _process_device(name: str, local_rank: int) -> torch.device:
    """``name`` resolved as everywhere in the library; a bare "cuda" means this process's GPU under torchrun."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _step_generator(device: torch.device, seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 997 + rank)
    return g


class ResumeError(ValueError):
    """``--resume`` without a run to resume, or a fresh start over a run that would be lost.

    Examples
    --------
    >>> from lqae_sklearn.training import ResumeError, TrainConfig, train
    >>> try:
    ...     train(TrainConfig(out_dir="runs/none-yet", resume=True))
    ... except ResumeError as error:
    ...     print("nothing to resume")  # doctest: +SKIP
    """


@dataclass
class _Run:
    """Everything a training run holds between steps."""

    cfg: TrainConfig
    ddp: _Dist
    device: torch.device
    model: LQAE | VQVAE
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    step: TrainStep  # forward + backward of a micro-batch, eager or compiled
    optimizer: torch.optim.Optimizer
    data: object
    order: EpochOrder
    batches: object  # iterator of micro-batches from start_step on
    start_step: int
    eval_images: torch.Tensor | None
    eval_source: str | None  # what eval_images are, recorded next to the figures measured on them
    log: MetricsLog | None
    autocast: object
    out_dir: Path
    ckpt_dir: Path
    sums: torch.Tensor = None  # loss, reconstruction, commitment, mlm over the logging window
    counts: torch.Tensor = None  # token counts over the logging window (int64)
    window_start: float = 0.0
    window_steps: int = 0
    last_eval: dict = field(default_factory=dict)


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) an LQAE or a VQVAE (``codebook="learned"``); returns the checkpoint folder.

    Parameters
    ----------
    cfg : TrainConfig
        Every setting of the run (data, model, optimisation, output folder).

    Returns
    -------
    pathlib.Path
        The run's ``checkpoint/`` folder, loadable by
        ``LQAETokenizer(checkpoint=...)``.

    Examples
    --------
    >>> from lqae_sklearn import LQAETokenizer
    >>> from lqae_sklearn.training import TrainConfig, train
    >>> config = TrainConfig(data="examples/fashion-mnist", out_dir="runs/tiny", steps=30, batch_size=8,
    ...                      lr=2e-3, model_overrides={"patch_size": 7, "encoder_depth": 1, "decoder_depth": 1})
    >>> checkpoint = train(config)  # doctest: +SKIP
    >>> LQAETokenizer(checkpoint=checkpoint).fit().n_tokens_  # doctest: +SKIP
    16
    """
    run = _setup(cfg)
    bar = tqdm(total=cfg.steps, initial=run.start_step, disable=not (run.ddp.main and cfg.progress), unit="step")
    for step in range(run.start_step, cfg.steps):
        _step(run, step)
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = _log(run, step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.2f}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            _checkpoint(run, done)
    bar.close()
    return run.ckpt_dir


def _setup(cfg: TrainConfig) -> _Run:
    """Devices and processes, the model (fresh or resumed), the optimizer, the data and the metrics log."""
    ddp = _init_distributed(resolve_device(cfg.device).type)
    device = _process_device(cfg.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    _check_resume(cfg, out_dir, ckpt_dir)
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples").mkdir(exist_ok=True)

    if cfg.resume:
        model_config = LQAEConfig.from_dict(read_checkpoint_config(ckpt_dir)["model"])
    else:
        model_config = preset_config(cfg.preset, **cfg.model_overrides)
    # The data before the model: data that cannot be had is reported before a language model is loaded.
    preprocessing = preprocessing_of(model_config)
    data = open_training_data(cfg.data, preprocessing, cfg.data_home)
    if cfg.batch_size % (ddp.world * cfg.accumulation):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by processes x accumulation ({ddp.world} x {cfg.accumulation})")
    order = EpochOrder(len(data), cfg.batch_size, ddp.world, cfg.accumulation, cfg.seed)
    eval_source = cfg.eval_data or ("fashion-mnist:test" if cfg.data.startswith("fashion-mnist") else None)
    eval_images = None
    if eval_source and ddp.main:
        eval_set = open_training_data(eval_source, preprocessing, cfg.data_home)
        eval_images = torch.stack([eval_set[i] for i in range(min(cfg.eval_images, len(eval_set)))])

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    # An LQAE loads its LM, a VQVAE none.
    model = load_checkpoint(ckpt_dir) if cfg.resume else build_model(model_config)
    model.to(device).train()
    if device.type == "cuda" and use_bf16 and model.language_model is not None:
        model.language_model.to(torch.bfloat16)  # frozen: no fp32 master copy needed
    optimizer = make_optimizer(model.trainable_parameters(), cfg.peak_lr, cfg.betas, cfg.weight_decay, device)
    start_step = 0
    if cfg.resume:
        saved = load_optimizer(optimizer, ckpt_dir)
        for key in _RESUME_INVARIANTS:
            if _jsonable(getattr(cfg, key)) != saved["config"].get(key):
                raise ResumeError(
                    f"cannot resume {ckpt_dir}: {key} was {saved['config'].get(key)!r}, now {getattr(cfg, key)!r}"
                )
        start_step = saved["step"]
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # buffers are constants derived from the frozen LM (a VQVAE has none)
        )
    # The compiled step wraps a function, not the model: parameter names (and checkpoints) stay unchanged.
    step = TrainStep(net, device.type, bf16=use_bf16, compile=cfg.compile, compile_mode=cfg.compile_mode)

    # A resumed log keeps the records up to the checkpoint's step; the run replays the rest exactly.
    log = MetricsLog(out_dir / "metrics.jsonl", start_step if cfg.resume else None) if ddp.main else None
    return _Run(
        cfg=cfg, ddp=ddp, device=device, model=model, net=net, step=step, optimizer=optimizer, data=data, order=order,
        batches=iterate_batches(data, order, ddp.rank, start_step, cfg.steps, cfg.num_workers),
        start_step=start_step, eval_images=eval_images, eval_source=eval_source, log=log,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext(),
        out_dir=out_dir, ckpt_dir=ckpt_dir, sums=torch.zeros(4, device=device),
        counts=torch.zeros(model.quantizer.vocab_size, dtype=torch.int64, device=device),
        window_start=time.perf_counter(),
    )


def _check_resume(cfg: TrainConfig, out_dir: Path, ckpt_dir: Path) -> None:
    """``resume`` needs a run to continue; a fresh start must not overwrite one."""
    if cfg.resume and not has_training_state(ckpt_dir):
        raise ResumeError(
            f"nothing to resume in {out_dir}: {ckpt_dir} holds no checkpoint with training state; run without "
            f"--resume to start a new run there"
        )
    if not cfg.resume and has_training_state(ckpt_dir):
        # (A run that died before its first checkpoint left nothing to resume: starting again is allowed.)
        raise ResumeError(
            f"{out_dir} already holds a training run ({ckpt_dir}); pass --resume to continue it, or choose "
            f"another --out: a new run would overwrite it and its metrics.jsonl"
        )


def _step(run: _Run, step: int) -> None:
    """One optimizer step over ``accumulation`` micro-batches, adding its losses and tokens to the window.

    Nothing here reads a device value on the host (``_log`` does, every ``log_every`` steps).
    """
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr_at(step)
    for micro in range(cfg.accumulation):
        images = next(run.batches).to(run.device, non_blocking=True).float().div_(255)
        g = _step_generator(run.device, cfg.seed, step, micro, run.ddp.rank)
        if cfg.augment:
            images = random_resized_crop(images, g, tuple(cfg.crop_scale), hflip=cfg.hflip)
        mask = run.model.draw_mask(images.shape[0], g)  # drawn after the crops, as the forward pass once did
        sync = micro == cfg.accumulation - 1 or run.ddp.world == 1
        with contextlib.nullcontext() if sync else run.net.no_sync():
            terms, ids = run.step(images, mask, cfg.accumulation, generator=g)
        with torch.no_grad():
            run.sums += terms / cfg.accumulation
            # index_add_ rather than bincount, which reads the largest id on the host (a sync on CUDA).
            run.counts.index_add_(0, ids.flatten(), torch.ones_like(ids.flatten()))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.window_steps += 1


def _log(run: _Run, step: int) -> dict:
    """Average the window over steps (and processes), append it to the metrics log, start a new window."""
    cfg, done = run.cfg, step + 1
    if run.ddp.world > 1:
        dist.all_reduce(run.sums)
        dist.all_reduce(run.counts)
        run.sums /= run.ddp.world
    elapsed = time.perf_counter() - run.window_start
    loss, recon, commit, mlm = (float(v) / run.window_steps for v in run.sums)
    record = {
        "step": done, "epoch": done / run.order.steps_per_epoch, "lr": cfg.lr_at(step),
        "loss": loss, "reconstruction_loss": recon, "commitment_loss": commit, "mlm_loss": mlm,
        "psnr": psnr(recon), **code_statistics(run.counts, run.model.quantizer.codebook_size),
        "images_per_s": run.window_steps * cfg.batch_size / elapsed,
    }
    if run.ddp.main:
        run.log.write(record)
    run.sums.zero_()
    run.counts.zero_()
    run.window_start, run.window_steps = time.perf_counter(), 0
    return record


def _checkpoint(run: _Run, done: int) -> None:
    """Evaluate on the held-out images, save a sample grid and the checkpoint (main process), then sync."""
    if run.ddp.main:
        if run.eval_images is not None:
            run.last_eval = evaluate(run.model, run.eval_images, run.device, run.autocast, run.cfg.batch_size)
            samples = run.last_eval.pop("samples")
            # Say which images the figures come from (eval_data, eval_images), so test and train figures are not confused.
            run.last_eval = {"data": run.eval_source, "images": len(run.eval_images), **run.last_eval}
            save_grid(run.eval_images[: len(samples)].float() / 255, samples,
                      run.out_dir / "samples" / f"step_{done:07d}.png")
            run.log.write({"step": done, **{f"eval_{k}": v for k, v in run.last_eval.items()}})
        _save(run.model, run.optimizer, run.cfg, run.ddp, run.data.description, done, run.last_eval, run.ckpt_dir)
    if run.ddp.world > 1:
        dist.barrier()
    run.window_start = time.perf_counter()  # keep checkpoint time out of images/s


@torch.no_grad()
def evaluate(model: LQAE | VQVAE, images: torch.Tensor, device, autocast, batch_size: int) -> dict:
    """Reconstruction PSNR and code statistics with no masking (as at inference).

    Parameters
    ----------
    model : LQAE or VQVAE
        The model; put back in training mode afterwards.
    images : torch.Tensor
        Images (N, C, S, S), uint8.
    device : torch.device
        Where the model runs.
    autocast : context manager
        Entered around each forward pass (bf16 autocast on CUDA, a null context
        on the CPU).
    batch_size : int
        Images per forward pass.

    Returns
    -------
    dict
        ``psnr`` (dB), the code statistics (``codebook_usage``: the fraction of
        the quantizer's choosable rows seen, ``perplexity``) and ``samples``, the
        first 16 reconstructions.

    Examples
    --------
    >>> import contextlib, torch
    >>> from lqae_sklearn import LQAE, preset_config
    >>> from lqae_sklearn.training import evaluate
    >>> model = LQAE(preset_config("small-28", patch_size=7, encoder_depth=1, decoder_depth=1))
    >>> images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    >>> sorted(evaluate(model, images, torch.device("cpu"), contextlib.nullcontext(), 4))[:2]  # doctest: +SKIP
    ['codebook_usage', 'perplexity']
    """
    model.eval()
    squared_error, pixels = 0.0, 0
    counts = torch.zeros(model.quantizer.vocab_size, device=device)  # LM vocabulary ids, or VQVAE code ids
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
        replace_dir(folder, ckpt_dir)
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)

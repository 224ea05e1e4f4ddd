"""``lqae-train``: train a Language Quantized AutoEncoder from the command line."""

from __future__ import annotations

import dataclasses
import os

import click

from lqae_sklearn.model import PRESETS, LQAEConfig, preset_config

from ._data import TrainingDataError
from ._trainer import ResumeError, TrainConfig, train


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", default="fashion-mnist", help="'fashion-mnist' (train split), a folder of images (recursive) or a .npy array (N,H,W[,C]).")
@click.option("--data-home", type=click.Path(file_okay=False), help="Cache folder for --data fashion-mnist (fetch_fashion_mnist's data_home) [default: $SCIKIT_LEARN_DATA or ~/scikit_learn_data].")
@click.option("--out", "out_dir", default="runs/lqae", type=click.Path(file_okay=False), help="Run folder: checkpoint/, metrics.jsonl, samples/.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="small-28", help="Architecture preset.")
@click.option("--language-model", help="Frozen LM (Hugging Face name or path) instead of the preset's.")
@click.option("--image-size", type=int, help="Override the preset's image size.")
@click.option("--patch-size", type=int, help="Override the preset's patch size.")
@click.option(
    "--set", "settings", multiple=True, metavar="KEY=VALUE",
    help="Override any other model field of the preset (repeatable), e.g. --set encoder_dim=128 "
    "--set block=lqae --set normalize_latents=false. Values are converted to the field's type "
    "(int, float, bool: true/false/1/0/yes/no, or text). Fields: " + ", ".join(f.name for f in dataclasses.fields(LQAEConfig)) + ".",
)
@click.option("--steps", default=1000, help="Optimizer steps in total (a resumed run counts the steps already done).")
@click.option("--batch-size", default=256, help="Global batch: per-process micro-batch x --accumulation x processes.")
@click.option("--accumulation", default=1, help="Gradient-accumulation micro-batches per step.")
@click.option("--lr", type=float, help="Peak learning rate [default: 1.5e-4 x batch / 256, as the paper].")
@click.option("--warmup-steps", type=int, help="Linear warmup steps [default: 5% of --steps]; cosine decay after.")
@click.option("--weight-decay", default=5e-4)
@click.option("--seed", default=42)
@click.option("--augment/--no-augment", default=True, help="Random resized crop + horizontal flip (the paper's).")
@click.option("--crop-scale", nargs=2, type=float, default=(0.2, 1.0), help="Area range of the random crop.")
@click.option("--hflip/--no-hflip", default=True)
@click.option("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'.")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast [default: on for CUDA].")
@click.option("--compile/--no-compile", "compile_", default=False, help="torch.compile the encoder, decoder and LM.")
@click.option("--save-every", default=500, help="Write a checkpoint (and a sample grid) every N steps and at the end.")
@click.option("--log-every", default=50, help="Append a metrics record every N steps.")
@click.option("--eval-data", help="Images for reconstruction PSNR at each checkpoint [default: Fashion-MNIST test when training on it].")
@click.option("--eval-images", default=1000)
@click.option("--workers", "num_workers", default=0, help="Image-decoding processes for folder data.")
@click.option(
    "--resume", is_flag=True,
    help="Continue the run in OUT exactly (weights, optimizer, step, data order). Refused when OUT holds no run; "
    "without it, a run over an existing one is refused.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def main(language_model, image_size, patch_size, settings, compile_, no_progress, **options):
    """Train an LQAE: ViT encoder -> frozen LM word embeddings -> frozen LM -> ViT decoder.

    --preset small-28-vqvae (or --set codebook=learned) trains the paper's VQ-VAE
    baseline instead: the same encoder and decoder around a learned codebook, no LM.

    \b
    Single process (CPU or one GPU):
      lqae-train --data fashion-mnist --steps 300 --out runs/fmnist
    Several GPUs or machines (DistributedDataParallel), the same options:
      torchrun --nproc-per-node 8 -m lqae_sklearn.training.cli --data images/ ...

    OUT/checkpoint is a regular lqae-sklearn checkpoint: LQAETokenizer(checkpoint=...) reads it.
    """
    overrides = _parse_settings(settings)
    for key, value in {"language_model": language_model, "image_size": image_size, "patch_size": patch_size}.items():
        if value is not None:
            if key in overrides:
                raise click.BadParameter(f"{key} is given both by --set and by --{key.replace('_', '-')}", param_hint="--set")
            overrides[key] = value
    try:
        preset_config(options["preset"], **overrides)  # a bad combination fails here, not after loading data
    except ValueError as exc:
        raise click.UsageError(f"invalid model settings: {exc}") from None
    cfg = TrainConfig(model_overrides=overrides, compile=compile_, progress=not no_progress, **options)
    try:
        ckpt = train(cfg)
    except ResumeError as exc:
        raise click.UsageError(str(exc)) from None
    except TrainingDataError as exc:  # Fashion-MNIST is not here and cannot be downloaded
        option = "--data" if exc.source == cfg.data else "--eval-data" + ("" if cfg.eval_data else f" (default {exc.source})")
        raise click.BadParameter(str(exc), param_hint=option) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
        click.echo(f"checkpoint: {ckpt}", err=True)


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _parse_settings(settings) -> dict:
    """``("encoder_dim=128", ...)`` -> ``{"encoder_dim": 128}``, typed by the LQAEConfig field's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(LQAEConfig)}
    overrides = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        if key not in defaults:
            raise click.BadParameter(f"unknown model field {key!r}; choose from {', '.join(defaults)}", param_hint="--set")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if text.strip().lower() not in _TRUE | _FALSE:
                    raise ValueError("expected true/false")
                value = text.strip().lower() in _TRUE
            elif isinstance(default, (int, float)):
                value = type(default)(text)
            else:
                value = text
        except ValueError:
            raise click.BadParameter(
                f"{key}={text!r}: expected {type(default).__name__} (the field's type)", param_hint="--set"
            ) from None
        overrides[key] = value
    return overrides


if __name__ == "__main__":
    main()

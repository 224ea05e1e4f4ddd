"""``lqae-info``: what a checkpoint is (preset, language model, image size, training data, metrics)."""

from __future__ import annotations

import json
import os

import click

from lqae_sklearn.model import DEFAULT_CHECKPOINT, CheckpointError, read_checkpoint_config
from lqae_sklearn.model import PRESETS, LQAEConfig

_ARCHITECTURE_FIELDS = (
    "image_size", "in_channels", "patch_size", "encoder_dim", "encoder_depth", "encoder_heads",
    "decoder_dim", "decoder_depth", "decoder_heads", "mlp_ratio", "block", "language_model",
    "codebook", "codebook_size",
)

EPILOG = """\b
Exit status: 0 the checkpoint is readable; 2 it is missing, corrupt, from a
newer lqae-sklearn, or not a checkpoint (the message says which).

\b
Only the JSON config is read (no weights are loaded), so this is instant
even for large checkpoints.
"""


def preset_name(model: dict) -> str | None:
    """The preset whose architecture the checkpoint's config matches, if any.

    The architecture decides; where several presets share it (``small-28-vqvae`` and its
    ``-restarts`` variant), the one whose other settings agree best with the config wins.
    """
    defaults = LQAEConfig().to_dict()

    def agreement(overrides: dict) -> int:
        settings = [f for f in overrides if f not in _ARCHITECTURE_FIELDS]
        return sum(1 if model.get(f, defaults[f]) == overrides[f] else -1 for f in settings)

    matching = [name for name, overrides in PRESETS.items()
                if all(model.get(f, defaults[f]) == {**defaults, **overrides}[f] for f in _ARCHITECTURE_FIELDS)]
    return max(matching, key=lambda name: agreement(PRESETS[name]), default=None)


def summarize(path, config: dict) -> dict:
    """The facts ``lqae-info`` shows, as one JSON-serialisable dict."""
    model = config.get("model", {})
    image_size, patch = model.get("image_size"), model.get("patch_size")
    tokens = (image_size // patch) ** 2 if image_size and patch else None
    lm = config.get("language_model", {})  # None for a VQVAE (learned codebook, no LM)
    return {
        "checkpoint": os.fspath(path),
        "format_version": config.get("format_version"),
        "preset": preset_name(model),
        "language_model": lm,
        "image_size": image_size,
        "color_mode": config.get("preprocessing", {}).get("color_mode"),
        "patch_size": patch,
        "tokens_per_image": tokens,
        "architecture": {f: model.get(f) for f in _ARCHITECTURE_FIELDS if f in model},
        "training": config.get("training", {}),
        "metrics": config.get("metrics", {}),
        "weights_sha256": config.get("weights_sha256"),
    }


def _format(info: dict) -> str:
    lm = info["language_model"]
    arch = info["architecture"]
    if lm is None:
        lm_line = f"none (VQ-VAE: learned codebook of {arch.get('codebook_size')} codes)"
    else:
        lm_line = (f"{lm.get('name')} ({lm.get('model_type')}, vocabulary {lm.get('vocab_size')}, "
                   f"width {lm.get('hidden_size')}, embeddings {lm.get('embedding_sha256')})")
    lines = [
        f"checkpoint      {info['checkpoint']}",
        f"preset          {info['preset'] or 'custom (matches no preset)'}",
        f"language model  {lm_line}",
        f"image           {info['image_size']}x{info['image_size']} {info['color_mode']}, "
        f"patch {info['patch_size']} -> {info['tokens_per_image']} tokens per image",
        f"encoder         {arch.get('encoder_depth')} x {arch.get('encoder_dim')} ({arch.get('block')} blocks), "
        f"decoder {arch.get('decoder_depth')} x {arch.get('decoder_dim')}",
    ]
    lines.append("training        " + (_flatten(info["training"]) or "not recorded"))
    lines.append("metrics         " + (_flatten(info["metrics"]) or "not recorded"))
    lines.append(f"weights sha256  {info['weights_sha256']}")
    lines.append(f"format version  {info['format_version']}")
    return "\n".join(lines)


def _flatten(mapping: dict, indent: str = "\n                ") -> str:
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_short(v)}" for k, v in value.items())
        items.append(f"{key}: {_short(value)}")
    return indent.join(items)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{', '.join(map(_short, value[:8]))}, ... ({len(value)} items)]"
    return str(value)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.argument("checkpoint", required=False, metavar="[CHECKPOINT]")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object instead of text.")
def cli(checkpoint, as_json):
    """Describe a checkpoint: preset, language model, image size, training data and metrics.

    CHECKPOINT is a checkpoint folder or .safetensors file [default: the
    packaged Fashion-MNIST model].
    """
    path = checkpoint or DEFAULT_CHECKPOINT
    try:
        config = read_checkpoint_config(path)
    except FileNotFoundError as exc:
        hint = " (the packaged checkpoint is not installed)" if checkpoint is None else ""
        raise click.BadParameter(f"{os.fspath(path)!r} does not exist{hint}", param_hint="CHECKPOINT") from exc
    except (CheckpointError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint="CHECKPOINT") from exc
    info = summarize(path, config)
    click.echo(json.dumps(info, indent=2) if as_json else _format(info))


def main(argv=None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="lqae-info")


if __name__ == "__main__":
    main()

"""lqae-info on real checkpoints, run as a real process."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from lqae_sklearn.model import DEFAULT_CHECKPOINT, read_checkpoint_config
from lqae_sklearn.model._checkpoint import tensors_sha256
from lqae_sklearn.cli.info import preset_name

INFO = [sys.executable, "-m", "lqae_sklearn.cli.info"]


def fields(text: str) -> dict:
    """lqae-info's text as {label: value}: a label fills the first 16 columns; continuation lines are left out."""
    return {line[:16].strip(): line[16:] for line in text.splitlines() if line[:16].strip()}


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """An untrained small-28 checkpoint with training facts recorded.

    Its frozen LM is a tiny random BERT: lqae-info reads only the config, so the
    real 30k-word LM would only slow the test down.
    """
    import torch
    from transformers import BertConfig

    from lqae_sklearn import LQAE, FrozenLanguageModel, preset_config, save_checkpoint

    torch.manual_seed(0)
    tiny = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    path = tmp_path_factory.mktemp("info") / "small.safetensors"
    save_checkpoint(
        LQAE(preset_config("small-28"), FrozenLanguageModel.from_hf_config(tiny)).eval(), path,
        training={"dataset": "fashion-mnist", "split": "train", "steps": 1200},
        metrics={"test_mse": 0.0123, "token_usage": 0.41},
    )
    return path


def test_info_text(small_checkpoint):
    result = subprocess.run(INFO + [str(small_checkpoint)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    embeddings = read_checkpoint_config(small_checkpoint)["language_model"]["embedding_sha256"]
    assert fields(out) == {
        "checkpoint": str(small_checkpoint),
        "preset": "small-28",
        "language model": f"random (bert, vocabulary 120, width 32, embeddings {embeddings})",
        "image": "28x28 L, patch 4 -> 49 tokens per image",
        "encoder": "4 x 256 (vit blocks), decoder 4 x 256",
        "training": "dataset: fashion-mnist",
        "metrics": "test_mse: 0.0123",
        "weights sha256": tensors_sha256(load_file(small_checkpoint)),  # computed here from the weights
        "format version": "1",
    }
    assert "\n                split: train\n                steps: 1200\n" in out
    assert "\n                token_usage: 0.41\n" in out


def test_info_json(small_checkpoint):
    result = subprocess.run(INFO + [str(small_checkpoint), "--json"], capture_output=True, text=True, timeout=120)
    info = json.loads(result.stdout)
    assert info["checkpoint"] == str(small_checkpoint) and info["weights_sha256"] == tensors_sha256(load_file(small_checkpoint))
    assert info["preset"] == "small-28" and info["image_size"] == 28 and info["tokens_per_image"] == 49
    assert info["language_model"]["vocab_size"] == 120
    assert info["training"]["steps"] == 1200 and info["metrics"]["token_usage"] == 0.41


def test_info_bad_checkpoints_exit_2(tmp_path):
    from click.testing import CliRunner

    from lqae_sklearn.cli.info import cli

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    for target, message in [(tmp_path / "junk.safetensors", "corrupt"), (tmp_path, "config.json")]:
        result = CliRunner().invoke(cli, [str(target)])  # in process: saves interpreter starts
        assert result.exit_code == 2 and message in result.output, (target, result.output)
    real = subprocess.run(INFO + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert real.returncode == 2 and "does not exist" in real.stderr


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="the packaged checkpoint is not trained yet")
def test_info_default_checkpoint():
    """The shipped checkpoint's facts, as the model card states them; the checksum computed from its weights."""
    result = subprocess.run(INFO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shown = fields(result.stdout)
    assert shown["checkpoint"] == str(DEFAULT_CHECKPOINT)
    assert shown["preset"] == "small-28"
    assert shown["language model"].startswith("all-MiniLM-L6-v2 (bert, vocabulary 30522, width 384, embeddings ")
    assert shown["image"] == "28x28 L, patch 4 -> 49 tokens per image"
    assert shown["encoder"] == "4 x 256 (vit blocks), decoder 4 x 256"
    assert shown["training"] == "data: source=fashion-mnist, split=train, num_images=60000"
    assert "\n                steps: 1100\n" in result.stdout
    assert shown["weights sha256"] == tensors_sha256(load_file(DEFAULT_CHECKPOINT / "model.safetensors"))


def test_preset_name_of_custom_architecture():
    from lqae_sklearn import preset_config

    assert preset_name(preset_config("small-rgb").to_dict()) == "small-rgb"
    assert preset_name(preset_config("small-28", encoder_depth=2).to_dict()) is None

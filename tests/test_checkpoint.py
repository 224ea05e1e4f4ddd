"""Checkpoints: exact round trips, atomic writes, and a clear CheckpointError for each kind of damage."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig

import lqae_sklearn.model._checkpoint as checkpoint_module
from lqae_sklearn import LQAE, CheckpointError, FrozenLanguageModel, load_checkpoint, save_checkpoint
from lqae_sklearn.model._checkpoint import FORMAT_VERSION, read_checkpoint_config

from conftest import tiny_config


def _model(minilm, seed):
    torch.manual_seed(seed)
    model = LQAE(tiny_config(), minilm)
    # Give the decoder a non-trivial output, so equal reconstructions mean equal weights.
    with torch.no_grad():
        model.decoder.to_pixels.bias.fill_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model_a(minilm):
    return _model(minilm, 0)


@pytest.fixture(scope="module")
def model_b(minilm):
    return _model(minilm, 1)


@pytest.fixture(scope="module")
def images(fmnist_batch):
    return fmnist_batch[:4]


def outputs(model, images):
    with torch.no_grad():
        out = model(images, mask_ratio=0.0)
        return out.ids, out.reconstruction, model.features(images, ["encoder.1"])


def assert_same_outputs(m1, m2, images):
    for a, b in zip(outputs(m1, images), outputs(m2, images)):
        assert torch.equal(a, b)


@pytest.fixture
def folder_checkpoint(tmp_path, model_a):
    return save_checkpoint(model_a, tmp_path / "ckpt")


@pytest.fixture
def file_checkpoint(tmp_path, model_a):
    return save_checkpoint(model_a, tmp_path / "ckpt.safetensors")


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_save_load_gives_identical_outputs(tmp_path, model_a, model_b, minilm, images, name):
    path = save_checkpoint(model_a, tmp_path / name, training={"steps": 3}, metrics={"eval_psnr": 12.5})
    assert path.is_dir() == (name == "ckpt")
    loaded = load_checkpoint(path, language_model=minilm)
    assert not loaded.training
    assert loaded.config == model_a.config
    assert_same_outputs(loaded, model_a, images)
    loaded_state = loaded.trainable_state_dict()
    for key, value in model_a.trainable_state_dict().items():
        assert torch.equal(value, loaded_state[key])
    # Sanity of the comparison: another model's outputs differ.
    assert not torch.equal(outputs(model_b, images)[1], outputs(loaded, images)[1])
    config = read_checkpoint_config(path)
    assert config == loaded.checkpoint_config
    assert config["training"] == {"steps": 3} and config["metrics"] == {"eval_psnr": 12.5}
    assert config["format_version"] == FORMAT_VERSION
    assert config["language_model"] == minilm.identity()
    assert config["preprocessing"]["image_size"] == 28 and config["preprocessing"]["color_mode"] == "L"


def test_folder_holds_only_json_and_safetensors(folder_checkpoint):
    assert sorted(p.name for p in folder_checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    json.loads((folder_checkpoint / "config.json").read_text())


def test_load_without_language_model_loads_the_named_one(folder_checkpoint, model_a, images):
    loaded = load_checkpoint(folder_checkpoint)  # loads all-MiniLM-L6-v2 by its recorded name
    assert loaded.language_model.identity() == model_a.language_model.identity()
    assert_same_outputs(loaded, model_a, images)


# -- atomic writes ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_overwrite_replaces_the_checkpoint_and_leaves_no_temporaries(tmp_path, model_a, model_b, minilm, images, name):
    path = save_checkpoint(model_a, tmp_path / name)
    save_checkpoint(model_b, path)
    assert_same_outputs(load_checkpoint(path, language_model=minilm), model_b, images)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, model_a, model_b, minilm, images, monkeypatch, name):
    path = save_checkpoint(model_a, tmp_path / name)

    def dies_half_way(tensors, filename, metadata=None):
        # Write a partial file where we were told to, then fail like a full disk would.
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model_b, path)
    monkeypatch.undo()
    assert_same_outputs(load_checkpoint(path, language_model=minilm), model_a, images)
    assert [p.name for p in tmp_path.iterdir()] == [name]


# -- damage: each kind raises CheckpointError saying what is wrong ---------------------------------
def test_language_model_of_another_shape(folder_checkpoint, minilm):
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    other = FrozenLanguageModel.from_hf_config(config, name="tiny-bert")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder_checkpoint, language_model=other)
    message = str(info.value)
    assert "all-MiniLM-L6-v2" in message and "tiny-bert" in message
    assert "vocab 30522" in message and "vocab 120" in message


def test_language_model_with_same_shape_but_other_embeddings(file_checkpoint, minilm):
    config = BertConfig(
        vocab_size=minilm.vocab_size, hidden_size=minilm.hidden_size, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32,
    )
    other = FrozenLanguageModel.from_hf_config(config, name="random-minilm-shape")
    with pytest.raises(CheckpointError, match="all-MiniLM-L6-v2") as info:
        load_checkpoint(file_checkpoint, language_model=other)
    assert "random-minilm-shape" in str(info.value)
    assert minilm.embedding_sha256 in str(info.value) and other.embedding_sha256 in str(info.value)


def test_truncated_weights_in_folder(folder_checkpoint, minilm):
    weights = folder_checkpoint / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_checkpoint(folder_checkpoint, language_model=minilm)


def test_truncated_single_file(file_checkpoint, minilm):
    with open(file_checkpoint, "r+b") as f:
        f.truncate(file_checkpoint.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        load_checkpoint(file_checkpoint, language_model=minilm)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte belongs to the last tensor's data, not to the header
    path.write_bytes(bytes(data))


def test_flipped_byte_in_folder_weights(folder_checkpoint, minilm):
    _flip_last_byte(folder_checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match the checksum"):
        load_checkpoint(folder_checkpoint, language_model=minilm)


def test_flipped_byte_in_single_file(file_checkpoint, minilm):
    _flip_last_byte(file_checkpoint)
    with pytest.raises(CheckpointError, match=r"does not match the checksum"):
        load_checkpoint(file_checkpoint, language_model=minilm)


def test_garbage_config_json(folder_checkpoint, minilm):
    (folder_checkpoint / "config.json").write_bytes(b'{"format": "lqae-sklearn", "format_vers\x00\xff')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(folder_checkpoint, language_model=minilm)
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        read_checkpoint_config(folder_checkpoint)


def test_format_version_from_the_future(folder_checkpoint, minilm):
    config_file = folder_checkpoint / "config.json"
    config = json.loads(config_file.read_text())
    config["format_version"] = FORMAT_VERSION + 1
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"newer lqae-sklearn \(format_version {FORMAT_VERSION + 1}\).*upgrade"):
        load_checkpoint(folder_checkpoint, language_model=minilm)


def test_not_an_lqae_checkpoint(tmp_path, folder_checkpoint, minilm):
    config_file = folder_checkpoint / "config.json"
    config_file.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not an lqae-sklearn checkpoint"):
        load_checkpoint(folder_checkpoint, language_model=minilm)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not an lqae-sklearn checkpoint"):
        load_checkpoint(plain, language_model=minilm)


def test_missing_weights_and_missing_path(tmp_path, folder_checkpoint, minilm):
    (folder_checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_checkpoint(folder_checkpoint, language_model=minilm)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", language_model=minilm)

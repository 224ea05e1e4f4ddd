"""Training: metrics/samples/checkpoint, exact resume after a crash, DDP under torchrun, the lqae-train CLI."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import lqae_sklearn.training
from lqae_sklearn import FrozenLanguageModel, load_checkpoint
from lqae_sklearn.model import DEFAULT_LANGUAGE_MODEL
from lqae_sklearn.training import ResumeError, TrainConfig, _trainer, train
from lqae_sklearn.training import cli as train_cli

from conftest import TINY_OVERRIDES, tiny_config

LOSS_TERMS = ("loss", "reconstruction_loss", "commitment_loss", "mlm_loss")
TRAIN_KEYS = {"step", "epoch", "lr", *LOSS_TERMS, "psnr", "codebook_usage", "perplexity", "images_per_s"}
# The tiny model as lqae-train options.
TINY_CLI = ["--patch-size", "7"] + [
    arg for key, value in TINY_OVERRIDES.items() if key != "patch_size" for arg in ("--set", f"{key}={value}")
]
LQAE_TRAIN = Path(sys.executable).parent / "lqae-train"


@pytest.fixture(scope="module")
def npy_data(tmp_path_factory, fmnist_uint8) -> Path:
    """256 real Fashion-MNIST images as a (256, 28, 28) uint8 .npy file."""
    path = tmp_path_factory.mktemp("data") / "fashion256.npy"
    np.save(path, fmnist_uint8)
    return path


@contextlib.contextmanager
def reusing(minilm):
    """In-process runs reuse the session's MiniLM instead of loading it again (it is frozen).

    Loading draws from the global RNG, so the initial weights differ from a run that loads
    the LM itself: runs compared with each other must all reuse it, or none.
    """
    original = FrozenLanguageModel.from_pretrained.__func__

    def from_pretrained(cls, name_or_path=DEFAULT_LANGUAGE_MODEL):
        return minilm if name_or_path == DEFAULT_LANGUAGE_MODEL else original(cls, name_or_path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FrozenLanguageModel, "from_pretrained", classmethod(from_pretrained))
        yield


def run_config(out_dir, npy_data, **overrides) -> TrainConfig:
    settings = dict(
        out_dir=str(out_dir), data=str(npy_data), eval_data=str(npy_data), eval_images=16,
        steps=6, batch_size=16, lr=1e-3, save_every=3, log_every=3, device="cpu", progress=False,
        model_overrides=dict(TINY_OVERRIDES),
    )
    return TrainConfig(**{**settings, **overrides})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, npy_data, minilm) -> Path:
    out = tmp_path_factory.mktemp("straight")
    with reusing(minilm):
        assert train(run_config(out, npy_data)) == out / "checkpoint"
    return out


class _Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, npy_data, minilm):
    """The same 6-step run, killed right after its step-3 checkpoint, then resumed."""
    out = tmp_path_factory.mktemp("resumed")
    real_save = _trainer._save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Crash("simulated crash after the step-3 checkpoint")

    with reusing(minilm), pytest.MonkeyPatch.context() as patch:
        patch.setattr(_trainer, "_save", save_then_crash)
        with pytest.raises(_Crash):
            train(run_config(out, npy_data))
    halfway = tmp_path_factory.mktemp("halfway") / "checkpoint"
    shutil.copytree(out / "checkpoint", halfway)
    with reusing(minilm):
        train(run_config(out, npy_data, resume=True))
    return out, halfway


def test_training_writes_metrics_samples_and_checkpoint(straight_run, minilm, npy_data):
    records = read_metrics(straight_run)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [3, 6]
    for record in train_records:
        assert set(record) == TRAIN_KEYS
        assert all(math.isfinite(record[k]) for k in TRAIN_KEYS)
        assert record["images_per_s"] > 0 and 0 < record["codebook_usage"] <= 1 and record["perplexity"] >= 1
        expected = record["reconstruction_loss"] + 0.01 * record["commitment_loss"] + 1e-4 * record["mlm_loss"]
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
        assert record["psnr"] == pytest.approx(10 * math.log10(1 / record["reconstruction_loss"]), rel=1e-6)
        assert record["mlm_loss"] > 0  # mask ratio 0.5 in training
    eval_records = [r for r in records if "eval_psnr" in r]
    assert [r["step"] for r in eval_records] == [3, 6]
    assert all({"eval_codebook_usage", "eval_perplexity"} <= set(r) for r in eval_records)

    for step in (3, 6):
        with Image.open(straight_run / "samples" / f"step_{step:07d}.png") as grid:
            grid.load()
            assert grid.mode == "L" and grid.height == 2 * grid.width // 16  # originals over reconstructions

    model = load_checkpoint(straight_run / "checkpoint", language_model=minilm)
    assert model.config == tiny_config()
    config = model.checkpoint_config
    assert config["training"]["steps"] == 6 and config["training"]["world_size"] == 1
    assert config["training"]["data"]["num_images"] == 256
    assert config["metrics"]["eval_psnr"] == pytest.approx(eval_records[-1]["eval_psnr"])
    # The figures say which images they were measured on (here the training .npy itself, 16 of them).
    assert (config["metrics"]["eval_data"], config["metrics"]["eval_images"]) == (str(npy_data), 16)
    assert {p.name for p in (straight_run / "checkpoint").iterdir()} == {
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
    }


def test_resume_after_a_crash_matches_the_uninterrupted_run(straight_run, resumed_run):
    resumed, halfway = resumed_run
    straight_weights, resumed_weights = weights_of(straight_run), weights_of(resumed)
    halfway_weights = load_file(halfway / "model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-5, msg=name)
    # The comparison can fail: steps 4-6 moved the weights far more than the tolerance.
    moved = max(float((straight_weights[k] - halfway_weights[k]).abs().max()) for k in straight_weights)
    assert moved > 1e-4
    straight_opt = load_file(straight_run / "checkpoint" / "optimizer.safetensors")
    resumed_opt = load_file(resumed / "checkpoint" / "optimizer.safetensors")
    for name, tensor in straight_opt.items():
        torch.testing.assert_close(resumed_opt[name], tensor, rtol=1e-5, atol=1e-8, msg=name)
    # The log continues where it stopped: same steps, same losses, nothing duplicated.
    straight_log, resumed_log = read_metrics(straight_run), read_metrics(resumed)
    assert [r["step"] for r in resumed_log] == [r["step"] for r in straight_log]
    for a, b in zip(straight_log, resumed_log):
        for key in (*LOSS_TERMS, "eval_psnr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_resume_with_changed_batch_size_raises(tmp_path, straight_run, npy_data, minilm):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    with reusing(minilm), pytest.raises(ValueError, match=r"cannot resume .*checkpoint: batch_size was 16, now 32"):
        train(run_config(run, npy_data, batch_size=32, steps=8, resume=True))


def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path, npy_data, minilm):
    # Masks and crops are drawn per (micro-batch, rank), so compare with both switched off: then
    # 2 processes x micro-batch 4 and 1 process x 2 micro-batches of 4 see the same images.
    common = ["--data", str(npy_data), "--steps", "4", "--batch-size", "8", "--no-augment", "--lr", "1e-3",
              "--warmup-steps", "1", "--log-every", "1", "--save-every", "4", "--device", "cpu", "--no-progress"]
    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "lqae_sklearn.training.cli", *common, *TINY_CLI, "--set", "mask_ratio=0", "--out", str(ddp_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_model = load_checkpoint(ddp_dir / "checkpoint", language_model=minilm)
    assert ddp_model.checkpoint_config["training"]["world_size"] == 2
    ddp_log = read_metrics(ddp_dir)
    assert [r["step"] for r in ddp_log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in ddp_log)

    # The reference loads its LM for real, as each torchrun process did (loading draws from the RNG).
    # It runs on 1 thread like them: with 2, the matmuls' other summation order grew past the 1e-5
    # weight tolerance within the 4 Adam steps (seen on the 2-core CI machine).
    single_dir = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(
            out_dir=str(single_dir), data=str(npy_data), steps=4, batch_size=8, accumulation=2, augment=False,
            lr=1e-3, warmup_steps=1, log_every=1, save_every=4, device="cpu", progress=False,
            model_overrides={**TINY_OVERRIDES, "mask_ratio": 0.0},
        ))
    finally:
        torch.set_num_threads(threads)
    single_log = read_metrics(single_dir)
    for a, b in zip(single_log, ddp_log):
        for key in LOSS_TERMS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert abs(single_log[-1]["loss"] - single_log[0]["loss"]) > 1e-3  # the steps did change the model
    ddp_weights, single_weights = weights_of(ddp_dir), weights_of(single_dir)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=0, atol=1e-5, msg=name)


# -- the command line ---------------------------------------------------------------------------------
def test_import_training_package():
    assert lqae_sklearn.training.train is train
    assert Path(lqae_sklearn.training.__file__).parent.name == "training"
    assert {"TrainConfig", "train", "evaluate", "EpochOrder"} <= set(lqae_sklearn.training.__all__)


def test_console_script_help():
    result = subprocess.run([str(LQAE_TRAIN), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--data", "--steps", "--batch-size", "--resume", "--set KEY=VALUE", "torchrun"):
        assert option in result.stdout


def test_console_script_smoke_run(tmp_path, npy_data, minilm):
    out = tmp_path / "run"
    result = subprocess.run(
        [str(LQAE_TRAIN), "--data", str(npy_data), "--steps", "4", "--batch-size", "8", "--log-every", "2",
         "--save-every", "4", "--device", "cpu", "--no-progress", "--out", str(out), *TINY_CLI],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint: {out / 'checkpoint'}" in result.stderr
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    model = load_checkpoint(out / "checkpoint", language_model=minilm)
    assert model.config == tiny_config()
    assert model.checkpoint_config["training"]["config"]["batch_size"] == 8


@pytest.fixture
def captured_config(monkeypatch):
    """Run the CLI's option handling without training: capture the TrainConfig it builds."""
    seen = []
    monkeypatch.setattr(train_cli, "train", lambda cfg: seen.append(cfg) or Path("unused"))
    return seen


def test_lqae_train_without_fashion_mnist_offline_is_a_usage_error_naming_data(tmp_path):
    """``lqae-train --data fashion-mnist`` on a machine without the data and without the network: the
    fetcher's message as a usage error on --data, exit status 2, no traceback. A real process, with every
    copy hidden: empty $LQAE_FASHION_MNIST and $SCIKIT_LEARN_DATA, Debian's folder swapped for an empty
    one (it is installed on some machines), and a mirror on 127.0.0.1 that nobody listens on."""
    import socket
    import textwrap

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        offline = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    empty = tmp_path / "empty"
    empty.mkdir()
    script = textwrap.dedent(f"""
        import lqae_sklearn.datasets._fashion_mnist as fm
        fm.DEBIAN_FASHION_MNIST_DIR = fm.Path({str(empty)!r})
        fm.FASHION_MNIST_MIRRORS[:] = [{offline!r}]
        from lqae_sklearn.training.cli import main
        main(prog_name="lqae-train")
    """)
    env = {**os.environ, "LQAE_FASHION_MNIST": "", "SCIKIT_LEARN_DATA": str(tmp_path / "scikit_learn_data")}
    args = ["--data", "fashion-mnist", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Usage: lqae-train [OPTIONS]" in result.stderr, result.stderr
    assert ("Error: Invalid value for --data: Fashion-MNIST file train-images-idx3-ubyte.gz is not on this machine "
            "and could not be downloaded:") in result.stderr
    assert f"{offline}train-images-idx3-ubyte.gz: could not connect" in result.stderr
    assert "Provide it in one of three ways" in result.stderr and "$LQAE_FASHION_MNIST" in result.stderr
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_set_option_fills_model_overrides_with_typed_values(captured_config):
    result = CliRunner().invoke(train_cli.main, [
        "--set", "encoder_dim=64", "--set", "mlp_ratio=2", "--set", "normalize_latents=no",
        "--set", "block=lqae", "--set", "mask-ratio=0.25", "--patch-size", "7",
    ])
    assert result.exit_code == 0, result.output
    (cfg,) = captured_config
    assert cfg.model_overrides == {
        "encoder_dim": 64, "mlp_ratio": 2.0, "normalize_latents": False, "block": "lqae", "mask_ratio": 0.25,
        "patch_size": 7,
    }
    assert type(cfg.model_overrides["encoder_dim"]) is int and type(cfg.model_overrides["mlp_ratio"]) is float


@pytest.mark.parametrize("args, message", [
    (["--set", "colour=red"], "unknown model field 'colour'"),
    (["--set", "encoder_dim"], "'encoder_dim' is not KEY=VALUE"),
    (["--set", "encoder_dim=wide"], "encoder_dim='wide': expected int"),
    (["--set", "normalize_latents=maybe"], "normalize_latents='maybe': expected bool"),
    (["--set", "patch_size=7", "--patch-size", "4"], "patch_size is given both by --set and by --patch-size"),
    (["--set", "encoder_heads=3"], "encoder_dim=256 is not divisible by encoder_heads=3"),
    (["--set", "patch_size=5"], "image_size=28 is not divisible by patch_size=5"),
])
def test_set_option_rejects_bad_values(captured_config, args, message):
    result = CliRunner().invoke(train_cli.main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert captured_config == []


def test_resume_without_a_run_is_refused_and_a_new_run_never_overwrites_one(tmp_path, straight_run, npy_data, minilm):
    empty = tmp_path / "empty"
    with reusing(minilm), pytest.raises(ResumeError, match=r"nothing to resume in .*empty: .* holds no checkpoint"):
        train(run_config(empty, npy_data, resume=True))
    assert not (empty / "metrics.jsonl").exists()

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    metrics = (run / "metrics.jsonl").read_bytes()
    with reusing(minilm), pytest.raises(ResumeError, match="already holds a training run .*; pass --resume"):
        train(run_config(run, npy_data))
    assert (run / "metrics.jsonl").read_bytes() == metrics  # untouched

    result = subprocess.run([str(LQAE_TRAIN), "--data", str(npy_data), "--out", str(empty), "--resume",
                             "--steps", "2", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "nothing to resume in" in result.stderr and "Traceback" not in result.stderr


def test_resume_refuses_settings_the_checkpoint_would_silently_override(tmp_path, straight_run, npy_data, minilm):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    for change, message in [({"weight_decay": 0.1}, "weight_decay was 0.0005, now 0.1"),
                            ({"betas": (0.8, 0.9)}, r"betas was \[0.9, 0.95\], now \(0.8, 0.9\)"),
                            ({"model_overrides": {**TINY_OVERRIDES, "mask_ratio": 0.3}}, "model_overrides was")]:
        with reusing(minilm), pytest.raises(ResumeError, match=message):
            train(run_config(run, npy_data, steps=8, resume=True, **change))


def test_resume_with_dead_code_restarts_matches_the_uninterrupted_run(tmp_path, npy_data):
    """k-means initialisation and restarts every 2 unused batches: their state (buffers in the checkpoint) and
    their random draws (the step's generator) must carry across a crash, or the resumed run drifts."""
    settings = dict(preset="small-28-vqvae-restarts",
                    model_overrides={**TINY_OVERRIDES, "codebook_size": 64, "restart_unused_after": 2})
    straight = tmp_path / "straight"
    train(run_config(straight, npy_data, **settings))
    resumed = tmp_path / "resumed"
    real_save = _trainer._save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Crash("simulated crash after the step-3 checkpoint")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_trainer, "_save", save_then_crash)
        with pytest.raises(_Crash):
            train(run_config(resumed, npy_data, **settings))
    halfway = weights_of(resumed)
    # What the resumed run must pick up: k-means has run, and some codes are on their way to a restart.
    assert halfway["quantizer.kmeans_done"] and halfway["quantizer.calls_unused"].max() > 0
    train(run_config(resumed, npy_data, resume=True, **settings))
    straight_weights, resumed_weights = weights_of(straight), weights_of(resumed)
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert float((straight_weights["quantizer.codebook"] - halfway["quantizer.codebook"]).abs().max()) > 1e-4
    straight_log, resumed_log = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in resumed_log] == [r["step"] for r in straight_log]
    for a, b in zip(straight_log, resumed_log):
        for key in ("loss", "codebook_usage", "eval_psnr", "eval_codebook_usage"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)

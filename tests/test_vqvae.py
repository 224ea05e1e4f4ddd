"""The VQ-VAE baseline: config, L2 search, where each loss term's gradient goes, a codebook that learns,
checkpoints without any language model, and lqae-train --preset small-28-vqvae with an exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from lqae_sklearn import LQAE, FrozenLanguageModel, LQAEConfig, load_checkpoint, save_checkpoint
from lqae_sklearn.cli import info as info_cli
from lqae_sklearn.model import PRESETS, VQVAE, LearnedQuantizer, build_model, preset_config, read_checkpoint_config
from lqae_sklearn.model._config import VQVAE_COMMITMENT_WEIGHT
from lqae_sklearn.training import _trainer, evaluate
from lqae_sklearn.training import cli as train_cli

from conftest import TINY_OVERRIDES, tiny_config

ARCHITECTURE = ("image_size", "in_channels", "patch_size", "encoder_dim", "encoder_depth", "encoder_heads",
                "decoder_dim", "decoder_depth", "decoder_heads", "mlp_ratio", "block")


def vq_config(**overrides) -> LQAEConfig:
    """The small-28-vqvae preset at the tests' tiny size, with 64 codes (16 tokens per image)."""
    return preset_config("small-28-vqvae", **{**TINY_OVERRIDES, "codebook_size": 64, **overrides})


def tiny_vqvae(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(vq_config())


@pytest.fixture
def no_lm(monkeypatch):
    """Any attempt to load a language model fails the test."""
    def refuse(cls, *args, **kwargs):
        raise AssertionError("a VQVAE must not load a language model")

    monkeypatch.setattr(FrozenLanguageModel, "from_pretrained", classmethod(refuse))


@pytest.fixture(scope="module")
def model() -> VQVAE:
    return tiny_vqvae().eval()


# -- config ------------------------------------------------------------------------------------------
def test_vqvae_preset_is_small_28_with_a_learned_codebook():
    vq, lqae = preset_config("small-28-vqvae"), preset_config("small-28")
    assert {f: getattr(vq, f) for f in ARCHITECTURE} == {f: getattr(lqae, f) for f in ARCHITECTURE}
    assert (vq.codebook, vq.codebook_size, vq.commitment_weight) == ("learned", 1024, VQVAE_COMMITMENT_WEIGHT)
    assert (vq.mask_ratio, vq.mlm_weight, vq.normalize_latents) == (0.0, 0.0, False)
    assert (lqae.codebook, LQAEConfig().codebook) == ("language", "language")
    assert LQAEConfig.from_dict(vq.to_dict()) == vq and "small-28-vqvae" in PRESETS


@pytest.mark.parametrize("field, value, message", [
    ("codebook", "words", "codebook must be 'language' or 'learned', got 'words'"),
    ("codebook_size", 0, "codebook_size must be an int >= 1, got 0"),
    ("codebook_size", 2.5, "codebook_size must be an int >= 1, got 2.5"),
    ("codebook_size", True, "codebook_size must be an int >= 1, got True"),
])
def test_config_validation_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError) as info:
        LQAEConfig(**{field: value})
    assert str(info.value) == message


def test_checkpoint_written_before_the_codebook_fields_loads_as_an_lqae(tmp_path, minilm, fmnist_batch):
    torch.manual_seed(0)
    lqae = LQAE(tiny_config(), minilm).eval()
    path = save_checkpoint(lqae, tmp_path / "old")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("codebook", "codebook_size"):
        del config["model"][key]  # as an older lqae-sklearn wrote it
    config_file.write_text(json.dumps(config))
    loaded = load_checkpoint(path, language_model=minilm)
    assert isinstance(loaded, LQAE) and loaded.config == lqae.config and loaded.config.codebook == "language"
    assert torch.equal(loaded.encode(fmnist_batch), lqae.encode(fmnist_batch))


def test_build_model_builds_a_vqvae_without_any_language_model(no_lm):
    model = build_model(vq_config())
    assert isinstance(model, VQVAE) and model.language_model is None
    assert not any("language_model" in name for name, _ in model.named_parameters())
    assert model.quantizer.codebook.shape == (64, 64) and model.quantizer.codebook.requires_grad
    with pytest.raises(AssertionError, match="must not load a language model"):
        build_model(tiny_config())  # the guard works: an LQAE would load one
    with pytest.raises(ValueError, match="VQVAE needs codebook='learned'"):
        VQVAE(tiny_config())


# -- the quantizer -----------------------------------------------------------------------------------
def test_nearest_is_the_l2_argmin_not_the_cosine_one():
    g = torch.Generator().manual_seed(0)
    quantizer = LearnedQuantizer(64, 16)
    with torch.no_grad():
        quantizer.codebook.mul_(torch.rand(64, 1, generator=g) * 3)  # rows of different norms
    x = torch.randn(40, 25, 16, generator=g)
    ids = quantizer.nearest(x)
    assert ids.shape == (40, 25) and ids.dtype == torch.int64
    expected = torch.cdist(x.reshape(-1, 16).double(), quantizer.codebook.detach().double()).argmin(dim=1)
    assert torch.equal(ids.flatten(), expected)
    cosine = (F.normalize(x.reshape(-1, 16), dim=-1) @ F.normalize(quantizer.codebook.detach(), dim=-1).T).argmax(1)
    assert (cosine != expected).any()  # the two searches differ here, so the check above tells them apart
    quantizer.rows_per_step = 7  # chunked search, same answer
    assert torch.equal(quantizer.nearest(x), ids)


@pytest.mark.parametrize("options", [{}, {"kmeans_init": True, "restart_unused_after": 1}])
def test_each_loss_term_moves_only_its_side(options):
    """Also with k-means initialisation and restarts, which act before the search (training mode)."""
    quantizer = LearnedQuantizer(32, 8, **options)
    # More latents than codes: k-means over fewer would put every code on a latent, and zero the codebook term.
    x = torch.randn(8, 10, 8, requires_grad=True)
    quantized, ids, codebook_loss, commitment = quantizer(x, torch.Generator().manual_seed(0))
    e = quantizer.codebook.detach()[ids]
    torch.testing.assert_close(quantized, e)
    torch.testing.assert_close(codebook_loss, F.mse_loss(x.detach(), e))
    torch.testing.assert_close(commitment, codebook_loss)  # same value: only the gradients differ
    # The codebook term reaches the codebook only, the commitment term x only.
    grad_x, grad_codebook = torch.autograd.grad(codebook_loss, [x, quantizer.codebook], allow_unused=True, retain_graph=True)
    assert grad_x is None and grad_codebook.abs().sum() > 0
    grad_x, grad_codebook = torch.autograd.grad(commitment, [x, quantizer.codebook], allow_unused=True, retain_graph=True)
    assert grad_codebook is None and grad_x.abs().sum() > 0
    # Straight-through: the decoder's gradient goes to x unchanged, never to the codebook.
    grad_x, grad_codebook = torch.autograd.grad(quantized.sum(), [x, quantizer.codebook], allow_unused=True)
    assert grad_codebook is None and torch.equal(grad_x, torch.ones_like(x))


def official_vqae_quantizer_loss(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The official vqae.py's training loss of its quantizer, written from its code (lhao499/
    language-quantized-autoencoders at 79cd033, lqae/models/vqae.py): ``get_train_loss`` is
    ``0.25 * mean((sg(q) - x)^2) + mean((q - sg(x))^2)`` (lines 157-176, quantizer_loss_commitment=0.25,
    line 225), and ``__call__`` adds it for ``x`` and again for its latent branch, the identity with
    quantizer_latent_dim=0 (lines 106, 116-121, 230); lqae_main.py adds the sum to the pixel MSE (line 197)."""
    def get_train_loss(q, x):
        return 0.25 * ((q.detach() - x) ** 2).mean() + ((q - x.detach()) ** 2).mean()

    return get_train_loss(q, x) + get_train_loss(q, x)


def test_the_vqvae_preset_pulls_the_encoder_as_the_official_vqae_does():
    """The preset's commitment weight is the official one's effective value: the encoder's gradient
    from our VQ terms equals the official loss's; the codebook's is half of it, which AdamW's
    per-parameter scaling all but ignores (one term moves the codebook, whatever its weight)."""
    weight = preset_config("small-28-vqvae").commitment_weight
    quantizer = LearnedQuantizer(32, 8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    _, ids, codebook_loss, commitment = quantizer(x)
    ours = codebook_loss + weight * commitment  # VQVAE.forward's terms beside the pixel MSE
    official = official_vqae_quantizer_loss(quantizer.embed(ids), x)
    ours_x, ours_codebook = torch.autograd.grad(ours, [x, quantizer.codebook])
    official_x, official_codebook = torch.autograd.grad(official, [x, quantizer.codebook])
    torch.testing.assert_close(ours_x, official_x)
    torch.testing.assert_close(2 * ours_codebook, official_codebook)
    assert weight == VQVAE_COMMITMENT_WEIGHT == 0.5


# -- the model ---------------------------------------------------------------------------------------
def test_encode_gives_code_ids_in_range(model, fmnist_batch):
    ids = model.encode(fmnist_batch)
    assert ids.dtype == torch.int64 and ids.shape == (16, 16)
    assert 0 <= ids.min() and ids.max() < model.quantizer.codebook_size == 64
    assert len({tuple(row) for row in ids.tolist()}) > 1
    assert model.encode(fmnist_batch, token_grid=2).shape == (16, 4)


def test_forward_loss_terms_and_gradients_from_their_definitions(fmnist_batch):
    """Recomputed from the VQ-VAE loss, not from the model's code: recon + sg-codebook term +
    0.5 x commitment; the codebook's gradient is the codebook term's alone, the encoder's is the
    reconstruction's (straight through) plus 0.5 x the commitment's."""
    model = tiny_vqvae().train()
    images = fmnist_batch
    out = model(images)
    z = model.encoder(images)
    ids = torch.cdist(z.detach().reshape(-1, 64).double(), model.quantizer.codebook.detach().double()).argmin(1)
    assert torch.equal(out.ids.flatten(), ids)
    e = model.quantizer.codebook[out.ids]
    assert out.mask.dtype == torch.bool and not out.mask.any() and out.mlm_loss == 0
    torch.testing.assert_close(out.reconstruction, model.decoder(e))
    torch.testing.assert_close(out.reconstruction_loss, F.mse_loss(out.reconstruction, images))
    torch.testing.assert_close(out.commitment_loss, F.mse_loss(z, e))
    assert model.config.commitment_weight == 0.5
    torch.testing.assert_close(out.loss, out.reconstruction_loss + 1.5 * out.commitment_loss)

    encoder = list(model.encoder.parameters())
    got = torch.autograd.grad(out.loss, [model.quantizer.codebook, *encoder])
    codebook_term = F.mse_loss(e, z.detach())
    torch.testing.assert_close(got[0], torch.autograd.grad(codebook_term, model.quantizer.codebook)[0])
    ste = z + (e - z).detach()
    encoder_terms = F.mse_loss(model.decoder(ste), images) + 0.5 * F.mse_loss(z, e.detach())
    for g_model, g_ref in zip(got[1:], torch.autograd.grad(encoder_terms, encoder, retain_graph=True)):
        torch.testing.assert_close(g_model, g_ref)
    # Without the commitment term the encoder's gradient would differ: the comparison can fail.
    recon_only = torch.autograd.grad(F.mse_loss(model.decoder(ste), images), encoder)
    assert any(not torch.allclose(a, b) for a, b in zip(got[1:], recon_only))


def test_codebook_learns_in_an_optimizer_step(fmnist_batch):
    model = tiny_vqvae().train()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    before = model.quantizer.codebook.detach().clone()
    out = model(fmnist_batch)
    latents = model.encoder(fmnist_batch).detach()
    out.loss.backward()
    optimizer.step()
    after = model.quantizer.codebook.detach()
    chosen = torch.zeros(64, dtype=torch.bool)
    chosen[out.ids.unique()] = True
    assert chosen.sum() > 1 and (~chosen).any()
    assert ((after - before)[chosen].abs().amax(dim=1) > 0).all()  # every chosen code moved
    assert torch.equal(after[~chosen], before[~chosen])  # plain VQ: the others get no gradient
    # ... towards the latents that chose them.
    assert F.mse_loss(latents, after[out.ids]) < F.mse_loss(latents, before[out.ids])


def test_decode_is_the_forward_reconstruction_clamped(model, fmnist_batch):
    with torch.no_grad():
        out = model(fmnist_batch)
        decoded = model.decode(out.ids)
        # Not bit-equal: forward decodes z + (e - z), which rounds differently from e.
        torch.testing.assert_close(decoded, out.reconstruction.clamp(0, 1), rtol=0, atol=1e-5)
        assert decoded.shape == fmnist_batch.shape and (out.reconstruction < 0).any()  # the clamp mattered
        assert model.decode(model.encode(fmnist_batch, token_grid=2)).shape == fmnist_batch.shape


def test_features_come_from_the_encoder_only(model, fmnist_batch):
    assert model.feature_layer_names() == ["encoder.1"]
    with torch.no_grad():
        features = model.features(fmnist_batch, ["encoder.1"])
        ids, again = model.encode_with_features(fmnist_batch, ["encoder.1"])
        _, layers = model.encoder(fmnist_batch, return_layers=True)
    assert features.shape == (16, 64) and torch.equal(features, again)
    torch.testing.assert_close(features, layers[0].mean(dim=1))
    assert torch.equal(ids, model.encode(fmnist_batch))
    with pytest.raises(ValueError, match=r"unknown feature layers \['lm.0'\] \(this model has no language model\)"):
        model.features(fmnist_batch, ["lm.0"])


def test_evaluate_counts_codes_over_the_codebook(model, fmnist_uint8):
    images = torch.from_numpy(fmnist_uint8[:12].copy()).unsqueeze(1)
    result = evaluate(model, images, torch.device("cpu"), torch.autocast("cpu", enabled=False), 5)
    ids = model.encode(images.float() / 255)
    assert result["codebook_usage"] == pytest.approx(len(ids.unique()) / 64)
    assert result["samples"].shape == (12, 1, 28, 28) and math.isfinite(result["psnr"])


# -- checkpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_save_load_round_trip_without_any_language_model(tmp_path, no_lm, fmnist_batch, name):
    original = tiny_vqvae(seed=3).eval()
    path = save_checkpoint(original, tmp_path / name, metrics={"eval_psnr": 11.0})
    loaded = load_checkpoint(path)
    assert isinstance(loaded, VQVAE) and not loaded.training and loaded.config == original.config
    with torch.no_grad():
        assert torch.equal(loaded.encode(fmnist_batch), original.encode(fmnist_batch))
        assert torch.equal(loaded.decode(original.encode(fmnist_batch)), original.decode(original.encode(fmnist_batch)))
    assert torch.equal(loaded.quantizer.codebook, original.quantizer.codebook)
    other = tiny_vqvae(seed=4).eval()  # the comparison can fail: another model encodes differently
    assert not torch.equal(other.encode(fmnist_batch), original.encode(fmnist_batch))

    config = read_checkpoint_config(path)
    assert config["language_model"] is None and config["model"]["codebook"] == "learned"
    tensors = load_file(path / "model.safetensors" if path.is_dir() else path)
    assert set(tensors) == set(original.state_dict()) and "quantizer.codebook" in tensors


def test_a_language_model_passed_to_load_is_ignored(tmp_path, minilm, no_lm, fmnist_batch):
    original = tiny_vqvae().eval()
    loaded = load_checkpoint(save_checkpoint(original, tmp_path / "ckpt"), language_model=minilm)
    assert isinstance(loaded, VQVAE) and loaded.language_model is None
    assert torch.equal(loaded.encode(fmnist_batch), original.encode(fmnist_batch))


def test_lqae_info_describes_a_vqvae_checkpoint(tmp_path, no_lm):
    path = save_checkpoint(tiny_vqvae(), tmp_path / "ckpt")
    result = CliRunner().invoke(info_cli.cli, [str(path)])
    assert result.exit_code == 0, result.output
    assert "language model  none (VQ-VAE: learned codebook of 64 codes)" in result.output
    as_json = json.loads(CliRunner().invoke(info_cli.cli, [str(path), "--json"]).output)
    assert as_json["language_model"] is None and as_json["architecture"]["codebook"] == "learned"
    assert info_cli.preset_name(preset_config("small-28-vqvae").to_dict()) == "small-28-vqvae"
    assert info_cli.preset_name(preset_config("small-28").to_dict()) == "small-28"


# -- lqae-train ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def npy_data(tmp_path_factory, fmnist_uint8):
    path = tmp_path_factory.mktemp("vq-data") / "fashion64.npy"
    np.save(path, fmnist_uint8[:64])
    return path


TINY_SETS = [arg for key, value in TINY_OVERRIDES.items() for arg in ("--set", f"{key}={value}")]


def train_args(out, npy_data, *extra):
    return ["--preset", "small-28-vqvae", "--data", str(npy_data), "--eval-data", str(npy_data), "--eval-images",
            "16", "--steps", "4", "--batch-size", "8", "--lr", "1e-3", "--save-every", "2", "--log-every", "2",
            "--device", "cpu", "--no-progress", "--out", str(out), *TINY_SETS, *extra]


def counted_over_1024_codes(usage: float) -> bool:
    """Usage is (codes seen) / 1024, not a fraction of an LM vocabulary: a whole number of 1024ths."""
    seen = usage * 1024
    return seen >= 1 and abs(seen - round(seen)) < 1e-9


class _Crash(RuntimeError):
    pass


def test_lqae_train_vqvae_preset_runs_and_resumes_exactly(tmp_path, npy_data, no_lm, monkeypatch):
    runner = CliRunner()
    straight = tmp_path / "straight"
    result = runner.invoke(train_cli.main, train_args(straight, npy_data))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    for r in train_records:
        assert r["mlm_loss"] == 0 and r["commitment_loss"] > 0
        assert r["loss"] == pytest.approx(r["reconstruction_loss"] + 1.5 * r["commitment_loss"], rel=1e-5)
        assert counted_over_1024_codes(r["codebook_usage"])
    model = load_checkpoint(straight / "checkpoint")
    assert isinstance(model, VQVAE) and model.quantizer.codebook_size == 1024
    config = model.checkpoint_config
    assert config["language_model"] is None and config["training"]["steps"] == 4
    assert config["metrics"]["eval_data"] == str(npy_data) and config["metrics"]["eval_images"] == 16
    assert counted_over_1024_codes(config["metrics"]["eval_codebook_usage"])

    # The same run, killed right after its step-2 checkpoint, then resumed with --resume.
    resumed = tmp_path / "resumed"
    real_save = _trainer._save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Crash("simulated crash after the step-2 checkpoint")

    monkeypatch.setattr(_trainer, "_save", save_then_crash)
    crashed = runner.invoke(train_cli.main, train_args(resumed, npy_data))
    assert isinstance(crashed.exception, _Crash)
    monkeypatch.setattr(_trainer, "_save", real_save)
    halfway = load_file(resumed / "checkpoint" / "model.safetensors")
    result = runner.invoke(train_cli.main, train_args(resumed, npy_data, "--resume"))
    assert result.exit_code == 0, result.output

    straight_w = load_file(straight / "checkpoint" / "model.safetensors")
    resumed_w = load_file(resumed / "checkpoint" / "model.safetensors")
    assert straight_w.keys() == resumed_w.keys() and "quantizer.codebook" in straight_w
    for name, tensor in straight_w.items():
        torch.testing.assert_close(resumed_w[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert float((straight_w["quantizer.codebook"] - halfway["quantizer.codebook"]).abs().max()) > 1e-4
    resumed_records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_records] == [r["step"] for r in records]
    for a, b in zip(records, resumed_records):
        for key in ("loss", "commitment_loss", "eval_psnr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_lqae_train_small_28_with_a_learned_codebook(tmp_path, npy_data, no_lm):
    out = tmp_path / "run"
    args = train_args(out, npy_data, "--set", "codebook=learned", "--set", "codebook_size=32", "--steps", "1")
    args[args.index("small-28-vqvae")] = "small-28"
    result = CliRunner().invoke(train_cli.main, args)
    assert result.exit_code == 0, result.output
    model = load_checkpoint(out / "checkpoint")
    assert isinstance(model, VQVAE) and model.quantizer.codebook_size == 32
    assert model.checkpoint_config["training"]["config"]["preset"] == "small-28"


@pytest.mark.parametrize("setting, message", [
    ("codebook=words", "codebook must be 'language' or 'learned', got 'words'"),
    ("codebook_size=0", "codebook_size must be an int >= 1, got 0"),
    ("codebook_size=big", "codebook_size='big': expected int"),
])
def test_lqae_train_rejects_bad_codebook_settings(tmp_path, monkeypatch, setting, message):
    monkeypatch.setattr(train_cli, "train", lambda cfg: pytest.fail("must not train"))
    result = CliRunner().invoke(train_cli.main, ["--preset", "small-28-vqvae", "--set", setting, "--out", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output, result.output



# -- LQAETokenizer on a VQ-VAE checkpoint ---------------------------------------------------
def test_the_tokenizer_reads_a_vqvae_checkpoint_without_any_language_model(tmp_path, no_lm, fmnist_uint8):
    from lqae_sklearn import LQAETokenizer

    model = tiny_vqvae().eval()
    path = save_checkpoint(model, tmp_path / "vq")
    images = fmnist_uint8[:6]
    expected_ids = model.encode(torch.from_numpy(images[:, None] / 255.0).float()).numpy()

    ids = LQAETokenizer(path, output="ids").fit().transform(images)
    np.testing.assert_array_equal(ids, expected_ids)
    tok = LQAETokenizer(path).fit()  # the default output: encoder features
    assert tok.layers_ == ["encoder.1"] and tok.transform(images).shape == (6, 64)
    assert len(tok.get_feature_names_out()) == 64
    assert LQAETokenizer(path, layers="last").fit().layers_ == ["encoder.1"]
    np.testing.assert_allclose(tok.inverse_transform(ids), model.decode(torch.from_numpy(ids)).detach().numpy()[:, 0],
                               atol=1e-6)

    with pytest.raises(ValueError, match="learned codebook .*output='ids' or 'embeddings'"):
        LQAETokenizer(path, output="text").fit()
    with pytest.raises(ValueError, match="no language model"):
        LQAETokenizer(path, layers="lm").fit()
    with pytest.raises(ValueError, match="VQ-VAE checkpoint with no language model"):
        LQAETokenizer(path, language_model="all-MiniLM-L6-v2").fit()
    with pytest.raises(ValueError, match="cannot be written as text"):
        tok.ids_to_text(ids)

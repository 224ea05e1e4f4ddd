"""The LQAE model: shapes and dtypes, presets, LM families, gradients, frozen LM, learning on real images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import RobertaConfig

from lqae_sklearn import LQAE, PRESETS, FrozenLanguageModel, LQAEConfig, load_checkpoint, preset_config
from lqae_sklearn.model import DEFAULT_CHECKPOINT

from conftest import TINY_OVERRIDES, fashion_mnist_subset, tiny_config


@pytest.fixture(scope="module")
def tiny_model(minilm):
    torch.manual_seed(0)
    return LQAE(tiny_config(), minilm).eval()


@pytest.fixture(scope="module")
def tiny_roberta():
    """A random RoBERTa-family LM (no download): vocab 64, width 32, 2 layers."""
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, pad_token_id=1,
    )
    return FrozenLanguageModel.from_hf_config(config, name="tiny-roberta")


# -- shapes and dtypes ----------------------------------------------------------------------
def test_encode_gives_int64_ids_per_patch(tiny_model, fmnist_batch, minilm):
    ids = tiny_model.encode(fmnist_batch)
    assert ids.dtype == torch.int64
    assert ids.shape == (16, tiny_model.config.num_tokens) == (16, 16)
    assert 0 <= ids.min() and ids.max() < minilm.vocab_size
    # Different images get different token sequences.
    assert len({tuple(row) for row in ids.tolist()}) > 1


def test_forward_shapes_and_loss_terms(tiny_model, fmnist_batch):
    out = tiny_model(fmnist_batch, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert out.reconstruction.shape == fmnist_batch.shape
    assert out.ids.shape == out.mask.shape == (16, 16)
    assert out.mask.dtype == torch.bool and 0 < out.mask.sum() < out.mask.numel()
    for term in (out.loss, out.reconstruction_loss, out.commitment_loss, out.mlm_loss):
        assert term.shape == () and term.dtype == torch.float32 and torch.isfinite(term)
    torch.testing.assert_close(out.reconstruction_loss, F.mse_loss(out.reconstruction, fmnist_batch))


def test_loss_terms_recomputed_from_their_definitions(tiny_model, fmnist_batch, minilm):
    """Each term from the method's definition, not from the model's code: commitment on the rescaled
    latents, <mask> rows in the LM's input, the MLM cross-entropy over masked positions only, and the
    official weights (commitment 0.01, MLM 1e-4)."""
    lm_inputs = []
    hook = minilm.register_forward_pre_hook(lambda module, args: lm_inputs.append(args[0].detach()))
    try:
        out = tiny_model(fmnist_batch, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    codebook, mask = minilm.codebook, out.mask
    assert 0 < mask.sum() < mask.numel()

    with torch.no_grad():
        z = tiny_model.encoder(fmnist_batch)
    q = codebook[out.ids]
    assert tiny_model.config.normalize_latents  # the small-28 preset's choice
    z_scaled = F.normalize(z, dim=-1) * q.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out.commitment_loss, ((z_scaled - q) ** 2).mean())

    # The LM reads the image's words, with the <mask> word's embedding row at the masked positions.
    (lm_input,) = lm_inputs
    expected_input = torch.where(mask.unsqueeze(-1), codebook[minilm.mask_token_id], q)
    assert torch.equal(lm_input[mask], expected_input[mask])
    # Unmasked: the straight-through sum z + (q - z), which equals q up to float32 rounding.
    torch.testing.assert_close(lm_input[~mask], expected_input[~mask], rtol=0, atol=1e-6)

    with torch.no_grad():
        per_token = F.cross_entropy(minilm.mlm_logits(minilm(expected_input)).flatten(0, 1),
                                    out.ids.flatten(), reduction="none").view(mask.shape)
    torch.testing.assert_close(out.mlm_loss, per_token[mask].mean())
    assert abs(per_token[mask].mean() - per_token.mean()) > 1e-3  # so "masked only" is what was measured

    assert (tiny_model.config.commitment_weight, tiny_model.config.mlm_weight) == (0.01, 1e-4)
    expected = out.reconstruction_loss + 0.01 * out.commitment_loss + 1e-4 * out.mlm_loss
    torch.testing.assert_close(out.loss, expected)


def test_eval_forward_masks_nothing(tiny_model, fmnist_batch):
    out = tiny_model(fmnist_batch)  # eval mode: mask ratio 0
    assert not out.mask.any()
    assert out.mlm_loss == 0
    assert torch.equal(out.ids, tiny_model.encode(fmnist_batch))


def test_decode_is_the_forward_reconstruction_clamped_to_unit_range(tiny_model, fmnist_batch):
    ids = tiny_model.encode(fmnist_batch)
    images = tiny_model.decode(ids)
    assert images.shape == fmnist_batch.shape and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    raw = tiny_model(fmnist_batch, mask_ratio=0.0).reconstruction
    torch.testing.assert_close(images, raw.clamp(0, 1))


def test_features_width_and_layers(tiny_model, fmnist_batch, minilm):
    names = tiny_model.feature_layer_names()
    assert names == ["encoder.1"] + [f"lm.{i}" for i in range(minilm.num_layers + 1)]
    enc = tiny_model.features(fmnist_batch, ["encoder.1"])
    assert enc.shape == (16, TINY_OVERRIDES["encoder_dim"]) and enc.dtype == torch.float32
    both = tiny_model.features(fmnist_batch, ["encoder.1", "lm.6"])
    assert both.shape == (16, TINY_OVERRIDES["encoder_dim"] + minilm.hidden_size)
    torch.testing.assert_close(both[:, : enc.shape[1]], enc)
    # lm.6 is the token-averaged last hidden state of the unmasked ids.
    last = minilm(tiny_model.embed_ids(tiny_model.encode(fmnist_batch))).mean(dim=1)
    torch.testing.assert_close(both[:, enc.shape[1] :], last)


def test_three_channel_inputs(minilm):
    torch.manual_seed(0)
    model = LQAE(tiny_config(in_channels=3), minilm).eval()
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert model.encode(x).shape == (2, 16)
    assert model(x).reconstruction.shape == (2, 3, 28, 28)
    # A colour change must be able to change the tokens: the encoder sees all three channels.
    x2 = x.clone()
    x2[:, 2] = 1 - x2[:, 2]
    assert not torch.equal(model.encoder(x), model.encoder(x2))


# -- configs and presets --------------------------------------------------------------------
def test_image_size_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match=r"image_size=30 is not divisible by patch_size=4"):
        preset_config("small-28", image_size=30)
    with pytest.raises(ValueError, match=r"encoder_dim=100 is not divisible by encoder_heads=3"):
        LQAEConfig(encoder_dim=100, encoder_heads=3)
    with pytest.raises(ValueError, match=r"in_channels must be 1 or 3, got 2"):
        LQAEConfig(in_channels=2)
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(ValueError, match=r"unknown LQAEConfig fields: \['colour'\]"):
        LQAEConfig.from_dict({**LQAEConfig().to_dict(), "colour": 1})


def test_presets_build():
    paper = preset_config("paper")
    assert (paper.image_size, paper.in_channels, paper.patch_size, paper.num_tokens) == (256, 3, 16, 256)
    assert (paper.encoder_dim, paper.encoder_depth, paper.decoder_dim, paper.decoder_depth) == (768, 12, 768, 12)
    assert paper.block == "lqae" and paper.language_model == "roberta-base"
    # The official settings the paper preset must keep (shared/reference: mask ratio 0.5, no rescaling).
    assert paper.mask_ratio == 0.5 and paper.normalize_latents is False
    assert (paper.commitment_weight, paper.mlm_weight) == (0.01, 1e-4)
    assert preset_config("small-28").num_tokens == 49
    assert preset_config("small-rgb").in_channels == 3
    for name in PRESETS:
        config = preset_config(name)
        assert LQAEConfig.from_dict(config.to_dict()) == config


def test_small_28_preset_instantiates(minilm):
    model = LQAE(preset_config("small-28"), minilm)
    assert model.encoder.patch_embed.weight.shape == (256, 1, 4, 4)
    assert model.decoder.to_pixels.out_features == 16
    assert not any(k.startswith(("language_model.", "quantizer.")) for k in model.trainable_state_dict())


def test_roberta_family_lm_with_mlm_head(tiny_roberta):
    lm = tiny_roberta
    assert lm.mask_token_id == 63  # RoBERTa's <mask> is the last row
    assert lm.excluded_token_ids() == [63]
    assert lm.mlm_head is not None and type(lm.mlm_head).__name__ == "RobertaLMHead"
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    logits = lm.mlm_logits(hidden)
    assert logits.shape == (5, 64)
    torch.testing.assert_close(logits, lm.mlm_head(hidden))
    # The head (dense + LN + decoder) is used, not a bare projection onto the embeddings.
    assert not torch.allclose(logits, hidden @ lm.codebook.T)


def test_paper_block_with_roberta_lm_forward_and_backward(tiny_roberta):
    # The paper preset's architecture (official block, RGB) at a test-sized width and image.
    config = preset_config(
        "paper", image_size=32, encoder_dim=32, encoder_depth=1, encoder_heads=2,
        decoder_dim=32, decoder_depth=1, decoder_heads=2, language_model="tiny-roberta", mask_ratio=0.9,
    )
    torch.manual_seed(0)
    model = LQAE(config, tiny_roberta).train()
    assert type(model.encoder.transformer.blocks[0].ffn).__name__ == "ConvGLU"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model(x, generator=torch.Generator().manual_seed(2))
    assert out.ids.shape == (3, 4) and out.reconstruction.shape == (3, 3, 32, 32)
    assert out.mask.any() and out.mlm_loss > 0 and torch.isfinite(out.loss)
    assert 63 not in out.ids.tolist()  # the mask token is never an image word
    out.loss.backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_roberta.parameters())


def test_bert_without_trained_head_ties_logits_to_embeddings(minilm):
    # all-MiniLM-L6-v2 ships no MLM head: logits are the dot product with the frozen embeddings.
    assert minilm.mlm_head is None
    hidden = torch.randn(3, minilm.hidden_size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(minilm.mlm_logits(hidden), hidden @ minilm.codebook.T)
    assert minilm.mask_token_id == minilm.tokenizer.mask_token_id == 103


# -- gradients ------------------------------------------------------------------------------
def test_gradient_reaches_patch_embedding_through_straight_through(minilm, fmnist_batch):
    # With no commitment or MLM loss, pixels -> decoder -> LM -> straight-through is the only path
    # from the loss back to the encoder.
    torch.manual_seed(0)
    model = LQAE(tiny_config(commitment_weight=0.0, mlm_weight=0.0, mask_ratio=0.0), minilm).train()
    out = model(fmnist_batch[:4])
    out.loss.backward()
    grad = model.encoder.patch_embed.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    assert all(p.grad is None for p in minilm.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())


# -- training a few steps: the loss falls, the LM never changes --------------------------------
@pytest.fixture(scope="module")
def short_training(minilm, fmnist_batch):
    """20 AdamW steps on 8 fixed real images; LM state captured before and after."""
    images = fmnist_batch[:8]
    torch.manual_seed(0)
    model = LQAE(tiny_config(), minilm)
    lm_before = {k: v.clone() for k, v in minilm.state_dict().items()}
    normed_before = model.quantizer.normed.clone()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.05)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = float(model(images).reconstruction_loss)
        model.train()
        return loss

    before = eval_loss()
    lm_modes = []
    for step in range(20):
        out = model(images, generator=torch.Generator().manual_seed(step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm_modes.append({m.training for m in minilm.modules()})
    return dict(
        model=model, images=images, before=before, after=eval_loss(), optimizer=optimizer,
        lm_before=lm_before, normed_before=normed_before, lm_modes=lm_modes,
    )


def test_loss_falls_on_real_images(short_training):
    before, after, images = short_training["before"], short_training["after"], short_training["images"]
    # Eval-mode (unmasked) MSE on the same images; the untrained decoder outputs ~0 (all black).
    assert after < 0.6 * before, f"reconstruction MSE {before:.4f} -> {after:.4f}"
    assert after < 0.6 * float((images**2).mean())


def test_lm_weights_and_codebook_bit_identical_after_training(short_training, minilm):
    after = minilm.state_dict()
    assert after.keys() == short_training["lm_before"].keys()
    for name, tensor in short_training["lm_before"].items():
        assert torch.equal(tensor, after[name]), f"frozen LM tensor {name} changed"
    assert torch.equal(short_training["normed_before"], short_training["model"].quantizer.normed)
    assert all(not p.requires_grad for p in minilm.parameters())
    # The optimizer holds only encoder/decoder parameters.
    lm_ids = {id(p) for p in minilm.parameters()}
    optimized = [p for g in short_training["optimizer"].param_groups for p in g["params"]]
    assert optimized and not any(id(p) in lm_ids for p in optimized)


def test_lm_stays_in_eval_mode_without_dropout(short_training, minilm):
    model = short_training["model"]
    model.train()
    assert model.training and model.encoder.training
    assert short_training["lm_modes"] and all(modes == {False} for modes in short_training["lm_modes"])
    assert not any(m.training for m in minilm.modules())
    # The config has dropout; in train mode it would make two passes differ.
    assert minilm.encoder.config.hidden_dropout_prob > 0
    embeds = model.embed_ids(model.encode(short_training["images"]))
    with torch.no_grad():
        assert torch.equal(minilm(embeds), minilm(embeds))


# -- the shipped checkpoint -------------------------------------------------------------------
@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="the default checkpoint is not shipped in this tree")
def test_shipped_checkpoint_reconstructs_fashion_mnist(minilm):
    model = load_checkpoint(DEFAULT_CHECKPOINT, language_model=minilm)
    images, _ = fashion_mnist_subset("test")
    x = torch.from_numpy(images[:16].astype(np.float32) / 255).unsqueeze(1)
    with torch.no_grad():
        recon = model.decode(model.encode(x))
    psnr = 10 * math.log10(1 / float(((recon - x) ** 2).mean()))
    recorded = model.checkpoint_config["metrics"]["eval_psnr"]
    assert psnr > recorded - 1.5, f"PSNR {psnr:.2f} dB on 16 test images, checkpoint records {recorded:.2f} dB"
    assert psnr > 15  # far above the ~5-10 dB of an untrained model

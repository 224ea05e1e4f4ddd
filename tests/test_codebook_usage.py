"""A codebook that is used: the LQAE's low-dimensional search projection (``search_dim``, the official
``quantizer_latent_dim``), its SimVQ-style map over the frozen rows (``codebook_map``), and the VQ-VAE's
k-means initialisation and dead-code restarts.

For each option: off by default, the search exact in the space it searches, gradients where they should go,
checkpoint round trips, checkpoints written before the options existed, and (restarts) exact resumption,
equal codebooks under DDP and a higher codebook usage after a short training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lqae_sklearn import LQAE, LQAEConfig, load_checkpoint, save_checkpoint
from lqae_sklearn.model import (
    DEFAULT_CHECKPOINT, PRESETS, VQVAE, LanguageQuantizer, LearnedQuantizer, ProjectedLanguageQuantizer,
    preset_config,
)
from lqae_sklearn.model._config import RESTART_UNUSED_AFTER
from lqae_sklearn.training import TrainConfig, train

from conftest import TINY_OVERRIDES, fashion_mnist_subset, tiny_config

BEFORE = Path(__file__).parent / "data" / "checkpoints-before-codebook-options"


def brute_force_projected_nearest(quantizer: ProjectedLanguageQuantizer, x: torch.Tensor, codebook, excluded):
    """float64 cosine argmax between the mapped x and the mapped allowed rows, independently of the quantizer."""
    def mapped(layer, v):
        if isinstance(layer, torch.nn.Identity):
            return F.normalize(v.double(), dim=-1)
        bias = 0 if layer.bias is None else layer.bias.detach().double()
        return F.normalize(v.double() @ layer.weight.detach().double().T + bias, dim=-1)

    scores = mapped(quantizer.input_map, x.reshape(-1, x.shape[-1])) @ mapped(quantizer.code_map, codebook).T
    scores[:, list(excluded)] = -np.inf
    return scores.argmax(dim=1).view(x.shape[:-1])


def official_latent_quantizer_loss(x, q, input_map, code_map, c):
    """The official LanguageQuantizer's training loss with quantizer_latent_dim > 0, written from its code
    (lhao499/language-quantized-autoencoders at 79cd033, lqae/models/lqae.py): ``get_train_loss`` (lines
    168-195) is ``c * mean((sg(q) - x)^2) + mean((q - sg(x))^2)``; ``__call__`` stops the gradient of the
    chosen raw row q (line 116), runs it on (q, x) and on (code_to_latent(q), input_to_latent(x)) and adds
    the two (lines 117-132)."""
    def get_train_loss(q, x):
        return c * ((q.detach() - x) ** 2).mean() + ((q - x.detach()) ** 2).mean()

    q = q.detach()
    return get_train_loss(q, x) + get_train_loss(code_map(q), input_map(x))


# -- the search projection: config ----------------------------------------------------------------------
def test_search_projection_is_off_by_default_as_in_the_official_readme_run(minilm):
    assert (LQAEConfig().search_dim, LQAEConfig().codebook_map) == (0, False)
    assert all(preset_config(name).search_dim == 0 and not preset_config(name).codebook_map for name in PRESETS)
    model = LQAE(tiny_config(), minilm)
    assert type(model.quantizer) is LanguageQuantizer and list(model.quantizer.parameters()) == []
    projected = LQAE(tiny_config(search_dim=8), minilm)
    assert type(projected.quantizer) is ProjectedLanguageQuantizer and projected.quantizer.search_dim == 8


@pytest.mark.parametrize("overrides, message", [
    (dict(search_dim=-1), "search_dim must be an int >= 0, got -1"),
    (dict(search_dim=2.5), "search_dim must be an int >= 0, got 2.5"),
    (dict(search_dim=True), "search_dim must be an int >= 0, got True"),
    (dict(codebook="learned", search_dim=8), "search_dim=8 needs codebook='language'"),
    (dict(restart_unused_after=-3, codebook="learned"), "restart_unused_after must be an int >= 0, got -3"),
    (dict(kmeans_init="yes", codebook="learned"), "kmeans_init must be True or False, got 'yes'"),
    (dict(codebook_map=1), "codebook_map must be True or False, got 1"),
    (dict(codebook_map=True, codebook="learned"), "codebook_map=True needs codebook='language'"),
    (dict(codebook_map=True, search_dim=8), "codebook_map=True and search_dim=8 are two searches: choose one"),
    (dict(kmeans_init=True), "kmeans_init=True needs codebook='learned'"),
    (dict(restart_unused_after=10), "restart_unused_after=10 needs codebook='learned'"),
])
def test_config_validation_names_the_bad_option(overrides, message):
    with pytest.raises(ValueError) as info:
        LQAEConfig(**overrides)
    assert str(info.value).startswith(message)


# -- the search projection: the quantizer ---------------------------------------------------------------
def test_projected_search_is_the_exact_argmax_in_the_projected_space():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(900, 24, generator=g) * torch.rand(900, 1, generator=g) * 3
    excluded = torch.randperm(900, generator=g)[:50].tolist()
    torch.manual_seed(0)
    quantizer = ProjectedLanguageQuantizer(codebook, excluded, search_dim=6)
    x = torch.randn(3, 70, 24, generator=g) * 4
    ids = quantizer.nearest(x)
    assert ids.shape == (3, 70) and ids.dtype == torch.int64 and not set(ids.flatten().tolist()) & set(excluded)
    assert torch.equal(ids, brute_force_projected_nearest(quantizer, x, codebook, excluded))
    # It searches the projected space, not the raw one: the raw-space search picks other words.
    raw = LanguageQuantizer(codebook, excluded).nearest(x)
    assert (raw != ids).float().mean() > 0.5
    # Searching in pieces, and under bf16 autocast, changes nothing.
    quantizer.max_scores = 900 * 7
    assert torch.equal(quantizer.nearest(x), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(quantizer.nearest(x), ids)  # float32, not bf16 matmuls
    assert quantizer.nearest(x[:, :0]).shape == (3, 0)


def test_projected_search_on_the_minilm_codebook(minilm):
    codebook, excluded = minilm.codebook.detach(), minilm.excluded_token_ids()
    torch.manual_seed(1)
    quantizer = ProjectedLanguageQuantizer(codebook, excluded, search_dim=32)
    x = torch.randn(64, codebook.shape[1], generator=torch.Generator().manual_seed(2))
    assert torch.equal(quantizer.nearest(x), brute_force_projected_nearest(quantizer, x, codebook, excluded))


def test_codebook_map_starts_as_the_plain_search_then_searches_the_mapped_rows():
    g = torch.Generator().manual_seed(6)
    codebook = torch.randn(700, 16, generator=g) * torch.rand(700, 1, generator=g) * 3
    excluded = [0, 3, 699]
    quantizer = ProjectedLanguageQuantizer(codebook, excluded, search_dim=16, map_latents=False)
    x = torch.randn(5, 40, 16, generator=g)
    assert isinstance(quantizer.input_map, torch.nn.Identity) and quantizer.search_dim == 16
    plain = LanguageQuantizer(codebook, excluded).nearest(x)
    assert torch.equal(quantizer.nearest(x), plain)  # identity map, zero bias: the plain search
    assert quantizer.code_map.bias is None  # SimVQ's C W: a linear map
    with torch.no_grad():
        quantizer.code_map.weight.add_(0.5 * torch.randn(16, 16, generator=g))
    ids = quantizer.nearest(x)
    assert torch.equal(ids, brute_force_projected_nearest(quantizer, x, codebook, excluded))
    assert (ids != plain).float().mean() > 0.5
    # The map's term trains the map only, the commitment (raw and mapped rows) x only; x is passed on raw.
    xg = x.clone().requires_grad_()
    out, ids, codebook_loss, commitment = quantizer(xg, codebook)
    q, wq = codebook[ids], quantizer.code_map(codebook[ids]).detach()
    torch.testing.assert_close(out, q, rtol=0, atol=1e-6)
    torch.testing.assert_close(commitment, 0.5 * (F.mse_loss(x, q) + F.mse_loss(x, wq)))
    torch.testing.assert_close(codebook_loss, F.mse_loss(wq, x))
    assert torch.autograd.grad(codebook_loss, xg, allow_unused=True, retain_graph=True)[0] is None
    assert torch.autograd.grad(commitment, list(quantizer.parameters()), allow_unused=True) == (None,)
    with pytest.raises(ValueError, match=r"the rows' own \(16\), got 8"):
        ProjectedLanguageQuantizer(codebook, excluded, search_dim=8, map_latents=False)


def test_projected_quantizer_passes_on_raw_rows_and_trains_each_side_as_the_official_code():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(300, 16, generator=g)
    torch.manual_seed(3)
    quantizer = ProjectedLanguageQuantizer(codebook, [0, 1], search_dim=4)
    x = (torch.randn(2, 9, 16, generator=g) * 2).requires_grad_()
    out, ids, codebook_loss, commitment = quantizer(x, codebook)
    assert torch.equal(ids, quantizer.nearest(x))
    torch.testing.assert_close(out, codebook[ids], rtol=0, atol=1e-6)  # the raw row, not a projected one
    q = codebook[ids]
    maps = dict(quantizer.named_parameters())
    assert sorted(maps) == ["code_map.bias", "code_map.weight", "input_map.bias", "input_map.weight"]
    px, pq = quantizer.input_map(x), quantizer.code_map(q)
    torch.testing.assert_close(codebook_loss, F.mse_loss(pq, px))
    torch.testing.assert_close(commitment, 0.5 * (F.mse_loss(x, q) + F.mse_loss(px, pq)))

    def grads(loss):
        got = torch.autograd.grad(loss, [x, *maps.values()], allow_unused=True, retain_graph=True)
        return {name: g for name, g in zip(["x", *maps], got) if g is not None and g.abs().sum() > 0}

    # The map's term moves the code map only; the commitment moves x and the input map; the
    # straight-through output passes the gradient to x unchanged and to no map.
    assert sorted(grads(codebook_loss)) == ["code_map.bias", "code_map.weight"]
    assert sorted(grads(commitment)) == ["input_map.bias", "input_map.weight", "x"]
    upstream = torch.randn(out.shape, generator=g)
    assert sorted(grads((out * upstream).sum())) == ["x"]
    assert torch.equal(torch.autograd.grad(out, x, upstream, retain_graph=True)[0], upstream)

    # Against the official loss with its README commitment c = 0.005 on each branch (our weight 0.01):
    weight = tiny_config().commitment_weight
    ours = codebook_loss + weight * commitment
    official = official_latent_quantizer_loss(x, q, quantizer.input_map, quantizer.code_map, c=weight / 2)
    for name, a, b in zip(["x", *maps], torch.autograd.grad(ours, [x, *maps.values()], retain_graph=True),
                          torch.autograd.grad(official, [x, *maps.values()])):
        torch.testing.assert_close(a, b, msg=name)


SEARCH_OPTIONS = [dict(search_dim=16), dict(codebook_map=True)]


@pytest.mark.parametrize("option", SEARCH_OPTIONS, ids=["search_dim", "codebook_map"])
def test_lqae_with_a_learned_search_feeds_the_lm_its_raw_word_embeddings(minilm, fmnist_batch, option):
    torch.manual_seed(0)
    model = LQAE(tiny_config(**option), minilm).train()
    if option.get("codebook_map"):  # it starts as the plain search: move the map so that the searches differ
        with torch.no_grad():
            model.quantizer.code_map.weight.add_(0.3 * torch.randn(384, 384, generator=torch.Generator().manual_seed(0)))
    seen = []
    handle = minilm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        out = model(fmnist_batch, mask_ratio=0.0)
    finally:
        handle.remove()
    codebook = minilm.codebook.detach()
    torch.testing.assert_close(seen[0].float(), codebook[out.ids], rtol=0, atol=1e-5)
    z = model.encoder(fmnist_batch)
    assert torch.equal(out.ids, model.quantizer.nearest(z))
    assert (out.ids != LanguageQuantizer(codebook, minilm.excluded_token_ids()).nearest(z)).any()
    # Loss = reconstruction + the map's term + weight x commitment (+ MLM, 0 here: nothing masked).
    _, _, codebook_loss, commitment = model.quantizer(z, minilm.codebook, model.config.normalize_latents)
    torch.testing.assert_close(out.commitment_loss, commitment)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + codebook_loss + 0.01 * commitment)
    out.loss.backward()
    assert all(p.grad is None for p in minilm.parameters())  # the LM and its codebook stay frozen
    maps = [p for p in model.quantizer.parameters()]
    assert len(maps) == (4 if option.get("search_dim") else 1) and all(p.grad.abs().sum() > 0 for p in maps)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    # encode() searches the same projected space.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode(fmnist_batch), model.quantizer.nearest(model.encoder(fmnist_batch)))


@pytest.mark.parametrize("option", SEARCH_OPTIONS, ids=["search_dim", "codebook_map"])
@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_a_learned_search_round_trips_through_a_checkpoint(tmp_path, minilm, fmnist_batch, name, option):
    torch.manual_seed(4)
    model = LQAE(tiny_config(**option), minilm).eval()
    with torch.no_grad():  # a non-default value, so a map left at its init would show
        model.quantizer.code_map.weight.add_(0.3 * torch.randn(model.quantizer.code_map.weight.shape))
    path = save_checkpoint(model, tmp_path / name)
    loaded = load_checkpoint(path, language_model=minilm)
    assert loaded.config == model.config and type(loaded.quantizer) is ProjectedLanguageQuantizer
    assert {f"quantizer.{p}" for p, _ in model.quantizer.named_parameters()} <= set(loaded.trainable_state_dict())
    with torch.no_grad():
        ids = model.encode(fmnist_batch)
        assert torch.equal(loaded.encode(fmnist_batch), ids)
        torch.manual_seed(5)
        other = LQAE(tiny_config(**option), minilm).eval()
        other.load_state_dict(model.trainable_state_dict(), strict=False)
        other.quantizer.code_map.weight.mul_(-1)  # the comparison can fail: another map, other ids
        assert not torch.equal(other.encode(fmnist_batch), ids)


# -- checkpoints written before the options existed -----------------------------------------------------
@pytest.fixture(scope="module")
def recorded_ids():
    return json.loads((BEFORE / "ids.json").read_text())


@pytest.fixture(scope="module")
def first_test_images() -> torch.Tensor:
    images, _ = fashion_mnist_subset("test")
    return torch.from_numpy(images[:32].astype(np.float32) / 255).unsqueeze(1)


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="the default checkpoint is not shipped in this tree")
def test_the_shipped_checkpoint_loads_with_every_option_off_and_gives_its_recorded_ids(minilm, recorded_ids,
                                                                                       first_test_images):
    stored = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["model"]
    new_fields = {"search_dim", "codebook_map", "kmeans_init", "restart_unused_after"}
    assert not new_fields & set(stored)  # written before them
    model = load_checkpoint(DEFAULT_CHECKPOINT, language_model=minilm)
    assert {name: getattr(model.config, name) for name in new_fields} == dict.fromkeys(new_fields, 0)
    assert type(model.quantizer) is LanguageQuantizer
    with torch.no_grad():
        ids = model.encode(first_test_images)
    assert ids.tolist() == recorded_ids["fashion-mnist-small-28"]


def test_a_vqvae_saved_before_the_options_loads_and_gives_its_recorded_ids(recorded_ids, first_test_images):
    stored = json.loads((BEFORE / "vqvae-tiny" / "config.json").read_text())["model"]
    assert stored["codebook"] == "learned" and "kmeans_init" not in stored
    model = load_checkpoint(BEFORE / "vqvae-tiny")
    assert isinstance(model, VQVAE) and set(model.state_dict()) == set(model.trainable_state_dict())
    assert not any(name.endswith(("kmeans_done", "calls_unused")) for name in model.state_dict())
    with torch.no_grad():
        ids = model.encode(first_test_images)
    assert ids.tolist() == recorded_ids["vqvae-tiny"] and len(ids.unique()) > 1


# -- k-means initialisation and dead-code restarts: the quantizer -----------------------------------------
def blobs(n_per_blob: int, centers: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (centers.repeat_interleave(n_per_blob, 0) + 0.05 * torch.randn(len(centers) * n_per_blob, centers.shape[1],
                                                                           generator=g))


def test_kmeans_init_sets_the_codes_to_lloyd_centroids_of_the_first_training_batch():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 8, generator=g) * 4
    x = blobs(40, centers, seed=1)[torch.randperm(240, generator=g)].view(4, 60, 8)
    flat = x.reshape(-1, 8)
    torch.manual_seed(0)
    quantizer = LearnedQuantizer(6, 8, kmeans_init=True)
    assert quantizer.state_dict()["kmeans_done"].item() is False
    quantizer.eval()
    quantizer(x)  # inference: no initialisation
    assert not quantizer.kmeans_done
    quantizer.train()
    _, ids, _, _ = quantizer(x, torch.Generator().manual_seed(2))
    codes = quantizer.codebook.detach()
    assert quantizer.kmeans_done
    # Lloyd's fixed point: each code is the mean of the latents that choose it, and each is chosen.
    ids = ids.flatten()
    assert torch.equal(ids, torch.cdist(flat, codes).argmin(dim=1))
    for code in range(6):
        assert (ids == code).any(), code
        torch.testing.assert_close(codes[code], flat[ids == code].mean(dim=0))
    # ... reached from distinct latents drawn by the generator, with a lower quantization error.
    start = flat[torch.randperm(240, generator=torch.Generator().manual_seed(2))[:6]]
    error = lambda c: float(torch.cdist(flat, c).min(dim=1).values.pow(2).mean())  # noqa: E731
    assert error(codes) < 0.5 * error(start)
    # Later training steps do not initialise again.
    quantizer(x * 3, torch.Generator().manual_seed(3))
    assert torch.equal(quantizer.codebook.detach(), codes)


def test_kmeans_init_starts_from_the_generator_draw():
    x = torch.randn(2, 50, 4, generator=torch.Generator().manual_seed(0))

    def initialised(seed):
        torch.manual_seed(0)
        quantizer = LearnedQuantizer(10, 4, kmeans_init=True)
        quantizer(x, torch.Generator().manual_seed(seed))
        return quantizer.codebook.detach()

    assert torch.equal(initialised(1), initialised(1))
    assert not torch.equal(initialised(1), initialised(2))


def test_a_code_unused_for_n_training_batches_is_reseeded_from_the_current_batch():
    torch.manual_seed(0)
    quantizer = LearnedQuantizer(8, 4, restart_unused_after=2)
    with torch.no_grad():
        quantizer.codebook[4:] += 100.0  # codes 4-7 are far from every latent: never chosen
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 10, 4, generator=g) for _ in range(3)]
    start = quantizer.codebook.detach().clone()
    for batch in batches[:2]:
        _, ids, _, _ = quantizer(batch, g)
        assert ids.max() < 4
    assert quantizer.calls_unused[4:].tolist() == [2, 2, 2, 2]
    assert torch.equal(quantizer.codebook[4:].detach(), start[4:])  # not yet: restarts come before the search
    assert (quantizer.calls_unused[:4] < 2).all()
    quantizer.eval()
    quantizer(batches[2])  # inference neither counts nor restarts
    assert quantizer.calls_unused[4:].tolist() == [2, 2, 2, 2]
    quantizer.train()
    dead = quantizer.calls_unused >= 2
    before = quantizer.codebook.detach().clone()
    _, ids, _, _ = quantizer(batches[2], g)
    codes = quantizer.codebook.detach()
    assert torch.equal(codes[~dead], before[~dead])  # live codes are untouched
    flat = batches[2].reshape(-1, 4)
    for code in dead.nonzero().flatten().tolist():  # each dead code is now a distinct latent of this batch...
        matches = (flat == codes[code]).all(dim=1).nonzero().flatten()
        assert len(matches) == 1, code
        assert ids.flatten()[matches[0]] == code  # ... which chooses it
    assert len(codes[dead].unique(dim=0)) == int(dead.sum())
    assert quantizer.calls_unused[4:].tolist() == [0, 0, 0, 0]


# -- presets and checkpoints ----------------------------------------------------------------------------
def test_the_official_vqvae_preset_keeps_both_off_and_the_restarts_preset_turns_them_on():
    plain, restarts = preset_config("small-28-vqvae"), preset_config("small-28-vqvae-restarts")
    assert (plain.kmeans_init, plain.restart_unused_after) == (False, 0)
    assert (restarts.kmeans_init, restarts.restart_unused_after) == (True, RESTART_UNUSED_AFTER)
    differ = {k for k, v in plain.to_dict().items() if restarts.to_dict()[k] != v}
    assert differ == {"kmeans_init", "restart_unused_after"}
    assert LQAEConfig.from_dict(restarts.to_dict()) == restarts


@pytest.mark.parametrize("name", ["ckpt", "ckpt.safetensors"])
def test_restart_state_round_trips_through_a_checkpoint(tmp_path, fmnist_batch, name):
    torch.manual_seed(0)
    model = VQVAE(preset_config("small-28-vqvae-restarts", **TINY_OVERRIDES, codebook_size=64,
                                restart_unused_after=3)).train()
    g = torch.Generator().manual_seed(0)
    for step in range(4):  # k-means on 16 images, then batches of 2 (32 latents): some codes unused
        model(fmnist_batch if step == 0 else fmnist_batch[2 * step : 2 * step + 2], generator=g)
    state = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    assert state["kmeans_done"] and state["calls_unused"].max() > 0
    loaded = load_checkpoint(save_checkpoint(model.eval(), tmp_path / name))
    for key, value in state.items():
        assert torch.equal(loaded.quantizer.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded.encode(fmnist_batch), model.encode(fmnist_batch))
    # A loaded, initialised quantizer never runs k-means again.
    loaded.train()
    codebook = loaded.quantizer.codebook.detach().clone()
    loaded.quantizer.restart_unused_after = 10**6  # isolate the initialisation from restarts
    loaded(fmnist_batch, generator=torch.Generator().manual_seed(9))
    assert torch.equal(loaded.quantizer.codebook.detach(), codebook)


# -- training ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("usage-data")
    train_images, _ = fashion_mnist_subset("train")
    test_images, _ = fashion_mnist_subset("test")
    np.save(folder / "train.npy", train_images)
    np.save(folder / "test.npy", test_images)
    return folder / "train.npy", folder / "test.npy"


def eval_usage(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_codebook_usage" in r][-1]["eval_codebook_usage"]


def _train_tiny_vqvae(out: Path, preset: str, train_npy: Path, test_npy: Path) -> float:
    overrides = {**TINY_OVERRIDES, "codebook_size": 256}
    if preset.endswith("restarts"):
        overrides["restart_unused_after"] = 10
    train(TrainConfig(out_dir=str(out), preset=preset, model_overrides=overrides, data=str(train_npy),
                      eval_data=str(test_npy), eval_images=500, steps=60, batch_size=32, lr=1e-3,
                      crop_scale=(0.5, 1.0), save_every=60, log_every=30, device="cpu", progress=False))
    return eval_usage(out)


def test_a_short_training_with_restarts_uses_more_of_the_codebook(tmp_path, data_files):
    """60 steps of 32 real images, 256 codes; usage measured on 500 held-out test images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits on a shared machine
    try:
        usage = {preset: _train_tiny_vqvae(tmp_path / preset, preset, *data_files)
                 for preset in ("small-28-vqvae", "small-28-vqvae-restarts")}
    finally:
        torch.set_num_threads(threads)
    print(f"\ncodebook usage on 500 test images after 60 steps x 32: {usage}")
    assert usage["small-28-vqvae-restarts"] > 3 * usage["small-28-vqvae"]
    assert usage["small-28-vqvae-restarts"] > 0.25


def test_restarts_keep_the_codebooks_of_ddp_ranks_equal(tmp_path):
    """Two gloo processes quantize different latents; k-means and restarts must leave both with one codebook."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        "from lqae_sklearn.model import LearnedQuantizer\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "torch.manual_seed(0)\n"
        "quantizer = LearnedQuantizer(16, 4, kmeans_init=True, restart_unused_after=2)\n"
        "g = torch.Generator().manual_seed(100 + rank)\n"
        "restarted = 0\n"
        "for step in range(6):\n"
        "    x = torch.randn(3, 8, 4, generator=g) * (1 + rank) + step\n"
        "    before = quantizer.codebook.detach().clone()\n"
        "    quantizer(x, g)\n"
        "    restarted += int((quantizer.codebook.detach() != before).any(dim=1).sum())\n"
        "codebooks = [torch.zeros(16, 4) for _ in range(2)]\n"
        "dist.all_gather(codebooks, quantizer.codebook.detach())\n"
        "counters = [torch.zeros(16, dtype=torch.long) for _ in range(2)]\n"
        "dist.all_gather(counters, quantizer.calls_unused)\n"
        "if rank == 0:\n"
        "    print(json.dumps({'equal': torch.equal(*codebooks), 'counters_equal': torch.equal(*counters),\n"
        "                      'restarted': restarted}))\n"
        "dist.destroy_process_group()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["restarted"] > 16  # k-means moved every code, and restarts moved some later
    assert report["equal"] and report["counters_equal"], report

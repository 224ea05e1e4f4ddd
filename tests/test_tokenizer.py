"""LQAETokenizer: outputs, inputs, errors, pickling, caching, feature names.

Runs against the shipped checkpoint when it is installed, else against an
untrained small-28 checkpoint written once per session (the behaviour under
test does not depend on training).
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.datasets import load_sample_images
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from lqae_sklearn import LQAE, DeviceWarning, DomainWarning, LQAETokenizer, clear_model_cache, preset_config, save_checkpoint
from lqae_sklearn import _loading
from lqae_sklearn.model import DEFAULT_CHECKPOINT, CheckpointError, read_checkpoint_config
from lqae_sklearn._images import ImageLoadError
from lqae_sklearn._loading import LQAE_MODELS
from lqae_sklearn._model_cache import ModelCache

from conftest import fashion_mnist_subset


@pytest.fixture(scope="session")
def checkpoint():
    return DEFAULT_CHECKPOINT  # the shipped, trained checkpoint


@pytest.fixture(scope="module")
def images():
    X, y = fashion_mnist_subset("test")
    # One of each class: varied content, small enough for 2 CPU cores.
    return X[[np.flatnonzero(y == c)[0] for c in range(10)]]


@pytest.fixture(scope="module")
def fitted(checkpoint):
    return LQAETokenizer(checkpoint, batch_size=8, output="ids").fit()


def model_input(images: np.ndarray, tok: LQAETokenizer) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1], on the device of ``tok``'s model (CUDA with "auto")."""
    return torch.from_numpy(images[:, None].astype(np.float32) / 255.0).to(tok.device_)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().numpy()


# -- outputs -----------------------------------------------------------------------------
def test_ids_are_the_models_nearest_tokens(fitted, images):
    ids = fitted.transform(images)
    assert ids.shape == (len(images), 49) and ids.dtype == np.int64
    with torch.inference_mode():
        expected = to_numpy(fitted.model_.encode(model_input(images, fitted)))
    np.testing.assert_array_equal(ids, expected)
    allowed = set(fitted.model_.quantizer.allowed_ids.tolist())
    assert set(np.unique(ids).tolist()) <= allowed


def test_transform_is_deterministic_and_independent_of_batch_size(checkpoint, images):
    a = LQAETokenizer(checkpoint, batch_size=3, output="ids").fit().encode(images, ("ids", "embeddings"))
    b = LQAETokenizer(checkpoint, batch_size=64, output="ids").fit().encode(images, ("ids", "embeddings"))
    c = LQAETokenizer(checkpoint, batch_size=64, output="ids").fit().encode(images, ("ids", "embeddings"))
    np.testing.assert_array_equal(b["ids"], c["ids"])
    np.testing.assert_array_equal(b["embeddings"], c["embeddings"])
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], rtol=1e-5, atol=1e-5)


def test_text_is_wordpiece_pieces_joined_by_spaces(fitted, images):
    ids = fitted.encode(images, ("ids",))["ids"]
    texts = fitted.encode(images, ("text",))["text"]
    assert isinstance(texts, list) and len(texts) == len(images)
    tokenizer = fitted.model_.language_model.tokenizer
    for row, text in zip(ids, texts):
        assert text == " ".join(tokenizer.convert_ids_to_tokens(row.tolist()))
        assert len(text.split(" ")) == 49
    np.testing.assert_array_equal(fitted.text_to_ids(texts), ids)


def test_every_codebook_token_round_trips_through_text(fitted):
    allowed = to_numpy(fitted.model_.quantizer.allowed_ids)
    pieces = fitted.model_.language_model.tokenizer.convert_ids_to_tokens(allowed.tolist())
    assert not [p for p in pieces if p == "" or re.search(r"\s", p)], "a codebook piece holds whitespace"
    padded = np.resize(allowed, -(-allowed.size // 49) * 49).reshape(-1, 49)  # every id at least once
    np.testing.assert_array_equal(fitted.text_to_ids(fitted.ids_to_text(padded)), padded)


def test_text_to_ids_names_the_bad_text_and_token(fitted, images):
    text = fitted.ids_to_text(fitted.encode(images[:1], ("ids",))["ids"])[0]
    tokens = text.split()
    with pytest.raises(ValueError, match=r"texts\[1\] has 48 tokens"):
        fitted.text_to_ids([text, " ".join(tokens[:-1])])
    with pytest.raises(ValueError, match=r"texts\[0\], token 3 \('\[CLS\]'\)"):
        fitted.text_to_ids([" ".join(tokens[:3] + ["[CLS]"] + tokens[4:])])
    with pytest.raises(TypeError, match="not a single string"):
        fitted.text_to_ids(text)
    # Any whitespace separates tokens, so an LLM's line breaks do not matter.
    np.testing.assert_array_equal(fitted.text_to_ids(["\n".join(tokens)]), fitted.text_to_ids([text]))


def test_ids_outside_the_codebook_are_rejected(fitted):
    ids = np.full((1, 49), fitted.model_.quantizer.allowed_ids[0].item())
    ids[0, 5] = fitted.model_.language_model.tokenizer.cls_token_id
    with pytest.raises(ValueError, match=r"ids\[0, 5\]"):
        fitted.ids_to_text(ids)
    with pytest.raises(ValueError, match=r"X\[0, 5\]"):
        fitted.inverse_transform(ids)
    with pytest.raises(ValueError, match=r"shape \(n_images, 49\)"):
        fitted.inverse_transform(ids[:, :10])
    with pytest.raises(ValueError, match="embeddings cannot be turned back"):
        fitted.inverse_transform(np.random.default_rng(0).random((2, 49)))


def test_embeddings_match_model_features_for_each_layer_choice(checkpoint, images):
    tok = LQAETokenizer(checkpoint, output="embeddings", layers="all", batch_size=4).fit()
    names = tok.model_.feature_layer_names()
    assert tok.layers_ == names
    with torch.inference_mode():
        everything = to_numpy(tok.model_.features(model_input(images, tok), names))
    widths = [tok.model_.config.encoder_dim if n.startswith("encoder.") else tok.model_.language_model.hidden_size for n in names]
    per_layer = dict(zip(names, np.split(everything, np.cumsum(widths)[:-1], axis=1)))
    np.testing.assert_allclose(tok.transform(images), np.hstack([per_layer[n] for n in names]), rtol=1e-5, atol=1e-5)
    for layers, expected_layers in [
        ("default", ["encoder.1", "encoder.2", "encoder.3", "encoder.4"]),
        ("all", names),
        ("encoder", ["encoder.1", "encoder.2", "encoder.3", "encoder.4"]),
        (["lm.0", "encoder.2"], ["lm.0", "encoder.2"]),
        ("lm.3", ["lm.3"]),
    ]:
        tok = LQAETokenizer(checkpoint, output="embeddings", layers=layers, batch_size=4).fit()
        assert tok.layers_ == expected_layers
        features = tok.transform(images)
        assert features.dtype == np.float32
        assert features.shape == (len(images), len(tok.get_feature_names_out()))
        expected = np.hstack([per_layer[n] for n in expected_layers])
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)


def test_encode_runs_encoder_and_lm_once_per_batch(fitted, images):
    # Embeddings from every layer, so the LM has to run (the default layers are the encoder's only).
    fitted = clone(fitted).set_params(layers="all").fit()
    calls = {"encoder": 0, "lm": 0}
    model = fitted.model_
    hooks = [
        model.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1)),
        model.language_model.register_forward_hook(lambda *a: calls.__setitem__("lm", calls["lm"] + 1)),
    ]
    try:
        together = fitted.encode(images, ("ids", "text", "embeddings"))
        batches = -(-len(images) // fitted.batch_size)
        assert calls == {"encoder": batches, "lm": batches}
        calls.update(encoder=0, lm=0)
        fitted.encode(images, ("ids", "text"))
        assert calls == {"encoder": batches, "lm": 0}  # no LM without embeddings
    finally:
        for hook in hooks:
            hook.remove()
    assert list(together) == ["ids", "text", "embeddings"]
    np.testing.assert_array_equal(together["ids"], fitted.encode(images, "ids")["ids"])
    assert together["text"] == fitted.ids_to_text(together["ids"])
    with pytest.raises(ValueError, match="unknown outputs"):
        fitted.encode(images, ("ids", "pixels"))


def test_inverse_transform_reconstructs_images(fitted, images):
    ids = fitted.transform(images[:4])
    reconstructed = fitted.inverse_transform(ids)
    assert reconstructed.shape == (4, 28, 28) and reconstructed.dtype == np.float32
    assert reconstructed.min() >= 0.0 and reconstructed.max() <= 1.0
    with torch.inference_mode():
        expected = to_numpy(fitted.model_.decode(torch.from_numpy(ids).to(fitted.device_))[:, 0])
    np.testing.assert_allclose(reconstructed, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fitted.inverse_transform(fitted.ids_to_text(ids)), reconstructed)


def test_coarse_token_grid_pools_the_encoder_output(checkpoint, images):
    full = LQAETokenizer(checkpoint, output="ids").fit()
    x = model_input(images, full)
    with torch.inference_mode():
        z = full.model_.encoder(x)  # (N, 49, 384)
        # 1 x 1: the nearest word to the image's mean latent; 7 x 7: the patch tokens themselves.
        mean_token = to_numpy(full.model_.quantizer.nearest(z.mean(dim=1, keepdim=True)))
    np.testing.assert_array_equal(LQAETokenizer(checkpoint, token_grid=1, output="ids").fit().transform(images), mean_token)
    np.testing.assert_array_equal(LQAETokenizer(checkpoint, token_grid=7, output="ids").fit().transform(images), full.transform(images))

    coarse = LQAETokenizer(checkpoint, token_grid=3, output="text").fit()
    assert coarse.n_tokens_ == 9 and coarse.get_feature_names_out().tolist() == ["lqaetokenizer_text"]
    texts = coarse.transform(images)
    ids = coarse.text_to_ids(texts)
    assert ids.shape == (len(images), 9) and all(len(t.split()) == 9 for t in texts)
    with torch.inference_mode():
        # Region (0, 0) of a 3 x 3 grid over 7 x 7 patches covers patches rows/columns 0-2.
        corner = full.model_.quantizer.nearest(z.view(-1, 7, 7, 384)[:, :3, :3].mean(dim=(1, 2))[:, None])
    np.testing.assert_array_equal(ids[:, 0], to_numpy(corner[:, 0]))
    # Decoding spreads each coarse token over its patches.
    reconstructed = coarse.inverse_transform(texts)
    with torch.inference_mode():
        spread = torch.from_numpy(ids).view(-1, 3, 3)[:, [0, 0, 0, 1, 1, 2, 2]][:, :, [0, 0, 0, 1, 1, 2, 2]]
        expected = to_numpy(full.model_.decode(spread.reshape(-1, 49).to(full.device_))[:, 0])
    np.testing.assert_allclose(reconstructed, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"must have shape \(n_images, 9\)"):
        coarse.inverse_transform(full.transform(images))
    for bad in (8, True):  # 8 is larger than the patch grid: it would upsample
        with pytest.raises(ValueError, match=rf"token_grid must be 'auto', None or an int from 1 to .* \(7\), got {bad}"):
            LQAETokenizer(checkpoint, token_grid=bad, output="ids").fit()
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="The 'token_grid' parameter of LQAETokenizer must be"):
            LQAETokenizer(checkpoint, token_grid=bad, output="ids").fit()


# -- inputs ------------------------------------------------------------------------------
def test_every_input_form_gives_the_same_ids(fitted, images, tmp_path):
    expected = fitted.transform(images)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image).save(paths[-1])
    forms = {
        "float [0, 1]": images.astype(np.float64) / 255.0,
        "float32 [0, 1]": images.astype(np.float32) / 255.0,
        "(N, H, W, 1)": images[..., None],
        "gray RGB": np.repeat(images[..., None], 3, axis=-1),
        "list of arrays": list(images),
        "list of PIL images": [Image.fromarray(im) for im in images],
        "list of str paths": [str(p) for p in paths],
        "list of Path": paths,
        "Series of paths": pd.Series([str(p) for p in paths], index=np.arange(100, 100 + len(paths))),
        "one-column DataFrame": pd.DataFrame({"path": [str(p) for p in paths]}),
        "torch tensor": torch.from_numpy(images),
    }
    for name, X in forms.items():
        np.testing.assert_array_equal(fitted.transform(X), expected, err_msg=name)


def test_other_sizes_and_colours_are_converted_as_the_checkpoint_says(fitted, images):
    big = [Image.fromarray(im).resize((56, 40), Image.Resampling.NEAREST).convert("RGB") for im in images[:4]]
    expected = np.stack([np.asarray(im.convert("L").resize((28, 28), Image.Resampling.BILINEAR)) for im in big])
    np.testing.assert_array_equal(fitted.transform(big), fitted.transform(expected))
    as_array = np.stack([np.asarray(im) for im in big])  # (N, 40, 56, 3) uint8
    np.testing.assert_array_equal(fitted.transform(as_array), fitted.transform(expected))
    varied = [np.asarray(big[0]), images[1], np.asarray(big[2].convert("L"))]
    assert fitted.transform(varied).shape == (3, 49)


def test_bad_items_raise_errors_naming_them(fitted, images, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(images[0]).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match=re.escape(f"X[1] ({str(missing)!r})")):
        fitted.transform([good, missing])
    with pytest.raises(ImageLoadError, match=re.escape(f"X[2] ({str(corrupt)!r})")):
        fitted.transform(pd.Series([str(good), str(good), str(corrupt)]))
    with pytest.raises(ImageLoadError, match=r"X\[1\].*unsupported item of type NoneType"):
        fitted.transform([str(good), None])
    floats = images.astype(np.float32)  # 0..255 floats: a common mistake
    with pytest.raises(ImageLoadError, match=r"X\[0\].*\[0, 1\]"):
        fitted.transform(floats)
    floats = images.astype(np.float32) / 255
    floats[3, 2, 2] = np.nan
    with pytest.raises(ImageLoadError, match=r"X\[3\].*NaN"):
        fitted.transform(floats)
    with pytest.raises(ImageLoadError, match=r"X\[1\].*\[0, 1\]"):
        fitted.transform([images[0] / 255.0, images[1] * 2.0])
    with pytest.raises(ValueError, match=r"flat rows must hold 28 x 28 x 1 = 784 pixels each"):
        fitted.transform(images.reshape(len(images), -1)[:, :700])
    with pytest.raises(ValueError, match="channels-first"):
        fitted.transform(np.zeros((2, 5, 28, 28), dtype=np.uint8))
    with pytest.raises(TypeError, match="single path"):
        fitted.transform(str(good))
    with pytest.raises(ValueError, match="no images"):
        fitted.transform([])


# -- fitting, devices, caching -------------------------------------------------------------
def test_unfitted_estimator_refuses_to_transform(checkpoint, images):
    tok = LQAETokenizer(checkpoint, output="ids")
    with pytest.raises(NotFittedError):
        check_is_fitted(tok)
    with pytest.raises(NotFittedError):
        tok.transform(images)
    assert not hasattr(tok, "model_")
    check_is_fitted(tok.fit())


def test_fit_validates_parameters(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"The 'output' parameter of LQAETokenizer must be a str among"):
        LQAETokenizer(checkpoint, output="pixels").fit()
    with pytest.raises(ValueError, match=r"The 'token_grid' parameter of LQAETokenizer must be a str among {'auto'}, an int"):
        LQAETokenizer(checkpoint, token_grid=0, output="ids").fit()
    with pytest.raises(ValueError, match=r"unknown layers \['lm.99'\]"):
        LQAETokenizer(checkpoint, layers=["lm.99"], output="ids").fit()
    with pytest.raises(ValueError, match="twice"):
        LQAETokenizer(checkpoint, layers=["lm.1", "lm.1"], output="ids").fit()
    with pytest.raises(ValueError, match=r"The 'batch_size' parameter of LQAETokenizer must be an int in the range"):
        LQAETokenizer(checkpoint, batch_size=0, output="ids").fit()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LQAETokenizer(tmp_path / "nowhere", output="ids").fit()
    with pytest.raises(ValueError, match="device"):
        LQAETokenizer(checkpoint, device="quantum", output="ids").fit()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        LQAETokenizer(tmp_path / "empty", output="ids").fit()


def test_device_auto_uses_cuda_only_when_present(fitted):
    assert fitted.device_ == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(fitted.model_.parameters()).device.type == fitted.device_


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_explicit_cuda_without_cuda_is_an_error(checkpoint):
    with pytest.raises(ValueError, match="not available on this machine"):
        LQAETokenizer(checkpoint, device="cuda", output="ids").fit()


def test_default_checkpoint_is_used_when_none_is_given():
    tok = LQAETokenizer(output="ids")
    if DEFAULT_CHECKPOINT.exists():
        assert tok.fit().checkpoint_ == str(DEFAULT_CHECKPOINT)
    else:
        with pytest.raises(FileNotFoundError, match="default checkpoint is not installed"):
            tok.fit()


def test_refits_and_clones_share_one_loaded_model(checkpoint, tmp_path):
    a = LQAETokenizer(checkpoint, output="ids").fit()
    b = LQAETokenizer(checkpoint, output="text").fit()
    assert a.model_ is b.model_
    assert a.fit().model_ is b.model_
    # A rewritten checkpoint is a new model, not a stale cache entry.
    copy = save_checkpoint(a.model_, tmp_path / "copy")
    first = LQAETokenizer(copy, output="ids").fit().model_
    stamps = {p.name: (p.stat().st_atime_ns, p.stat().st_mtime_ns, p.stat().st_size) for p in copy.iterdir()}
    torch.manual_seed(1)
    save_checkpoint(LQAE(preset_config("small-28"), a.model_.language_model).eval(), copy)
    for p in copy.iterdir():  # same names, sizes and modification times as before: only the contents differ
        atime, mtime, size = stamps[p.name]
        os.utime(p, ns=(atime, mtime))
        if p.name == "model.safetensors":
            assert p.stat().st_size == size
    second = LQAETokenizer(copy, output="ids").fit()
    assert second.model_ is not first
    assert second._weights_sha256 == read_checkpoint_config(copy)["weights_sha256"] != first.checkpoint_config["weights_sha256"]
    for _ in range(LQAE_MODELS.max_items + 2):  # bounded: old entries leave
        torch.manual_seed(len(LQAE_MODELS) + 7)
        LQAETokenizer(save_checkpoint(LQAE(preset_config("small-28"), a.model_.language_model).eval(), copy)).fit()
    assert len(LQAE_MODELS) == LQAE_MODELS.max_items


def test_a_checkpoint_replaced_while_loading_is_never_cached_under_the_old_checksum(fitted, images, tmp_path,
                                                                                     monkeypatch):
    """lqae-train saving to the folder between fit's read of the config (A) and the load of the weights (B)."""
    path = save_checkpoint(fitted.model_, tmp_path / "ck")
    config_a = read_checkpoint_config(path)
    expected_a = fitted.transform(images)
    torch.manual_seed(3)
    model_b = LQAE(preset_config("small-28"), fitted.model_.language_model).eval()
    real_load = _loading.load_checkpoint

    def replaced_then_loaded(*args, **kwargs):
        save_checkpoint(model_b, path)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(_loading, "load_checkpoint", replaced_then_loaded)
    tok = LQAETokenizer(path, output="ids")
    try:
        tok.fit()
    except CheckpointError as error:
        raised = error
    else:
        raised = None
    monkeypatch.undo()
    for key, model in LQAE_MODELS.items():  # every model under its own checksum, whatever fit did
        assert key[1] == model.checkpoint_config["weights_sha256"], f"{key[1]} holds {model.checkpoint_config['weights_sha256']}"
    assert raised is not None and "was replaced while it was being loaded" in str(raised)
    assert not hasattr(tok, "checkpoint_")  # the failed fit left it unfitted
    # The new weights are found under their own checksum; putting A back gives A's tokens, not B's.
    sha_b = read_checkpoint_config(path)["weights_sha256"]
    assert LQAETokenizer(path, output="ids").fit()._weights_sha256 == sha_b != config_a["weights_sha256"]
    save_checkpoint(fitted.model_, path)
    np.testing.assert_array_equal(LQAETokenizer(path, output="ids").fit().transform(images), expected_a)


def test_the_model_caches_import_no_circle_and_clear_together():
    """_loading and llm._cache both build on _model_cache, which imports nothing of the package; clearing
    goes through the registry, not through an import of llm."""
    root = Path(_loading.__file__).parent

    def imports(relative: str, package: str) -> set:
        names = set()
        for node in ast.walk(ast.parse((root / relative).read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    loading = imports("_loading.py", "lqae_sklearn")
    llm_cache = imports("llm/_cache.py", "lqae_sklearn.llm")
    assert not any(name.startswith("lqae_sklearn.llm") for name in loading), loading
    assert "lqae_sklearn._loading" not in llm_cache, llm_cache
    bottom = imports("_model_cache.py", "lqae_sklearn")
    assert "lqae_sklearn._model_cache" in loading and "lqae_sklearn._model_cache" in llm_cache
    assert not any(name.startswith("lqae_sklearn") for name in bottom), bottom

    from lqae_sklearn.llm import _cache as llm_cache_module

    scratch = ModelCache(max_items=1)
    caches = (LQAE_MODELS, _loading.LANGUAGE_MODELS, llm_cache_module.LOADED_MODELS, scratch)
    for cache in caches:
        cache.get(("test entry",), object)
    clear_model_cache()
    assert [("test entry",) in cache for cache in caches] == [False] * len(caches)


# -- a failed fit leaves the estimator as it was -----------------------------------------------
def _failed_fit(case: str, checkpoint, images, tmp_path) -> tuple:
    """(parameters, X, error, message) of one way for fit to fail."""
    flat = images.reshape(len(images), -1)
    if case == "no such checkpoint":
        return {"checkpoint": tmp_path / "nowhere"}, None, FileNotFoundError, "does not exist"
    if case == "a folder without a config":
        (tmp_path / "empty").mkdir()
        return {"checkpoint": tmp_path / "empty"}, None, CheckpointError, "config.json"
    if case == "corrupt weights":
        broken = shutil.copytree(checkpoint, tmp_path / "broken")
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return {"checkpoint": broken}, None, CheckpointError, "truncated or corrupt"
    if case == "a language model that cannot be loaded":
        return {"language_model": str(tmp_path / "no-lm")}, None, OSError, "no-lm"
    if case == "an invalid parameter":
        return {"output": "pixels"}, None, ValueError, "The 'output' parameter"
    if case == "an unknown layer (found after loading)":
        return {"layers": ["lm.99"]}, None, ValueError, "unknown layers"
    if case == "a token grid beyond the patch grid":
        return {"token_grid": 8}, None, ValueError, "token_grid must be"
    if case == "a device this machine lacks":
        return {"device": "cuda:99"}, None, ValueError, "not available on this machine"
    if case == "flat rows of the wrong width":
        return {}, flat[:, :700], ValueError, "700 features per row"
    if case == "rows holding NaN":
        return {}, np.full((2, 784), np.nan), ValueError, "NaN"
    if case == "rows holding a non-number":
        rows = flat.astype(object)
        rows[1, 5] = {"not": "a pixel"}
        return {}, rows, TypeError, r"X\[1, 5\]"
    if case == "a 5-D array":
        return {}, np.zeros((2, 1, 28, 28, 1), dtype=np.uint8), ValueError, "expected images"
    raise AssertionError(case)


FAILED_FITS = [
    "no such checkpoint", "a folder without a config", "corrupt weights", "a language model that cannot be loaded",
    "an invalid parameter", "an unknown layer (found after loading)", "a token grid beyond the patch grid",
    "a device this machine lacks", "flat rows of the wrong width", "rows holding NaN", "rows holding a non-number",
    "a 5-D array",
]


def _fitted_state(tok) -> dict:
    """Every attribute but the parameters (which set_params changed): the model by identity, the rest by hash."""
    params = tok.get_params()
    return {name: id(value) if name == "_model" else joblib.hash(value)
            for name, value in vars(tok).items() if name not in params}


@pytest.mark.parametrize("case", FAILED_FITS)
def test_a_failed_refit_leaves_the_fitted_state_whole(checkpoint, images, tmp_path, case):
    params, X, error, message = _failed_fit(case, checkpoint, images, tmp_path)
    frame = pd.DataFrame(images.reshape(len(images), -1), columns=[f"pixel{i}" for i in range(784)])
    tok = LQAETokenizer(checkpoint, output="text", batch_size=8).fit(frame)
    expected = tok.transform(frame)
    before = _fitted_state(tok)
    with pytest.raises(error, match=message):
        tok.set_params(**params).fit(X)
    assert _fitted_state(tok) == before
    assert tok.transform(frame) == expected and list(tok.feature_names_in_) == list(frame.columns)


@pytest.mark.parametrize("case", FAILED_FITS)
def test_a_failed_first_fit_leaves_the_estimator_unfitted(checkpoint, images, tmp_path, case):
    params, X, error, message = _failed_fit(case, checkpoint, images, tmp_path)
    tok = LQAETokenizer(checkpoint, output="text").set_params(**params)
    with pytest.raises(error, match=message):
        tok.fit(X)
    assert set(vars(tok)) == set(tok.get_params())
    with pytest.raises(NotFittedError):
        tok.transform(images)


# -- array-likes of rows, and images far from the training data ---------------------------------
class _ArrayLike:
    """Neither a list nor an ndarray: only ``__array__``, as scikit-learn's check uses."""

    def __init__(self, data):
        self.data = data

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)


def test_array_likes_of_rows_give_what_the_array_gives(checkpoint, images):
    flat = images.reshape(len(images), -1)
    tok = LQAETokenizer(checkpoint, output="embeddings", batch_size=4).fit(flat)
    expected = tok.encode(flat, ("ids", "embeddings"))
    forms = {
        "list of lists of ints": flat.tolist(),
        "tuple of tuples": tuple(tuple(row) for row in flat.tolist()),
        "list of lists of floats in [0, 1]": (flat / 255.0).tolist(),
        "object array of ints": flat.astype(object),
        "object array of numpy uint8 scalars": np.array(list(flat), dtype=object),
        "object array of floats in [0, 1]": (flat / 255.0).astype(object),
        "__array__ array-like": _ArrayLike(flat),
        "__array__ array-like of object dtype": _ArrayLike(flat.astype(object)),
    }
    for name, X in forms.items():
        assert LQAETokenizer(checkpoint, output="ids").fit(X).n_features_in_ == 784, name
        encoded = tok.encode(X, ("ids", "embeddings"))
        np.testing.assert_array_equal(encoded["ids"], expected["ids"], err_msg=name)
        np.testing.assert_array_equal(encoded["embeddings"], expected["embeddings"], err_msg=name)
    np.testing.assert_array_equal(tok.transform(images.tolist()), expected["embeddings"])  # images as nested lists
    with pytest.raises(ValueError, match="rows of different lengths"):
        tok.transform([flat[0].tolist(), flat[1, :700].tolist()])
    with pytest.raises(TypeError, match=r"X\[1, 3\] is 'dark' \(str\): pixel rows must hold numbers"):
        tok.transform([flat[0].tolist(), flat[1, :3].tolist() + ["dark"] + flat[1, 4:].tolist()])


def test_photos_far_from_the_training_data_are_named_once_per_call(fitted, images):
    photos = load_sample_images().images  # two 427 x 640 colour photos, shipped with scikit-learn
    for X in (np.stack(photos), photos):
        for call in (fitted.transform, lambda X: fitted.encode(X, ("ids",))):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                call(X)
            said = [w for w in caught if issubclass(w.category, DomainWarning)]
            assert len(said) == 1, [str(w.message) for w in caught]
            assert said[0].filename == __file__  # it points at the caller's line
            message = str(said[0].message)
            for part in ("2 of 2 images are much larger than 28 x 28", "2 of 2 images are colour", "427 x 640 colour",
                         "trained on fashion-mnist train, 60,000 images, 28 x 28 grayscale",
                         "lqae-train --data FOLDER --preset small-rgb"):
                assert part in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error", DomainWarning)  # Fashion-MNIST, in any form: not a word
        for X in (images, list(images), images.reshape(len(images), -1), np.repeat(images[..., None], 3, axis=-1),
                  [Image.fromarray(image).resize((56, 56)) for image in images]):
            fitted.transform(X)


# -- pickling ------------------------------------------------------------------------------
def test_joblib_round_trip_gives_identical_outputs_and_stores_no_weights(checkpoint, images, tmp_path):
    tok = LQAETokenizer(checkpoint, output="embeddings", layers="all", batch_size=8).fit()
    expected = tok.encode(images, ("ids", "embeddings"))
    joblib.dump(tok, tmp_path / "tok.joblib")
    assert (tmp_path / "tok.joblib").stat().st_size < 100_000  # the weights are megabytes
    loaded = joblib.load(tmp_path / "tok.joblib")
    assert "_model" not in vars(loaded)  # reloaded lazily, from the checkpoint path
    check_is_fitted(loaded)
    assert loaded.get_params() == tok.get_params()
    again = loaded.encode(images, ("ids", "embeddings"))
    np.testing.assert_array_equal(again["ids"], expected["ids"])
    np.testing.assert_array_equal(again["embeddings"], expected["embeddings"])
    np.testing.assert_array_equal(loaded.get_feature_names_out(), tok.get_feature_names_out())


def test_unfitted_estimator_pickles_as_its_parameters(checkpoint):
    tok = pickle.loads(pickle.dumps(LQAETokenizer(checkpoint, output="text", layers=["lm.2"])))
    assert tok.get_params()["layers"] == ["lm.2"]
    with pytest.raises(NotFittedError):
        tok.transform(np.zeros((1, 28, 28), dtype=np.uint8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates unpickling on a machine without CUDA")
def test_cuda_pickle_loads_on_a_cpu_machine_with_a_warning(checkpoint, images):
    tok = LQAETokenizer(checkpoint, batch_size=8, output="ids").fit()
    expected = tok.transform(images)
    state = tok.__getstate__()
    state.update(device="cuda", device_="cuda", _fitted_with={"device": "cuda", "language_model": None})  # fitted on a GPU machine
    gpu_pickle = pickle.dumps(state)
    restored = LQAETokenizer.__new__(LQAETokenizer)
    with pytest.warns(DeviceWarning, match="runs on the CPU"):
        restored.__setstate__(pickle.loads(gpu_pickle))
    assert restored.device == "cuda" and restored.device_ == "cpu"  # the parameter stays as the user set it
    np.testing.assert_array_equal(restored.transform(images), expected)
    # device="auto" pickled on a GPU machine: CPU here, and no warning needed.
    state.update(device="auto", device_="cuda", _fitted_with={"device": "auto", "language_model": None})
    auto = LQAETokenizer.__new__(LQAETokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeviceWarning)
        auto.__setstate__(state)
    assert auto.device_ == "cpu"
    np.testing.assert_array_equal(auto.transform(images), expected)
    # What fit used decides, not a parameter changed afterwards: device="cuda" set after fitting changes nothing.
    tok.set_params(device="cuda", language_model="/nowhere")
    again = pickle.loads(pickle.dumps(tok))
    assert again.device_ == "cpu" and again.device == "cuda"
    np.testing.assert_array_equal(again.transform(images), expected)


def test_unpickled_estimator_refuses_a_changed_or_missing_checkpoint(fitted, images, tmp_path):
    path = save_checkpoint(fitted.model_, tmp_path / "ck")
    tok = LQAETokenizer(path, output="ids").fit()
    data = pickle.dumps(tok)
    torch.manual_seed(2)
    save_checkpoint(LQAE(preset_config("small-28"), fitted.model_.language_model).eval(), path)
    with pytest.raises(CheckpointError, match="has changed since"):
        pickle.loads(data).transform(images[:1])
    moved = pickle.loads(data)
    moved.checkpoint_ = str(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="does not exist on this machine"):
        moved.transform(images[:1])


# -- feature names and pandas output --------------------------------------------------------
def test_feature_names_follow_the_output(checkpoint, images):
    tok = LQAETokenizer(checkpoint, layers=["encoder.4", "lm.6"], batch_size=8, output="ids").fit()
    assert list(tok.get_feature_names_out()) == [f"lqaetokenizer_token{i}" for i in range(49)]
    tok.set_params(output="text").fit()
    assert list(tok.get_feature_names_out()) == ["lqaetokenizer_text"]
    tok.set_params(output="embeddings").fit()
    names = tok.get_feature_names_out()
    widths = (tok.checkpoint_config_["model"]["encoder_dim"], tok.checkpoint_config_["language_model"]["hidden_size"])
    assert len(names) == sum(widths) == tok.transform(images[:2]).shape[1]
    assert names[0] == "lqaetokenizer_encoder.4_0" and names[-1] == f"lqaetokenizer_lm.6_{widths[1] - 1}"


def test_set_output_pandas(checkpoint, images):
    tok = LQAETokenizer(checkpoint, output="embeddings", layers="last", batch_size=8).fit()
    expected = tok.transform(images)
    frame = tok.set_output(transform="pandas").transform(images)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(tok.get_feature_names_out())
    np.testing.assert_array_equal(frame.to_numpy(), expected)
    ids = tok.set_params(output="ids").fit().transform(images)
    assert isinstance(ids, pd.DataFrame) and ids.shape == (len(images), 49) and ids.columns[0] == "lqaetokenizer_token0"
    texts = tok.set_params(output="text").fit().transform(images)
    assert isinstance(texts, pd.DataFrame) and list(texts.columns) == ["lqaetokenizer_text"]
    assert texts["lqaetokenizer_text"].tolist() == tok.set_output(transform="default").transform(images)


# -- parameters take effect at fit; flat rows; feature names ---------------------------------
def test_parameters_that_decide_the_output_take_effect_only_at_fit(checkpoint, images):
    tok = LQAETokenizer(checkpoint, token_grid=3, batch_size=4, output="ids").fit()
    coarse = tok.transform(images)
    names = tok.get_feature_names_out()
    tok.set_params(token_grid=None, output="text", layers="all")
    # Until the next fit, transform and the feature names keep agreeing with each other and with fit.
    np.testing.assert_array_equal(tok.transform(images), coarse)
    assert list(tok.get_feature_names_out()) == list(names) and len(names) == coarse.shape[1] == 9
    tok.set_params(batch_size=3)  # execution only: read at each call, changes no result
    np.testing.assert_array_equal(tok.transform(images), coarse)
    tok.fit()
    texts = tok.transform(images)
    assert (tok.output_, tok.token_grid_, tok.n_tokens_) == ("text", 7, 49) and len(texts[0].split()) == 49


def test_flat_rows_are_images_and_fit_records_their_width_and_names(checkpoint, images):
    expected = LQAETokenizer(checkpoint, output="ids").fit(images).transform(images)
    flat = images.reshape(len(images), -1)
    tok = LQAETokenizer(checkpoint, output="ids").fit(flat)
    assert tok.n_features_in_ == 784 and not hasattr(tok, "feature_names_in_")
    np.testing.assert_array_equal(tok.transform(flat), expected)
    np.testing.assert_array_equal(tok.transform(flat / 255.0), expected)  # floats in [0, 1] too
    np.testing.assert_array_equal(tok.transform(images), expected)  # images still work after flat rows

    columns = [f"pixel{i + 1}" for i in range(784)]  # as fetch_openml("Fashion-MNIST", as_frame=True)
    frame = pd.DataFrame(flat, columns=columns)
    tok = LQAETokenizer(checkpoint, output="ids").fit(frame)
    assert list(tok.feature_names_in_) == columns
    np.testing.assert_array_equal(tok.transform(frame), expected)
    tok.get_feature_names_out(columns)  # the fitted names are accepted ...
    with pytest.raises(ValueError, match="input_features is not equal to feature_names_in_"):
        tok.get_feature_names_out(columns[::-1])  # ... others are not
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        tok.transform(flat)

    with pytest.raises(ValueError, match=r"X has 700 features per row, but this checkpoint reads flat rows of "
                                         r"28 x 28 x 1 = 784 pixels"):
        LQAETokenizer(checkpoint, output="ids").fit(flat[:, :700])
    with pytest.raises(ValueError, match="X has 700 features, but LQAETokenizer is expecting 784 features"):
        LQAETokenizer(checkpoint, output="ids").fit(flat).transform(flat[:, :700])
    with pytest.raises(ValueError, match="Input X contains NaN"):
        LQAETokenizer(checkpoint, output="ids").fit(np.full((2, 784), np.nan))

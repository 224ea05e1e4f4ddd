"""Every figure of a model card for one checkpoint, beside training-free baselines on the same split."""

from __future__ import annotations

import math
import time
from numbers import Integral, Real

import numpy as np

from ._baselines import PatchKMeans, pca_baseline, pca_reconstruct, sample_patches
from ._data import FASHION_MNIST, InputError, load_splits
from ._episodes import (
    LLMEpisodeRunner,
    episode_accuracies,
    mean_confidence_interval,
    prototype_predict,
    sample_episodes,
    token_overlap_predict,
)
from ._metrics import code_figures, fit_probe, one_hot_tokens, per_image_mse, reconstruction_figures

#: Sizes of a ``quick=True`` run (13 minutes on one CPU thread) and of a full one; ``None`` is "every image".
QUICK_SIZES = {"n_train": 10_000, "n_test": 2_000, "kmeans_patches": 100_000, "n_episodes": 200}
FULL_SIZES = {"n_train": None, "n_test": None, "kmeans_patches": 1_000_000, "n_episodes": 1_000}

KMEANS = "MiniBatchKMeans(K, batch_size=16384, n_init=1, max_iter=20, random_state=seed)"


def evaluate_checkpoint(checkpoint, *, data=FASHION_MNIST, test_data=None, test_fraction=0.2, quick=False,
                        n_train=None, n_test=None, kmeans_patches=None, n_episodes=None, llm_episodes=0,
                        kmeans_sizes=(1024, 4096), ways=(2, 5), C=0.1, max_iter=5000, batch_size=256,
                        random_state=0, device="auto", progress=False) -> dict:
    """Measure a checkpoint (LQAE or VQ-VAE) against training-free tokenizers on the same train/test split.

    Every figure is computed on the same images: the probes train on the train
    split and are scored on the test split; everything else is scored on the test
    split. Side by side with the checkpoint:

    - **raw pixels** (probe, and nearest pixel prototypes in few-shot episodes);
    - **PCA** with as many coefficients as the checkpoint has tokens per image,
      fitted on the train split (reconstructions clipped to [0, 1], as the
      checkpoint's decoder output is);
    - **k-means patch tokens** at the checkpoint's grid: its ``patch x patch``
      squares, each written as the nearest of K centres fitted by
      ``MiniBatchKMeans(K, batch_size=16384, n_init=1, max_iter=20,
      random_state=random_state)`` on up to ``kmeans_patches`` random train
      patches, for each K of ``kmeans_sizes``.

    The figures:

    - **reconstruction**, on the test split, for the checkpoint, PCA and each
      k-means: PSNR under two definitions, each named
      (``psnr_mean_per_image_db``, the mean of per-image PSNR;
      ``psnr_dataset_db``, ``10 log10(1 / mean MSE)``), and for the token
      tokenizers the codebook usage (the fraction of codebook rows the test
      images use) and perplexity;
    - **linear probes**: LogisticRegression (lbfgs, run to convergence: its
      iterations are reported, and a fit that stops at ``max_iter`` is marked
      ``converged: False``) after a StandardScaler, on raw pixels, the PCA
      coefficients, the checkpoint's encoder features (every block,
      token-averaged: :class:`~lqae_sklearn.LQAETokenizer`'s default) and its
      LM-layer features (every hidden state of the frozen LM; ``None`` for a
      VQ-VAE, which has no LM); and on the one-hot (position, token) matrix of
      the smallest k-means's tokens, without a scaler (its columns are 0/1
      already);
    - **few-shot token overlap**: 1-shot episodes of the test split (one query
      per class, :func:`sample_episodes`), in which each query takes the class
      whose support image shares the most token ids with it; for the checkpoint's
      tokens and the smallest k-means's, against nearest pixel prototypes, with
      95% intervals (:func:`mean_confidence_interval`);
    - optionally the **LLM**: ``LQAETokenizer(output="text")`` +
      ``LLMFewShotClassifier()`` with every default (the embedded Gemma 3 270M)
      on the first ``llm_episodes`` episodes of each cell, with pixel prototypes
      on the same episodes. It is slow on a CPU (1-3 s per episode).

    Parameters
    ----------
    checkpoint : str or path-like
        A checkpoint folder or ``.safetensors`` file written by
        :func:`~lqae_sklearn.model.save_checkpoint`, or the name of a shipped
        one (``"fashion-mnist-small-28"``).
    data : "fashion-mnist", str, path-like or tuple, default="fashion-mnist"
        ``"fashion-mnist"``: its 60,000 train and 10,000 test images, through
        :func:`~lqae_sklearn.datasets.fetch_fashion_mnist`. A folder: one
        subfolder of images per class (the class is the name of the folder
        holding an image; files are found as ``lqae-encode`` finds them, and
        kept when Pillow knows their extension); it is split into train and test
        by ``random_state`` (stratified, ``test_fraction`` of each class to
        test) unless ``test_data`` is given. Or an ``(X, y)`` pair, ``X`` in any
        form :class:`~lqae_sklearn.LQAETokenizer` reads.
    test_data : str, path-like, tuple or None, default=None
        The test split, as a folder or ``(X, y)`` pair, when ``data`` is the
        train split only; its classes must all occur in ``data``.
    test_fraction : float, default=0.2
        Fraction of each class that goes to the test split when ``data`` is
        split.
    quick : bool, default=False
        Subsample for a shorter CPU run (13 minutes on one thread for the
        shipped checkpoint): 10,000 train and 2,000 test images (a seeded
        random choice), 100,000 k-means patches and 200 episodes per cell,
        unless given below. The result records ``quick`` and every size.
    n_train, n_test : int or None, default=None
        Use at most this many train / test images (a seeded random choice, kept
        in source order); None: every image (10,000 / 2,000 with ``quick``).
    kmeans_patches : int or None, default=None
        Train patches the k-means are fitted on (a seeded random choice; all of
        them when there are fewer); None: 1,000,000 (100,000 with ``quick``).
    n_episodes : int or None, default=None
        Episodes per few-shot cell; None: 1,000 (200 with ``quick``).
    llm_episodes : int, default=0
        Episodes per cell for the LLM rows; 0 skips the LLM.
    kmeans_sizes : sequence of int, default=(1024, 4096)
        The K of each k-means baseline (capped at the number of train patches;
        the result records the K used). The smallest also gives the one-hot
        probe and the few-shot token-overlap baseline.
    ways : sequence of int, default=(2, 5)
        The few-shot cells (1-shot each). A cell the test split has too few
        classes for is reported as skipped, with the reason.
    C : float, default=0.1
        Inverse regularisation of every probe.
    max_iter : int, default=5000
        The lbfgs iteration cap of each probe.
    batch_size : int, default=256
        Images per forward pass of the checkpoint.
    random_state : int, default=0
        Seeds the split, the subsamples, the k-means sample and fits, PCA and the
        episodes: the same seed on the same device gives the same figures.
    device : str, default="auto"
        Torch device of the checkpoint and the LLM; ``"auto"`` is CUDA when
        present, else the CPU.
    progress : bool, default=False
        Show a progress bar (tqdm) on stderr.

    Returns
    -------
    dict
        JSON-serialisable: ``checkpoint`` (what it is), ``data`` (sources, split,
        sizes, classes), ``quick``, ``sizes``, ``settings``,
        ``reconstruction`` (rows ``checkpoint``, ``pca``, ``kmeans_<K>``),
        ``linear_probe`` (rows ``raw_pixels``, ``pca``, ``encoder``,
        ``lm_layers``, ``kmeans_<K>_one_hot``), ``few_shot`` (one cell per way),
        ``seconds`` (per stage) and ``command``. Every row has a ``label``; a
        row that does not apply is None. :func:`evaluation_markdown` renders it.

    Raises
    ------
    ValueError
        If an input cannot be used, before any work starts: a missing or
        unreadable checkpoint, a folder that is missing, empty, has images
        outside class subfolders, or only one class, an undecodable image, an
        unavailable device or an out-of-range option. The message names the
        input.

    See Also
    --------
    evaluation_markdown : The result as Markdown tables.

    Notes
    -----
    ``lqae-eval`` runs this function from the command line and writes its
    result as JSON and Markdown. Training images are used only to fit (the
    probes, PCA and the k-means), never to score.

    Examples
    --------
    >>> from lqae_sklearn.evaluation import evaluate_checkpoint, evaluation_markdown
    >>> result = evaluate_checkpoint("fashion-mnist-small-28", quick=True)  # doctest: +SKIP
    >>> round(result["reconstruction"]["kmeans_4096"]["psnr_mean_per_image_db"], 1)  # doctest: +SKIP
    23.0
    >>> print(evaluation_markdown(result))  # doctest: +SKIP
    """
    started = time.perf_counter()
    arguments = dict(data=data, test_data=test_data, test_fraction=test_fraction, quick=quick, n_train=n_train,
                     n_test=n_test, kmeans_patches=kmeans_patches, n_episodes=n_episodes,
                     llm_episodes=llm_episodes, kmeans_sizes=tuple(kmeans_sizes), ways=tuple(ways), C=C,
                     max_iter=max_iter, batch_size=batch_size, random_state=random_state, device=device)
    sizes = _sizes(quick, n_train=n_train, n_test=n_test, kmeans_patches=kmeans_patches, n_episodes=n_episodes)
    _check_options(llm_episodes=llm_episodes, kmeans_sizes=kmeans_sizes, ways=ways, C=C, max_iter=max_iter,
                   batch_size=batch_size, random_state=random_state, test_fraction=test_fraction)
    # The cheap checks first: the checkpoint's config, then the data, then the weights (and the LM).
    path, config, resolved_device = _checkpoint_path(checkpoint, device)
    splits = load_splits(data, test_data, config["preprocessing"], test_fraction=test_fraction,
                         n_train=sizes["n_train"], n_test=sizes["n_test"], seed=random_state)
    model = _load_model(path, resolved_device)
    seconds = {"loading": time.perf_counter() - started}
    timer = _Stages(seconds)

    has_lm = getattr(model, "language_model", None) is not None
    grid, patch = model.config.grid_size, model.config.patch_size
    channels = model.config.in_channels
    names = model.feature_layer_names()
    encoder_layers = [n for n in names if n.startswith("encoder.")]
    lm_layers = [n for n in names if n.startswith("lm.")]
    kmeans_sizes = sorted(int(k) for k in kmeans_sizes)
    n_batches = sum(math.ceil(len(x) / batch_size) for x in (splits.train_images, splits.test_images))
    bar = _progress(progress, n_batches + 1 + len(kmeans_sizes) + 5 + len(ways))

    try:
        with timer("encoding"):
            bar.set_description("encoding the test split")
            test = _encode(model, splits.test_images, encoder_layers + lm_layers, batch_size, bar, reconstruct=True)
            bar.set_description("encoding the train split")
            train = _encode(model, splits.train_images, encoder_layers + lm_layers, batch_size, bar)
        train_pixels = splits.train_images.astype(np.float32) / 255.0
        test_pixels = splits.test_images.astype(np.float32) / 255.0
        y_train, y_test = splits.train_labels, splits.test_labels
        reconstruction = {"checkpoint": {
            "label": f"checkpoint ({type(model).__name__})", "tokens_per_image": grid * grid,
            **reconstruction_figures(test["mse"]), **code_figures(test["ids"], model.quantizer.codebook_size)}}

        with timer("pca"):
            bar.set_description("PCA")
            pca = pca_baseline(train_pixels, grid * grid, random_state)
            pca_train, _ = pca_reconstruct(pca, train_pixels)
            pca_test, pca_images = pca_reconstruct(pca, test_pixels)
            reconstruction["pca"] = {"label": f"PCA, {pca.n_components_} coefficients",
                                     "tokens_per_image": int(pca.n_components_),
                                     **reconstruction_figures(per_image_mse(pca_images, test_pixels)),
                                     "codebook_size": None, "distinct_tokens": None, "codebook_usage": None,
                                     "perplexity": None}
            bar.update(1)

        with timer("kmeans"):
            patches, patches_available = sample_patches(train_pixels, patch, sizes["kmeans_patches"], random_state)
            kmeans_tokens = {}
            for k in kmeans_sizes:
                bar.set_description(f"k-means K={k:,}")
                fitted = PatchKMeans(k, patch, random_state).fit(patches)
                tokens = fitted.tokens(test_pixels)
                kmeans_tokens[k] = {"test": tokens}
                if k == kmeans_sizes[0]:
                    kmeans_tokens[k]["train"] = fitted.tokens(train_pixels)
                key = f"kmeans_{k}"
                capped = "" if fitted.n_clusters == k else f" (capped at {fitted.n_clusters:,} train patches)"
                reconstruction[key] = {
                    "label": f"k-means K = {k:,}{capped}, {patch} x {patch} patches",
                    "tokens_per_image": grid * grid, "requested_clusters": k,
                    **reconstruction_figures(per_image_mse(fitted.reconstruct(tokens, channels), test_pixels)),
                    **code_figures(tokens, fitted.n_clusters), "fit_iterations": int(fitted.kmeans.n_iter_)}
                bar.update(1)

        with timer("probes"):
            probe_k = kmeans_sizes[0]

            def probe(label, train_x, test_x, scale=True):
                bar.set_description(f"probe: {label}")
                row = {"label": label, **fit_probe(train_x, y_train, test_x, y_test, C=C, max_iter=max_iter,
                                                    scale=scale)}
                bar.update(1)
                return row

            flat = lambda pixels: pixels.reshape(len(pixels), -1)  # noqa: E731
            widths = _layer_columns(model, encoder_layers + lm_layers, train["features"].shape[1])
            linear_probe = {
                "raw_pixels": probe("raw pixels", flat(train_pixels), flat(test_pixels)),
                "pca": probe(f"PCA coefficients ({pca.n_components_})", pca_train, pca_test),
                "encoder": probe("encoder features (every block)", train["features"][:, widths(encoder_layers)],
                                 test["features"][:, widths(encoder_layers)]),
                "lm_layers": (probe("LM-layer features (every hidden state)",
                                    train["features"][:, widths(lm_layers)], test["features"][:, widths(lm_layers)])
                              if has_lm else None),
            }
            if not has_lm:
                bar.update(1)
            n_codes = reconstruction[f"kmeans_{probe_k}"]["codebook_size"]
            linear_probe[f"kmeans_{probe_k}_one_hot"] = probe(
                f"k-means K = {probe_k:,} tokens, one-hot position x token",
                one_hot_tokens(kmeans_tokens[probe_k]["train"], n_codes),
                one_hot_tokens(kmeans_tokens[probe_k]["test"], n_codes), scale=False)

        with timer("few_shot"):
            few_shot = _few_shot(y_test, ways=ways, n_episodes=sizes["n_episodes"], seed=random_state,
                                 ids=test["ids"], kmeans_ids=kmeans_tokens[probe_k]["test"], kmeans_clusters=probe_k,
                                 pixels=test_pixels, bar=bar)
            if llm_episodes and has_lm:
                _llm_rows(few_shot, y_test, path=path, device=resolved_device, n_episodes=sizes["n_episodes"],
                          llm_episodes=llm_episodes, seed=random_state, images=splits.test_images,
                          pixels=test_pixels, bar=bar)
    finally:
        bar.close()

    seconds["total"] = time.perf_counter() - started
    language_model = config.get("language_model") or {}
    return {
        "lqae_sklearn_version": _version(),
        "checkpoint": {
            "given": str(checkpoint), "path": str(path), "model": type(model).__name__,
            "codebook": model.config.codebook,
            "language_model": language_model.get("name") if has_lm else None,
            "image_size": model.config.image_size, "color_mode": config["preprocessing"]["color_mode"],
            "patch_size": patch, "grid": grid, "tokens_per_image": grid * grid,
            "codebook_size": model.quantizer.codebook_size,
            "training_steps": (config.get("training") or {}).get("steps"),
        },
        "data": splits.description,
        "quick": bool(quick),
        "sizes": {"train_images": len(y_train), "test_images": len(y_test), "kmeans_patches": len(patches),
                  "kmeans_patches_available": patches_available,
                  "episodes_per_cell": sizes["n_episodes"],
                  "llm_episodes_per_cell": min(llm_episodes, sizes["n_episodes"]) if has_lm else 0},
        "settings": {"random_state": random_state, "device": resolved_device, "batch_size": batch_size,
                     "torch_threads": _torch_threads(),
                     "probe": f"[StandardScaler +] LogisticRegression(C={C:g}, max_iter={max_iter}), lbfgs",
                     "kmeans": KMEANS, "kmeans_sizes": kmeans_sizes,
                     "pca": f"PCA(n_components=tokens per image, random_state={random_state}), clipped to [0, 1]"},
        "reconstruction": reconstruction,
        "linear_probe": linear_probe,
        "few_shot": few_shot,
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
        "command": _python_call(checkpoint, arguments),
    }


# -- inputs ----------------------------------------------------------------------------------------
def _sizes(quick, **given) -> dict:
    defaults = QUICK_SIZES if quick else FULL_SIZES
    sizes = {}
    for name, value in given.items():
        if value is not None and (not isinstance(value, Integral) or isinstance(value, bool) or value < 2):
            raise InputError(f"{name} must be an int >= 2 or None, got {value!r}")
        sizes[name] = defaults[name] if value is None else int(value)
    return sizes


def _check_options(*, llm_episodes, kmeans_sizes, ways, C, max_iter, batch_size, random_state, test_fraction):
    def integer(name, value, low):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an int >= {low}, got {value!r}")

    integer("llm_episodes", llm_episodes, 0)
    integer("max_iter", max_iter, 1)
    integer("batch_size", batch_size, 1)
    integer("random_state", random_state, 0)
    if not kmeans_sizes or not ways:
        raise InputError(f"kmeans_sizes and ways must not be empty, got {kmeans_sizes!r} and {ways!r}")
    for k in kmeans_sizes:
        integer("each of kmeans_sizes", k, 2)
    for w in ways:
        integer("each of ways", w, 2)
    if not isinstance(C, Real) or not C > 0:
        raise InputError(f"C must be a positive number, got {C!r}")
    if not isinstance(test_fraction, Real) or not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def _checkpoint_path(checkpoint, device):
    """The checkpoint's path, its JSON config (read and checked, no weights loaded) and the resolved device."""
    from lqae_sklearn._loading import resolve_checkpoint, resolve_device
    from lqae_sklearn.model import CheckpointError, read_checkpoint_config

    try:
        resolved_device = str(resolve_device(device))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    try:
        path = resolve_checkpoint(checkpoint)
        return path, read_checkpoint_config(path), resolved_device
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from exc
    except (CheckpointError, OSError, TypeError, KeyError) as exc:
        raise InputError(f"checkpoint {str(checkpoint)!r} cannot be used: {exc}") from exc


def _load_model(path, device):
    from lqae_sklearn.model import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, device=device)
    except (FileNotFoundError, CheckpointError, OSError, KeyError) as exc:
        raise InputError(f"checkpoint {str(path)!r} cannot be used: {exc}") from exc


# -- the checkpoint --------------------------------------------------------------------------------
def _encode(model, images, layers, batch_size, bar, reconstruct=False) -> dict:
    """Token ids, the layers' features and (optionally) each image's reconstruction MSE, in one pass."""
    import torch

    device = next(model.parameters()).device
    ids, features, mse = [], [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).to(device).float() / 255.0
            batch_ids, batch_features = model.encode_with_features(x, layers)
            ids.append(batch_ids.cpu().numpy())
            features.append(batch_features.float().cpu().numpy())
            if reconstruct:
                error = (model.decode(batch_ids).float() - x) ** 2
                mse.append(error.flatten(1).double().mean(dim=1).cpu().numpy())
            bar.update(1)
    out = {"ids": np.concatenate(ids), "features": np.concatenate(features)}
    if reconstruct:
        out["mse"] = np.concatenate(mse)
    return out


def _layer_columns(model, layers, total_width):
    """``columns(names)``: the feature columns of the named layers (features are their token means, in order)."""
    spans, offset = {}, 0
    for name in layers:
        width = model.config.encoder_dim if name.startswith("encoder.") else model.language_model.hidden_size
        spans[name] = np.arange(offset, offset + width)
        offset += width
    if offset != total_width:
        raise RuntimeError(f"the layers {layers} should give {offset} feature columns, the model gave {total_width}")
    return lambda names: np.concatenate([spans[n] for n in names])


# -- few-shot --------------------------------------------------------------------------------------
def _few_shot(labels, *, ways, n_episodes, seed, ids, kmeans_ids, kmeans_clusters, pixels, bar) -> list[dict]:
    """One cell per way: token overlap (checkpoint and k-means ids) against pixel prototypes, same episodes."""
    cells = []
    for n_way in ways:
        bar.set_description(f"few-shot {n_way}-way")
        try:
            episodes = sample_episodes(labels, n_way, 1, 1, n_episodes, seed=seed)
        except ValueError as exc:  # too few classes or images in the test split for this cell
            cells.append({"ways": n_way, "shots": 1, "chance": 1 / n_way, "skipped": str(exc)})
            bar.update(1)
            continue
        cells.append({
            "ways": n_way, "shots": 1, "chance": 1 / n_way, "skipped": None,
            "token_overlap": _interval(episode_accuracies(episodes, lambda e: token_overlap_predict(
                ids[e.support], e.support_y, ids[e.query]))),
            "token_overlap_kmeans": _interval(episode_accuracies(episodes, lambda e: token_overlap_predict(
                kmeans_ids[e.support], e.support_y, kmeans_ids[e.query]))),
            "pixel_prototypes": _interval(episode_accuracies(episodes, lambda e: prototype_predict(
                pixels[e.support], e.support_y, pixels[e.query]))),
            "kmeans_clusters": kmeans_clusters,
            "llm": None, "pixel_prototypes_llm_episodes": None,
        })
        bar.update(1)
    return cells


def _llm_rows(cells, labels, *, path, device, n_episodes, llm_episodes, seed, images, pixels, bar) -> None:
    """The default LLM pipeline on the first ``llm_episodes`` episodes of each cell (filled into ``cells``)."""
    from lqae_sklearn._fewshot import LLMFewShotClassifier
    from lqae_sklearn._tokenizer import LQAETokenizer

    plans = {cell["ways"]: sample_episodes(labels, cell["ways"], 1, 1, n_episodes, seed=seed)[:llm_episodes]
             for cell in cells if not cell["skipped"]}
    if not plans:
        return
    bar.set_description("loading the LLM")
    tokenizer = LQAETokenizer(checkpoint=str(path), output="text", device=device).fit()
    used = np.unique(np.concatenate([np.concatenate([e.support, e.query])
                                     for episodes in plans.values() for e in episodes]))
    # The text grid may be coarser than the patch grid: encode the images the LLM episodes use, at it.
    text_ids = np.zeros((len(images), tokenizer.n_tokens_), dtype=np.int64)
    text_ids[used] = tokenizer.encode(images[used].transpose(0, 2, 3, 1), ("ids",))["ids"]
    runner = LLMEpisodeRunner(LLMFewShotClassifier(device=device), tokenizer.ids_to_text)
    bar.total += sum(len(episodes) for episodes in plans.values())
    for cell in cells:
        if cell["skipped"]:
            continue
        episodes = plans[cell["ways"]]
        bar.set_description(f"LLM {cell['ways']}-way")
        start = time.perf_counter()

        def predict(episode):
            bar.update(1)
            return runner(episode, text_ids)[0]

        cell["llm"] = {**_interval(episode_accuracies(episodes, predict)), "tokens_per_image": tokenizer.n_tokens_,
                       "seconds_per_episode": round((time.perf_counter() - start) / len(episodes), 2)}
        cell["pixel_prototypes_llm_episodes"] = _interval(episode_accuracies(episodes, lambda e: prototype_predict(
            pixels[e.support], e.support_y, pixels[e.query])))


def _interval(accuracies) -> dict:
    mean, half = mean_confidence_interval(accuracies)
    return {"mean": mean, "ci95_half_width": None if math.isnan(half) else half, "episodes": len(accuracies)}


# -- helpers ---------------------------------------------------------------------------------------
class _Stages:
    """``with stages("name"):`` adds the block's wall time to ``seconds["name"]``."""

    def __init__(self, seconds: dict):
        self.seconds = seconds

    def __call__(self, name):
        import contextlib

        @contextlib.contextmanager
        def stage():
            start = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return stage()


def _progress(show: bool, total: int):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", file=sys.stderr, disable=not show, dynamic_ncols=True)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _version() -> str:
    import lqae_sklearn

    return lqae_sklearn.__version__


def _python_call(checkpoint, arguments: dict) -> str:
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(evaluate_checkpoint).parameters.items()}
    given = [f"{name}={value!r}" for name, value in arguments.items()
             if not (isinstance(value, tuple) and value == tuple(defaults[name]) or value == defaults[name])]
    return f"evaluate_checkpoint({', '.join([repr(str(checkpoint))] + given)})"

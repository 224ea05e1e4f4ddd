"""An evaluation's result as Markdown: what was run on which data, then one table per figure."""

from __future__ import annotations

from ._data import FASHION_MNIST


def evaluation_markdown(result: dict) -> str:
    """The result of :func:`evaluate_checkpoint` as Markdown: what was run, then one table per figure.

    Parameters
    ----------
    result : dict
        The return value of :func:`evaluate_checkpoint` (or its JSON, read back).

    Returns
    -------
    str
        A paragraph saying what was measured on which data (and, for a quick
        run, that it was quick and its sizes), then tables: reconstruction and
        codebook use; linear probes (width, test accuracy, lbfgs iterations, a
        fit that hit the cap marked); few-shot cells (mean ± 95% interval); and
        the command that produced it.

    See Also
    --------
    evaluate_checkpoint : Produces ``result``.

    Examples
    --------
    >>> from lqae_sklearn.evaluation import evaluate_checkpoint, evaluation_markdown
    >>> result = evaluate_checkpoint("fashion-mnist-small-28", quick=True)  # doctest: +SKIP
    >>> evaluation_markdown(result).splitlines()[0]  # doctest: +SKIP
    'Checkpoint `fashion-mnist-small-28` (LQAE, 1,100 training steps): 7 x 7 = 49 tokens per image ...'
    """
    c, d, s, settings = result["checkpoint"], result["data"], result["sizes"], result["settings"]
    if d["source"] == FASHION_MNIST:
        data = "Fashion-MNIST (its train and test splits)"
    elif d.get("test_source"):
        data = f"`{d['source']}` (train) and `{d['test_source']}` (test)"
    else:
        data = f"`{d['source']}`, split {d['split']}"
    steps = "" if c["training_steps"] is None else f", {c['training_steps']:,} training steps"
    patches = (f"all {s['kmeans_patches']:,} train patches" if s["kmeans_patches"] == s["kmeans_patches_available"]
               else f"{s['kmeans_patches']:,} random train patches (of {s['kmeans_patches_available']:,})")
    subsampled = s["train_images"] < d["train_available"] or s["test_images"] < d["test_available"]
    run = "**Quick run** (subsampled)" if result["quick"] else "**Subsampled run**" if subsampled else "Full run"
    lines = [
        f"Checkpoint `{c['given']}` ({c['model']}{steps}): {c['grid']} x {c['grid']} = {c['tokens_per_image']} "
        f"tokens per image of {c['image_size']} px, patch {c['patch_size']}, codebook {c['codebook_size']:,}.",
        "",
        f"{run} on {data}: {s['train_images']:,} train images (of {d['train_available']:,}) / {s['test_images']:,} "
        f"test images (of {d['test_available']:,}), seed {settings['random_state']}, device {settings['device']} "
        f"({settings['torch_threads']} torch threads). k-means: `{settings['kmeans']}` on {patches}. PCA "
        f"reconstructions are clipped to [0, 1].",
        "",
        "| tokenizer, same grid | tokens per image | test PSNR, mean of per-image PSNR | test PSNR, dataset-level "
        "10·log10(1/mean MSE) | codebook usage (test) | code perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["reconstruction"].values():
        usage = ("n/a (continuous)" if row["codebook_usage"] is None else
                 f"{100 * row['codebook_usage']:.1f}% ({row['distinct_tokens']:,} of {row['codebook_size']:,})")
        perplexity = "n/a" if row["perplexity"] is None else f"{row['perplexity']:,.0f}"
        lines.append(f"| {row['label']} | {row['tokens_per_image']} | {row['psnr_mean_per_image_db']:.2f} dB | "
                     f"{row['psnr_dataset_db']:.2f} dB | {usage} | {perplexity} |")
    lines += ["", f"Linear probes: {settings['probe']}, trained on the train split, scored on the test "
                  f"split.", "",
              "| probe features | scaler | width | test accuracy | lbfgs iterations |", "|---|---|---|---|---|"]
    for key, row in result["linear_probe"].items():
        if row is None:
            lines.append(f"| {'LM-layer features' if key == 'lm_layers' else key} | | n/a (no language model) | | |")
            continue
        cap = "" if row["converged"] else " (**not converged**" + (": hit the cap)" if row.get("hit_cap") else ")")
        lines.append(f"| {row['label']} | {row['scaler']} | {row['width']:,} | {row['accuracy']:.4f} | "
                     f"{row['iterations']}{cap} |")
    llm = any(cell.get("llm") for cell in result["few_shot"])
    lines += ["", "Few-shot, 1-shot episodes of the test split (one query per class), mean ± 95% interval "
                  "(Student t over episodes).", ""]
    header = "| cell | chance | token overlap, checkpoint | token overlap, k-means | pixel prototypes |"
    rule = "|---|---|---|---|---|"
    if llm:
        header += " LLM, default pipeline | pixel prototypes, LLM episodes |"
        rule += "---|---|"
    lines += [header, rule]
    for cell in result["few_shot"]:
        if cell["skipped"]:
            lines.append(f"| {cell['ways']}-way | {cell['chance']:.2f} | skipped: {cell['skipped']} | | |"
                         + (" | |" if llm else ""))
            continue
        row = (f"| {cell['ways']}-way | {cell['chance']:.2f} | {_ci(cell['token_overlap'])} | "
               f"{_ci(cell['token_overlap_kmeans'])} (K = {cell['kmeans_clusters']:,}) | "
               f"{_ci(cell['pixel_prototypes'])} |")
        if llm:
            row += f" {_ci(cell['llm'])} | {_ci(cell['pixel_prototypes_llm_episodes'])} |"
        lines.append(row)
    lines += ["", f"`{result['command']}` ({result['seconds']['total']:,.0f} s)", ""]
    return "\n".join(lines)


def _ci(cell) -> str:
    if cell is None:
        return "n/a"
    half = "" if cell["ci95_half_width"] is None else f" ± {cell['ci95_half_width']:.3f}"
    return f"{cell['mean']:.3f}{half} ({cell['episodes']:,} ep.)"

"""
Training a tiny checkpoint
==========================

:func:`lqae_sklearn.training.train` trains an LQAE from a
:class:`~lqae_sklearn.training.TrainConfig` and writes a checkpoint that
:class:`~lqae_sklearn.LQAETokenizer` loads like the shipped one. Here a very
small model (patch 7, so 16 tokens per image; width 64, one block) trains for
30 steps on the repository's 20 example images: enough to see the loop work and
the reconstructions start to take shape, nowhere near a useful model (the
shipped one trained for 1,100 steps of 512 images on a GPU).
"""

# %%
import json  # noqa: I001 - ruff takes lqae_sklearn.training (installed from training/) for a third-party package
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.plotting import ReconstructionDisplay
from lqae_sklearn.training import TrainConfig, train

folder = Path("../fashion-mnist")  # examples/fashion-mnist; the examples run from examples/gallery/
run = Path(tempfile.mkdtemp(prefix="lqae-tiny-"))
config = TrainConfig(
    data=str(folder),  # a folder of images (or "fashion-mnist", or a .npy array)
    out_dir=str(run),
    preset="small-28",
    model_overrides={"patch_size": 7, "encoder_dim": 64, "encoder_depth": 1, "encoder_heads": 2,
                     "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2},
    steps=30,
    batch_size=8,
    lr=2e-3,
    warmup_steps=4,
    log_every=5,
    save_every=30,
    device="cpu",
    progress=False,
)
checkpoint = train(config)
print(sorted(p.name for p in checkpoint.iterdir()))

# %%
# ``metrics.jsonl`` holds one record per ``log_every`` steps: losses, PSNR of
# the training batches, codebook usage.
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps = [r["step"] for r in records if "psnr" in r]
psnr = [r["psnr"] for r in records if "psnr" in r]
fig, ax = plt.subplots(figsize=(5, 3), layout="constrained")
ax.plot(steps, psnr, marker="o")
ax.set(xlabel="step", ylabel="PSNR of training batches (dB)", title="30 CPU steps")
plt.show()

# %%
# The checkpoint is a folder (``config.json`` + ``model.safetensors``); the
# tokenizer takes its path.
tokenizer = LQAETokenizer(checkpoint=checkpoint, output="ids").fit()
paths = [min(d.glob("*.png")) for d in sorted(folder.iterdir()) if d.is_dir()]
print(tokenizer.n_tokens_, "tokens per image:", tokenizer.transform(paths[:1]))
ReconstructionDisplay.from_estimator(tokenizer, paths)
plt.show()

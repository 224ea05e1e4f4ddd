"""
Reconstructions: what the tokens say
====================================

The decoder of an LQAE rebuilds an image from its tokens alone.
:class:`~lqae_sklearn.plotting.ReconstructionDisplay` draws originals over
:meth:`~lqae_sklearn.LQAETokenizer.inverse_transform` of their tokens, with the
PSNR of each (higher is closer; the shipped checkpoint averages 17.8 dB on the
10,000 test images).
"""

# %%
from pathlib import Path

import matplotlib.pyplot as plt

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.plotting import ReconstructionDisplay

folder = Path("../fashion-mnist")  # examples/fashion-mnist; the examples run from examples/gallery/
paths = [min(d.glob("*.png")) for d in sorted(folder.iterdir()) if d.is_dir()]  # one per class
tokenizer = LQAETokenizer(output="ids").fit()

display = ReconstructionDisplay.from_estimator(tokenizer, paths)
display.ax_.set_title("49 tokens per image")
plt.show()

# %%
# The same round trip by hand: ids, then images. ``inverse_transform`` also
# takes token texts.
ids = tokenizer.transform(paths)
print(ids.shape, tokenizer.inverse_transform(ids).shape)

# %%
# Nine tokens per image (``token_grid=3``) keep the rough shape and brightness
# and lose the rest: each token is spread over its block of patches.
coarse = ReconstructionDisplay.from_estimator(LQAETokenizer(token_grid=3).fit(), paths)
coarse.ax_.set_title("9 tokens per image (token_grid=3)")
plt.show()

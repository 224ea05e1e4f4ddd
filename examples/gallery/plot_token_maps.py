"""
Token maps: which word each patch becomes
=========================================

The shipped checkpoint cuts a 28 x 28 Fashion-MNIST image into 7 x 7 patches and
writes each patch as the nearest word of all-MiniLM-L6-v2's vocabulary.
:class:`~lqae_sklearn.plotting.TokenMapDisplay` writes those words on the image.
"""

# %%
# Real Fashion-MNIST test images ship with the repository, two per class, in
# folders named after their class. The tokenizer reads paths directly.
from pathlib import Path

import matplotlib.pyplot as plt

from lqae_sklearn import LQAETokenizer
from lqae_sklearn.plotting import TokenMapDisplay

images = Path("../fashion-mnist")  # examples/fashion-mnist; the examples run from examples/gallery/
sneaker = images / "sneaker" / "00012.png"
tokenizer = LQAETokenizer().fit()  # the shipped checkpoint; nothing is learnt from data

display = TokenMapDisplay.from_estimator(tokenizer, sneaker)
display.ax_.set_title("sneaker: one word per 4 x 4 patch")
plt.show()

# %%
# The words are exactly what ``transform`` gives as text, row by row, with one
# token per patch (``token_grid=None``; text defaults to the checkpoint's coarser
# 3 x 3 grid, below):
text = LQAETokenizer(output="text", token_grid=None).fit().transform([sneaker])[0]
print(text)
assert [t.get_text() for t in display.texts_] == text.split(" ")

# %%
# Most words describe the black border (``soto``, ``william``); the object's
# patches get other words. With ``token_grid=3`` the encoder's outputs are
# averaged over 3 x 3 regions first: nine words per image, the short texts
# that keep few-shot prompts cheap (``LQAETokenizer(output="text")`` writes
# these by default). Each cell is the block of patches its
# word stands for.
coarse = LQAETokenizer(token_grid=3).fit()
classes = ["sneaker", "bag", "trouser", "dress"]
fig, axes = plt.subplots(2, 4, figsize=(12, 6.4), layout="constrained")
for column, name in enumerate(classes):
    path = min((images / name).glob("*.png"))
    TokenMapDisplay.from_estimator(tokenizer, path, ax=axes[0, column])
    TokenMapDisplay.from_estimator(coarse, path, ax=axes[1, column])
    axes[0, column].set_title(name)
axes[0, 0].set_ylabel("49 tokens")
axes[1, 0].set_ylabel("token_grid=3")
plt.show()

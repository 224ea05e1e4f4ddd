"""
A few-shot episode with an LLM
==============================

:class:`~lqae_sklearn.LLMFewShotClassifier` writes one labelled demonstration per
class, as token text, into a prompt of its own, and scores each class by how
likely the query image's tokens are after it.
The labels are nonsense words, so the LLM can only bind them to images through
the demonstrations.

**What to expect.** With the embedded Gemma 3 270M this is a demonstration of
the mechanics, not of accuracy. The defaults used here are the best setting
measured (the query's likelihood after each class's own demonstrations, 3 x 3
tokens per image): above chance, but behind a
nearest-prototype classifier on raw pixels in every episode type
(:doc:`/user_guide/few_shot`, :doc:`/benchmarks`). One episode says nothing
about accuracy either way.

The first use of the embedded LLM converts it from its GGUF file (about a
minute); later ones load it from a cache in seconds.
"""

# %%
from pathlib import Path

import matplotlib.pyplot as plt
from sklearn.pipeline import make_pipeline

from lqae_sklearn import LLMFewShotClassifier, LQAETokenizer
from lqae_sklearn.plotting import FewShotEpisodeDisplay

folder = Path("../fashion-mnist")  # examples/fashion-mnist; the examples run from examples/gallery/
classes = {"dax": "sneaker", "blicket": "trouser", "wug": "bag"}
support = [min((folder / name).glob("*.png")) for name in classes.values()]
labels = list(classes)

few_shot = make_pipeline(
    LQAETokenizer(output="text"),  # nine tokens per image (the checkpoint's choice for text): a short prompt
    LLMFewShotClassifier(random_state=0),  # channel per class: p(tokens | that class's demonstrations)
).fit(support, labels)

# %%
# A query: the other sneaker. Its right answer is "dax". Each class has a prompt of its own: its
# demonstration as a ``label: tokens`` line, then the query's tokens, whose likelihood is the class's score.
query = sorted((folder / "sneaker").glob("*.png"))[1]
query_text = few_shot[0].transform([query])[0]
for label in few_shot.classes_:
    print(few_shot[-1].format_prompt(query_text, label))
display = FewShotEpisodeDisplay.from_estimator(few_shot, support, labels, query, query_label="dax")
plt.show()
print("predicted:", few_shot.classes_[display.proba.argmax()], "- right answer: dax")

# %%
# The other two held-out images, scored in one call:
queries = [sorted((folder / name).glob("*.png"))[1] for name in ("trouser", "bag")]
for name, row in zip(("trouser (blicket)", "bag (wug)"), few_shot.predict_proba(queries)):
    print(name, {str(label): round(float(p), 2) for label, p in zip(few_shot.classes_, row)})

"""An ``LQAETokenizer`` as a batch function for Ray Data (or any dict-of-arrays pipeline)."""

from __future__ import annotations

import numpy as np


class BatchEncoder:
    """Encode the image column of a batch with a tokenizer, adding ids, text or embeddings columns.

    Made for ``ray.data.Dataset.map_batches``: pass the class with the tokenizer as a
    constructor argument, and Ray builds one encoder per actor. The tokenizer's pickle
    holds its parameters and fitted facts, never weights, so shipping it to the actors
    is cheap; each actor loads the weights once, from the checkpoint path, onto its
    own device (``device="auto"`` picks the GPU Ray gave the actor).

    Parameters
    ----------
    tokenizer : LQAETokenizer
        Fitted or not (an unfitted one is fitted in each actor).
    image_column : str, default="image"
        The column holding images: an array (N, H, W[, C]) of uint8 or float in [0, 1].
    outputs : sequence of {"ids", "text", "embeddings"}, default=None
        Columns to add; None adds the tokenizer's ``output``.

    Attributes
    ----------
    tokenizer : LQAETokenizer
        The fitted tokenizer, its weights loaded.

    Examples
    --------
    >>> import ray.data  # doctest: +SKIP
    >>> from lqae_sklearn import LQAETokenizer
    >>> from lqae_sklearn.encoding import BatchEncoder
    >>> images = ray.data.read_images("images/", mode="L", size=(28, 28))  # doctest: +SKIP
    >>> tokens = images.map_batches(  # doctest: +SKIP
    ...     BatchEncoder, fn_constructor_args=(LQAETokenizer(output="text"),),
    ...     batch_size=256, compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1)

    Without Ray, it is a function of a dict of arrays:

    >>> import numpy as np
    >>> encoder = BatchEncoder(LQAETokenizer(output="ids", device="cpu"))
    >>> encoder({"image": np.zeros((2, 28, 28), np.uint8)})["ids"].shape
    (2, 49)
    """

    def __init__(self, tokenizer, image_column: str = "image", outputs=None):
        from sklearn.exceptions import NotFittedError
        from sklearn.utils.validation import check_is_fitted

        try:
            check_is_fitted(tokenizer)
        except NotFittedError:
            tokenizer = tokenizer.fit()
        self.tokenizer = tokenizer
        self.image_column = image_column
        self.outputs = tuple(outputs) if outputs is not None else (tokenizer.output_,)
        _ = self.tokenizer.model_  # load the weights once, when the actor starts

    def __call__(self, batch: dict) -> dict:
        """Encode ``batch[image_column]`` and return the batch with the output columns added.

        Parameters
        ----------
        batch : dict of str to ndarray
            A batch as Ray Data's ``batch_format="numpy"`` gives it.

        Returns
        -------
        dict of str to ndarray
            The batch's columns, plus one per output: ``"ids"`` int64 (N, n_tokens),
            ``"text"`` object (N,), ``"embeddings"`` float32 (N, n_features).
        """
        if self.image_column not in batch:
            raise KeyError(f"the batch has no column {self.image_column!r} (it has {sorted(batch)}); "
                           f"set BatchEncoder(image_column=...)")
        images = batch[self.image_column]
        if images.dtype == object:  # images of different sizes: a column of arrays
            images = list(images)
        encoded = self.tokenizer.encode(images, outputs=self.outputs)
        result = dict(batch)
        for name, values in encoded.items():
            result[name] = np.asarray(values, dtype=object) if name == "text" else values
        return result

"""The local engine: decoding in a pool of processes, encoding in this one, a batch at a time."""

from __future__ import annotations

from ._decode import DecodePipeline
from ._encoder import encode_images, load_tokenizer
from ._records import EncodedBatch, EncodedPart


def encode_locally(pending, *, preprocessing: dict, tokenizer_params: dict, outputs, with_labels: bool,
                   batch_size: int, workers: int):
    """Yield an :class:`EncodedPart` per batch of ``pending`` items, in order; the caller commits them.

    The model is loaded on the first batch holding a good image (decoding has started
    by then), so a rerun that only retries bad files never loads it.
    """
    batches = (pending[i : i + batch_size] for i in range(0, len(pending), batch_size))
    pipeline = DecodePipeline(batches, preprocessing, workers).start()  # decode while the model loads
    tokenizer = None
    try:
        for batch, results in pipeline:
            good = [(item, array) for item, (array, _) in zip(batch, results) if array is not None]
            if good and tokenizer is None:
                tokenizer = load_tokenizer(tokenizer_params)
            rows = (encode_images(tokenizer, [item.path for item, _ in good], [array for _, array in good],
                                  outputs, with_labels)
                    if good else EncodedBatch([], {}, with_labels))
            failures = [(item.path, reason) for item, (array, reason) in zip(batch, results) if array is None]
            yield EncodedPart(keys=rows.keys, failures=failures, batch=rows)
    finally:
        pipeline.close()

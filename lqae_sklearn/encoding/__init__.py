"""Encoding image corpora into token data sets: JSONL or Parquet, on one machine or a Ray cluster.

:func:`encode_dataset` is ``lqae-encode`` from Python; :class:`BatchEncoder` puts an
:class:`~lqae_sklearn.LQAETokenizer` into a Ray Data pipeline of your own. See
:doc:`/encoding-at-scale`.
"""

from ._batch_encoder import BatchEncoder
from ._encode_dataset import encode_dataset
from ._errors import EncodeError

__all__ = ["BatchEncoder", "EncodeError", "encode_dataset"]

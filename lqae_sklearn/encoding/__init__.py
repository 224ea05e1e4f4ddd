"""Encoding image corpora into token datasets: JSONL or Parquet, on one machine or a Ray cluster."""

from ._batch_encoder import BatchEncoder
from ._encode_dataset import encode_dataset
from ._run import EncodeError

__all__ = ["BatchEncoder", "EncodeError", "encode_dataset"]

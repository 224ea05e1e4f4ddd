"""One batch of encoded images as output rows (JSON records or an Arrow table), and what an engine
hands the driver to commit.

Both output formats are built from the same columns, so a JSONL file and a Parquet
folder written from the same images hold the same values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ._discovery import label_of, path_fields


class EncodedBatch:
    """Encoded images and the paths they came from, in the same order.

    Parameters
    ----------
    paths : list of str
        Image paths (undecodable bytes as surrogates, as :mod:`os` gives them).
    encoded : dict
        ``LQAETokenizer.encode`` output: ``"ids"`` int ndarray, ``"text"`` list of
        str, ``"embeddings"`` float32 ndarray, in the order of ``outputs``.
    with_labels : bool
        Add ``"label"``, the name of the folder holding each image.
    """

    def __init__(self, paths, encoded: dict, with_labels: bool):
        self.paths = list(paths)
        self.encoded = encoded
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def keys(self) -> list[bytes]:
        """The exact path bytes of each row."""
        return [os.fsencode(path) for path in self.paths]

    def records(self) -> list[dict]:
        """One JSON-ready dict per image (the JSONL format)."""
        records = []
        for row, path in enumerate(self.paths):
            record = path_fields(path)
            if self.with_labels:
                record["label"] = label_of(path)
            for name, values in self.encoded.items():
                value = values[row]
                record[name] = value if isinstance(value, str) else value.tolist()
            records.append(record)
        return records

    def table(self):
        """The same rows as a ``pyarrow.Table`` (the Parquet format).

        ``path_bytes_b64`` is always a column (null where the name is UTF-8), so every
        part of a dataset has one schema; ``ids`` and ``embeddings`` are fixed-size
        lists (int32, float32), which readers turn into 2-D arrays without copying.
        """
        import pyarrow as pa

        fields = [path_fields(path) for path in self.paths]
        columns = {
            "path": pa.array([f["path"] for f in fields], pa.string()),
            "path_bytes_b64": pa.array([f.get("path_bytes_b64") for f in fields], pa.string()),
        }
        if self.with_labels:
            columns["label"] = pa.array([label_of(path) for path in self.paths], pa.string())
        for name, values in self.encoded.items():
            if name == "text":
                columns[name] = pa.array(values, pa.string())
            else:
                dtype = np.int32 if name == "ids" else np.float32
                matrix = np.ascontiguousarray(values, dtype=dtype)
                columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
        return pa.table(columns)


@dataclass
class EncodedPart:
    """What an engine hands the driver, the only process that commits rows to OUT.

    Either ``batch`` holds the rows (the local engine: the output writes them) or
    ``staged`` names a Parquet part a worker already wrote into this run's staging
    folder (Ray); ``keys`` are the images whose rows these are, ``failures`` the
    ``(path, reason)`` of the files that could not be encoded.
    """

    keys: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    batch: EncodedBatch | None = None
    staged: str | None = None

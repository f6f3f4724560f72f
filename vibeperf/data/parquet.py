"""Parquet data files (`*.parquet`, as Hugging Face datasets export them), read row by row like JSONL lines.

Every reader of `vibeperf.data` takes a `.parquet` path wherever it takes a JSONL one: each row is a record with the
same fields (columns) as a JSONL object. A null is an absent field (a parquet column exists in every row, so a row
without an optional field has a null there); nested columns (lists, structs) arrive as lists and objects. A bad row
raises `DataError` naming `file:row N` (N counted from 0, as the dataset viewers count) and the field, e.g.
`data/train.parquet:row 16: field 'messages[2].content': expected a string, got int`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from vibeperf.data.jsonl import DataError

BATCH_ROWS = 1024


def parquet_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:row N`, row without its null fields) for every row of a parquet file, read in batches."""
    import pyarrow
    import pyarrow.parquet as pq

    name = os.fspath(path)
    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=BATCH_ROWS)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{name}:row {index}", {k: v for k, v in row.items() if v is not None}
                index += 1
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable parquet file: {' '.join(str(e).split())[:200]}") from None

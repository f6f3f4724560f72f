"""Parquet data files (`*.parquet`, as Hugging Face datasets export them), read row by row like JSONL lines.

Every reader of `vibeperf.data` takes a `.parquet` path wherever it takes a JSONL one: each row is a record with the
same fields (columns) as a JSONL object. A null is an absent field (a parquet column exists in every row, so a row
without an optional field has a null there); nested columns (lists, structs) arrive as lists and objects. A bad row
raises `DataError` naming `file:row N` (N counted from 0, as the dataset viewers count) and the field, e.g.
`data/train.parquet:row 16: field 'messages[2].content': expected a string, got int`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from vibeperf.data.jsonl import DataError, _FieldError

T = TypeVar("T")
BATCH_ROWS = 1024


def is_parquet(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(".parquet")


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


def read_parquet(path: str | os.PathLike, parse: Callable[[Mapping[str, Any]], T]) -> list[T]:
    """Parse every row of `path` with `parse`; DataError naming `file:row N` and the field at the first bad one."""
    records = []
    for where, row in parquet_rows(path):
        try:
            records.append(parse(row))
        except _FieldError as e:
            raise DataError(f"{where}: field '{e.field}': {e.problem}") from None
    if not records:
        raise DataError(f"{os.fspath(path)}: no records")
    return records

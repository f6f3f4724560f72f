"""Readers and a writer for local JSONL data files (one JSON object per line); the readers take parquet files too.

SFT lines: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (or ShareGPT's turns `{"from":
"system"|"human"|"gpt", "value": str}`, e.g. with a column mapping `messages = "conversations"`) with at least one
assistant message, or `{"prompt": str, "response": str}` (read as a user and an assistant message); optional
`"weight"` (a loss weight, finite and >= 0, default 1.0).
RL lines: `{"prompt": str, "domain": str, "answer": str|int|float}` or `{"prompt", "domain", "tests": [{"input": str,
"output": str}, ...]}` (exactly one of answer and tests; the tests may also be given in the formats of LiveCodeBench,
APPS/TACO, HumanEval and MBPP, and of functional and assert kinds: `vibeperf.data.code_formats`); optional `"id"`
(string or integer) and `"subdomain"` (a non-empty string, e.g. "geometry", used to group evaluation results and to
select checkpoints per subdomain). Numeric answers and ids are kept as strings (`str(value)`).

Blank lines are skipped and keys not named here are ignored. Every line is checked before anything is returned; the
first bad one raises `DataError` naming `file:line` and the field, e.g.
`data/train.jsonl:17: field 'messages[2].content': expected a string, got int`.

Lines are read with a size cap (`read_lines`): a line over `max_line_bytes` (default 4 MiB, about 1M tokens; the
environment variable VIBEPERF_MAX_LINE_MB changes it) is refused with its `file:line` before it is parsed or
tokenised, so one huge line cannot take gigabytes of memory.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vibeperf.errors import UserError

T = TypeVar("T")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
_MISSING = object()
MAX_LINE_BYTES = 4 * 2**20
"""Default per-line cap of the readers, in bytes (the environment variable VIBEPERF_MAX_LINE_MB overrides it)."""
_EXPECTED = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}
_GOT = {str: "string", int: "int", float: "float", bool: "bool", list: "list", dict: "object", type(None): "null"}


class DataError(UserError, ValueError):
    """A malformed data file; the message names `file:line` and, for a bad record, the field."""


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class SFTRecord:
    """A supervised example: the conversation and its loss weight."""

    messages: tuple[Message, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class CodeTest:
    """One test of a code problem (`vibeperf.data.code_formats` reads the dataset formats into these).

    kind "stdin": `input` on stdin, `output` the expected stdout; "functional": `fn_name` called with the JSON values
    of `input`'s lines, `output` the JSON of the expected return value; "assert": `input` is test code run after the
    program (then `check(fn_name)` when `fn_name` is set), `output` unused.
    """

    input: str
    output: str
    kind: str = "stdin"
    fn_name: str | None = None


@dataclass(frozen=True)
class RLRecord:
    """An RL prompt with a verifiable target: exactly one of `answer` (math/stem) and `tests` (code)."""

    prompt: str
    domain: str
    answer: str | None = None
    tests: tuple[CodeTest, ...] | None = None
    id: str | None = None
    subdomain: str | None = None


class _FieldError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _type_name(value: Any) -> str:
    return _GOT.get(type(value), type(value).__name__)


def _field(
    obj: Mapping[str, Any],
    key: str,
    kinds: tuple[type, ...],
    where: str = "",
    *,
    default: Any = _MISSING,
    nonempty: bool = False,
    choices: tuple[str, ...] = (),
) -> Any:
    """`obj[key]` checked to be one of `kinds` (bool is not a number, floats are finite); `default` if absent.

    `nonempty`: a string must hold a non-space character, a list at least one item. `choices`: the allowed values.
    """
    name = f"{where}.{key}" if where else key
    if key not in obj:
        if default is _MISSING:
            raise _FieldError(name, "missing")
        return default
    value = obj[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(_EXPECTED[k] for k in kinds if not (k is int and float in kinds))
        raise _FieldError(name, f"expected {expected}, got {_type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _FieldError(name, f"expected a finite number, got {value}")
    if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise _FieldError(name, f"expected a non-empty {'string' if isinstance(value, str) else 'list'}")
    if choices and value not in choices:
        raise _FieldError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _items(obj: Mapping[str, Any], key: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The objects of the non-empty list `obj[key]`, each with its field name (`key[i]`)."""
    out = []
    for i, item in enumerate(_field(obj, key, (list,), nonempty=True)):
        if not isinstance(item, dict):
            raise _FieldError(f"{key}[{i}]", f"expected an object, got {_type_name(item)}")
        out.append((f"{key}[{i}]", item))
    return out


def _exactly_one(obj: Mapping[str, Any], first: str, second: str) -> str:
    """The one of the keys `first`, `second` that `obj` has."""
    if (first in obj) == (second in obj):
        problem = "give only one of" if first in obj else "missing: give one of"
        raise _FieldError(first, f"{problem} '{first}' and '{second}'")
    return first if first in obj else second


def _message(m: Mapping[str, Any], where: str) -> Message:
    """A chat turn: {"role", "content"}, or ShareGPT's {"from": "human" | "gpt" | "system", "value"}."""
    if "from" in m and "role" not in m:
        speaker = _field(m, "from", (str,), where, choices=tuple(SHAREGPT_ROLES))
        return Message(SHAREGPT_ROLES[speaker], _field(m, "value", (str,), where))
    return Message(_field(m, "role", (str,), where, choices=ROLES), _field(m, "content", (str,), where))


def _parse_sft(obj: Mapping[str, Any]) -> SFTRecord:
    if _exactly_one(obj, "messages", "prompt") == "prompt":
        messages = (
            Message("user", _field(obj, "prompt", (str,), nonempty=True)),
            Message("assistant", _field(obj, "response", (str,))),
        )
    else:
        messages = tuple(_message(m, w) for w, m in _items(obj, "messages"))
        if not any(m.role == "assistant" for m in messages):
            raise _FieldError("messages", "no assistant message")
    weight = _field(obj, "weight", (int, float), default=1.0)
    if weight < 0:
        raise _FieldError("weight", f"expected a number >= 0, got {weight}")
    return SFTRecord(messages=messages, weight=float(weight))


def _parse_rl(obj: Mapping[str, Any]) -> RLRecord:
    prompt = _field(obj, "prompt", (str,), nonempty=True)
    domain = _field(obj, "domain", (str,), nonempty=True)
    record_id = _field(obj, "id", (str, int), default=None)
    record_id = None if record_id is None else str(record_id)
    subdomain = _field(obj, "subdomain", (str,), default=None, nonempty=True)
    from vibeperf.data.code_formats import TEST_FIELDS, read_tests  # it builds on this module's field checks

    has_tests = any(k in obj for k in (*TEST_FIELDS, "private_test_cases"))
    if "answer" in obj or not has_tests:
        _exactly_one(obj, "answer", next((k for k in TEST_FIELDS if k in obj), "tests"))
        answer = str(_field(obj, "answer", (str, int, float), nonempty=True))
        return RLRecord(prompt, domain, answer=answer, id=record_id, subdomain=subdomain)
    return RLRecord(prompt, domain, tests=read_tests(obj), id=record_id, subdomain=subdomain)


def _rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, object) for every non-blank line of a JSONL file (gunzipped on the fly for `.gz`), or (`file:row
    N`, row) for every row of a `.parquet` file (`vibeperf.data.parquet`); DataError at a line that is not an object."""
    if os.fspath(path).endswith(".parquet"):
        from vibeperf.data.parquet import parquet_rows  # it builds on this module's errors

        yield from parquet_rows(path)
        return
    for lineno, text in read_lines(path):
        where = f"{os.fspath(path)}:{lineno}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(obj)}")
        yield where, obj


def max_line_bytes() -> int:
    """The readers' per-line cap: VIBEPERF_MAX_LINE_MB (MiB) when set, else `MAX_LINE_BYTES`."""
    text = os.environ.get("VIBEPERF_MAX_LINE_MB", "").strip()
    if not text:
        return MAX_LINE_BYTES
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"VIBEPERF_MAX_LINE_MB={text!r}: expected a number of MiB > 0")
    return int(value * 2**20)


def read_lines(path: str | os.PathLike, *, max_bytes: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of the UTF-8 file `path` (gunzipped on the fly for `.gz`; a
    leading BOM and line ends dropped).

    Reads at most `max_bytes` + 1 bytes per line (default `max_line_bytes()`): a longer line raises DataError naming
    `file:line` before the rest of it is read. A missing file, a directory or an unreadable file is a DataError too.
    """
    name = os.fspath(path)
    limit = max_line_bytes() if max_bytes is None else max_bytes
    if os.path.isdir(path):
        raise DataError(f"{name}: is a directory, expected a data file")
    try:
        f = (gzip.open if name.endswith(".gz") else open)(path, "rb")
    except OSError as e:
        raise DataError(f"{name}: cannot be read: {e.strerror or e}") from None
    with f:
        lineno = 0
        while raw := f.readline(limit + 1):
            lineno += 1
            where = f"{name}:{lineno}"
            if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
                raise DataError(f"{where}: line longer than {limit} bytes (the readers' cap: set VIBEPERF_MAX_LINE_MB "
                                "to raise it)")  # fmt: skip
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff" if lineno == 1 else "").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start}: {e.reason}") from None
            if text.strip():
                yield lineno, text


def _read_located(path: str | os.PathLike, parse: Callable[[Mapping[str, Any]], T]) -> list[tuple[str, dict, T]]:
    """(where, row, record) for every row of `path` (see `_rows`); DataError naming the row and field at a bad one."""
    out = []
    for where, obj in _rows(path):
        try:
            out.append((where, obj, parse(obj)))
        except _FieldError as e:
            raise DataError(f"{where}: field '{e.field}': {e.problem}") from None
    if not out:
        raise DataError(f"{os.fspath(path)}: no records")
    return out


def _read_jsonl(path: str | os.PathLike, parse: Callable[[Mapping[str, Any]], T]) -> list[T]:
    """Parse every row of `path` (JSONL, JSONL.gz or parquet: `_rows`) with `parse`; DataError naming `file:line`
    (or `file:row N`) and the field at the first bad one."""
    return [record for _, _, record in _read_located(path, parse)]


def read_sft_jsonl(path: str | os.PathLike) -> list[SFTRecord]:
    """Read an SFT JSONL (or parquet) file (see the module docstring); DataError on any malformed line."""
    return _read_jsonl(path, _parse_sft)


def read_rl_jsonl(path: str | os.PathLike) -> list[RLRecord]:
    """Read an RL JSONL (or parquet) file (see the module docstring); DataError on any malformed line."""
    return _read_jsonl(path, _parse_rl)


def write_jsonl(path: str | os.PathLike, records: Iterable[SFTRecord | RLRecord | Mapping[str, Any]]) -> None:
    """Write one JSON object per line to `path` atomically (temporary file + `os.replace`).

    Records are dataclasses (written without their `None` fields, so `read_*_jsonl` reads them back equal) or plain
    mappings. On any error `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for record in records:
                if dataclasses.is_dataclass(record):
                    record = dataclasses.asdict(record, dict_factory=lambda kv: {k: v for k, v in kv if v is not None})
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# The readers' building blocks under public names, for line formats defined elsewhere (vibeperf.score's scoring input,
# vibeperf.clr's queries, vibeperf.sft's verdicts): `read_records(path, parse)` reads JSONL / parquet rows through
# `parse(obj)` with `file:line` errors, `read_rows(path)` yields (file:line, object) pairs, `get_field(obj, name,
# types, ...)` reads one typed field, `parse_sft_record(obj)` an SFT record.
read_records = _read_jsonl
read_rows = _rows
get_field = _field
parse_sft_record = _parse_sft

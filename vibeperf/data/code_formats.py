"""The tests of a code problem, read from the fields datasets ship them in, as `CodeTest`s.

`CodeTest.kind` is one of "stdin", "functional", "assert" (`vibeperf.rewards.code_tests` says how each is run and
judged). An RL record's tests come from exactly one of these fields:

- `tests`: a list of `{"input", "output"}` objects (or a JSON string holding one, as LiveCodeBench's
  `public_test_cases` column), each optionally with `kind` (or LiveCodeBench's `testtype`) and `fn_name` (or
  `func_name`); a functional test without a name takes the record's `fn_name` / `func_name`, or `func_name` of
  LiveCodeBench's `metadata` (an object or a JSON string). An assert test's `output` may be omitted.
- `public_test_cases` and/or `private_test_cases` (LiveCodeBench rows, both read): JSON strings of such lists; the
  compressed private tests of `code_generation_lite` (base64 of zlib of a pickled JSON string) are decoded with an
  unpickler that refuses every class, so nothing but plain data can come out of them.
- `input_output` (APPS, TACO): an object or a JSON string `{"inputs": [...], "outputs": [...], "fn_name"?}`. With
  `fn_name` the tests are functional (each input a list of arguments, each output the expected value); without, stdin
  (an input or output given as a list of lines is joined with newlines).
- `test` with `entry_point` (HumanEval): one assert test that runs `test` and then `check(entry_point)`.
- `test_list` (MBPP): one assert test per assertion, each after `test_setup_code` / `test_imports` when present.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from collections.abc import Mapping
from typing import Any

from vibeperf.data.jsonl import CodeTest, _field, _FieldError, _type_name

KINDS = ("stdin", "functional", "assert")
TEST_FIELDS = ("tests", "public_test_cases", "input_output", "test", "test_list")
_LCB = ("public_test_cases", "private_test_cases")


class _DataOnly(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is accepted")


def _json(value: Any, name: str) -> Any:
    """`value`, or the JSON it holds when it is a string (LiveCodeBench's compressed form decoded first)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        first_error = e
    try:
        text = _DataOnly(io.BytesIO(zlib.decompress(base64.b64decode(value, validate=True)))).load()
        return json.loads(text)
    except Exception:  # not the compressed form either: report the plain-JSON error, the likely intent
        raise _FieldError(name, f"invalid JSON: {first_error.msg} at column {first_error.colno}") from None


def test_problem(kind: Any, inp: str, out: str, fn_name: str | None) -> tuple[str, str] | None:
    """(field, problem) when a test of `kind` cannot run, else None: a known kind; a functional test needs a name, and
    JSON in its input lines and output."""
    if kind not in KINDS:
        return "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}"
    if kind != "functional":
        return None
    if not fn_name:
        return "fn_name", "missing: a functional test names the function (or Solution method) to call"
    for where, text in [*(("input", line) for line in inp.splitlines() if line.strip()), ("output", out)]:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return where, f"a functional test's value is not JSON: {e.msg} at column {e.colno}"
    return None


def _record_fn_name(obj: Mapping[str, Any]) -> str | None:
    for key in ("fn_name", "func_name"):
        if isinstance(obj.get(key), str) and obj[key].strip():
            return obj[key]
    meta = obj.get("metadata")
    if meta is not None:
        meta = _json(meta, "metadata")
        if isinstance(meta, dict) and isinstance(meta.get("func_name"), str) and meta["func_name"].strip():
            return meta["func_name"]
    return None


def _test_list(obj: Mapping[str, Any], key: str, default_fn: str | None) -> list[CodeTest]:
    value = _json(obj[key], key)
    if not isinstance(value, list):
        raise _FieldError(key, f"expected a list (or a JSON string holding one), got {_type_name(value)}")
    if not value and key not in _LCB:  # LiveCodeBench's public or private list may be empty, not both
        raise _FieldError(key, "expected a non-empty list")
    out = []
    for i, t in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise _FieldError(name, f"expected an object, got {_type_name(t)}")
        kind = t.get("kind", t.get("testtype", "stdin"))
        fn = t.get("fn_name") or t.get("func_name") or (default_fn if kind == "functional" else None)
        inp = _field(t, "input", (str,), name)
        output = _field(t, "output", (str,), name, **({"default": ""} if kind == "assert" else {}))
        problem = test_problem(kind, inp, output, fn)
        if problem is not None:
            raise _FieldError(f"{name}.{problem[0]}", problem[1])
        out.append(CodeTest(inp, output, kind, fn))
    return out


def _apps(obj: Mapping[str, Any]) -> list[CodeTest]:
    io_spec = _json(obj["input_output"], "input_output")
    if not isinstance(io_spec, dict):
        raise _FieldError("input_output", "expected an object with 'inputs' and 'outputs'")
    inputs, outputs = io_spec.get("inputs"), io_spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise _FieldError("input_output", "expected non-empty lists 'inputs' and 'outputs' of the same length")
    fn = io_spec.get("fn_name")
    tests = []
    for i, (inp, out) in enumerate(zip(inputs, outputs)):
        if fn:
            if not isinstance(inp, list):
                raise _FieldError(f"input_output.inputs[{i}]", "expected the list of arguments of a call")
            tests.append(CodeTest("\n".join(json.dumps(a) for a in inp), json.dumps(out), "functional", fn))
            continue
        inp, out = ("\n".join(map(str, v)) if isinstance(v, list) else v for v in (inp, out))
        if not isinstance(inp, str) or not isinstance(out, str):
            raise _FieldError(f"input_output.inputs[{i}]", "expected strings (stdin and stdout) or lists of lines")
        tests.append(CodeTest(inp, out))
    return tests


def read_tests(obj: Mapping[str, Any]) -> tuple[CodeTest, ...] | None:
    """The tests of an RL record (see the module docstring); None when it has no test field."""
    present = [k for k in TEST_FIELDS if k in obj] + (["private_test_cases"] if "private_test_cases" in obj else [])
    if not present:
        return None
    if len(present) > 1 and set(present) != set(_LCB):
        raise _FieldError(present[0], f"give only one of {', '.join(repr(k) for k in present)}")
    source = present[0]
    if source in ("tests", *_LCB):
        fn = _record_fn_name(obj)
        tests = [t for key in ("tests", *_LCB) if key in obj for t in _test_list(obj, key, fn)]
        if not tests:
            raise _FieldError(source, "no tests: public_test_cases and private_test_cases are both empty")
    elif source == "input_output":
        tests = _apps(obj)
    elif source == "test":
        test, entry = _field(obj, "test", (str,), nonempty=True), _field(obj, "entry_point", (str,), nonempty=True)
        tests = [CodeTest(test, "", "assert", entry)]
    else:
        imports = obj.get("test_imports") or []
        setup = "\n".join([*(imports if isinstance(imports, list) else [imports]), obj.get("test_setup_code") or ""])
        asserts = _field(obj, "test_list", (list,), nonempty=True)
        for i, a in enumerate(asserts):
            if not isinstance(a, str) or not a.strip():
                raise _FieldError(f"test_list[{i}]", "expected a non-empty string (an assert statement)")
        tests = [CodeTest(f"{setup.strip()}\n{a}\n".lstrip("\n"), "", "assert") for a in asserts]
    return tuple(tests)

"""Code test formats: what one test of a code problem holds, and how a run of it is judged.

A test is a `vibeperf.data.CodeTest` or a mapping with the same keys (`input`, `output`, optional `kind` and
`fn_name`; LiveCodeBench's spellings `testtype` and `func_name` are accepted too; `vibeperf.data.code_formats` reads
the dataset formats into these). Kinds:

- "stdin" (the default): `input` is fed on stdin, stdout must equal `output` after whitespace normalisation (surrounding
  blank lines dropped, trailing spaces of each line dropped).
- "functional" (LiveCodeBench's `testtype: "functional"`, APPS/TACO call-based tests): `fn_name` is a function of the
  program, or a method of its `class Solution` (LeetCode style, instantiated once per test); it is called with the
  JSON values of `input`'s lines as positional arguments (one argument per line), after LiveCodeBench's imports
  (`from typing import *`, collections, heapq, ...), and its return value (a tuple read as a list) must equal the JSON
  value `output`, or its only element when `output` is a one-element list (APPS's convention).
- "assert" (HumanEval, MBPP): `input` is test code run after the program in the same module, followed by
  `check(fn_name)` when `fn_name` is given (HumanEval's `check(candidate)`); the test passes when it completes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from vibeperf.data.code_formats import test_problem
from vibeperf.data.jsonl import CodeTest

_SHOW = 60


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def as_test(test) -> CodeTest:
    """A checked `CodeTest` from a CodeTest or a mapping; ValueError naming the field when it cannot run."""
    get = test.get if isinstance(test, Mapping) else lambda key, default=None: getattr(test, key, default)
    kind = get("kind") or get("testtype") or "stdin"
    fn_name = get("fn_name") or get("func_name") or None
    inp, out = get("input"), get("output", "" if kind == "assert" else None)
    if not isinstance(inp, str) or not isinstance(out, str):
        raise ValueError(f"a {kind} test needs string 'input' and 'output', got {type(inp).__name__} and "
                         f"{type(out).__name__}")  # fmt: skip
    problem = test_problem(kind, inp, out, fn_name)
    if problem is not None:
        raise ValueError(f"test field '{problem[0]}': {problem[1]}")
    return CodeTest(inp, out, kind, fn_name)


def normalize_output(text: str) -> list[str]:
    """Lines of `text` with trailing whitespace removed, without leading/trailing blank lines."""
    return [line.rstrip() for line in text.strip().splitlines()]


def judge_output(test: CodeTest, stdout: str, result: str | None) -> str | None:
    """Why a run that exited 0 within its limits fails `test` (None: it passes).

    `result` is the harness's result for functional and assert tests (None when the program exited before the test
    completed); stdin tests are judged on `stdout`.
    """
    if test.kind == "stdin":
        got, want = normalize_output(stdout), normalize_output(test.output)
        if got != want:
            return f"wrong output: expected '{_short(chr(10).join(want))}', got '{_short(chr(10).join(got))}'"
        return None
    if result is None:
        return "no result: the program exited before the test completed"
    if test.kind == "assert":
        return None
    got, want = json.loads(result), json.loads(test.output)
    if got == want or (isinstance(want, list) and len(want) == 1 and got == want[0]):
        return None
    return f"wrong return value: expected {_short(test.output)}, got {_short(result)}"

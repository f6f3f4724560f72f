"""`score(domain, record, completion)`: the reward of one completion, dispatched on the record's domain.

math / STEM domains go through math-verify against the record's `answer` (`math_reward`), code domains through the
sandboxed test runner against its `tests` (`code_reward`). A record is an `RLRecord` (vibeperf.data) or a mapping
with the same keys. An unknown domain, or a record without the field its domain needs, is a data error (ValueError);
anything about the completion itself gives a reward with a reason, never an exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vibeperf.rewards.code import SandboxConfig, code_reward
from vibeperf.rewards.math import RewardResult, math_reward

MATH_DOMAINS = frozenset({"math", "stem", "science", "physics", "chemistry", "biology"})
CODE_DOMAINS = frozenset({"code", "coding", "programming"})


def _get(record: Any, key: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(key)
    return getattr(record, key, None)


def domain_kind(domain: str) -> str:
    """The kind of a domain name, "math" or "code" (case-insensitive); ValueError for an unknown one."""
    name = str(domain).strip().lower()
    if name in MATH_DOMAINS:
        return "math"
    if name in CODE_DOMAINS:
        return "code"
    raise ValueError(
        f"unknown reward domain {domain!r}: expected one of {sorted(MATH_DOMAINS)} (math-verify) "
        f"or {sorted(CODE_DOMAINS)} (sandboxed tests)"
    )


def score(
    domain: str,
    record: Any,
    completion: str,
    *,
    sandbox: SandboxConfig | None = None,
    require_boxed: bool = True,
    math_timeout_s: int | None = 5,
) -> RewardResult:
    """Reward of `completion` for `record` under `domain` (see the module docstring).

    `sandbox` configures code runs; `require_boxed` and `math_timeout_s` are passed to `math_reward`.
    """
    kind = domain_kind(domain)
    if kind == "math":
        answer = _get(record, "answer")
        if answer is None:
            raise ValueError(f"a {domain!r} record needs an 'answer' field")
        return math_reward(str(answer), completion, require_boxed=require_boxed, timeout_s=math_timeout_s)
    tests = _get(record, "tests")
    if not tests:
        raise ValueError(f"a {domain!r} record needs a non-empty 'tests' field")
    return code_reward(tests, completion, sandbox)

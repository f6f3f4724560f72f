"""Verifiable rewards: math / STEM answers through math-verify, code through a sandboxed test runner.

`score(domain, record, completion)` dispatches on the domain; `math_reward` and `code_reward` are the two graders.
Each returns a `RewardResult(reward, reason)` with the reward in [0, 1]. `Scorer(RewardConfig)` is how the stages
grade many completions (in this process with a thread pool for code, or in spawned worker processes).
"""

from vibeperf.rewards.code import (
    RunResult,
    SandboxConfig,
    SandboxError,
    TestOutcome,
    code_reward,
    extract_code,
    isolation_level,
    run_program,
    run_tests,
)
from vibeperf.rewards.math import RewardResult, last_boxed, math_reward
from vibeperf.rewards.registry import CODE_DOMAINS, MATH_DOMAINS, domain_kind, score
from vibeperf.rewards.scorer import Scorer, grade_one

__all__ = [
    "CODE_DOMAINS",
    "MATH_DOMAINS",
    "RewardResult",
    "RunResult",
    "SandboxConfig",
    "SandboxError",
    "Scorer",
    "TestOutcome",
    "code_reward",
    "domain_kind",
    "extract_code",
    "grade_one",
    "isolation_level",
    "last_boxed",
    "math_reward",
    "run_program",
    "run_tests",
    "score",
]

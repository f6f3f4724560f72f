"""`Scorer`: the one way every stage grades completions (RL, the static filter, eval, spectrum, distill, the demo).

`Scorer(cfg: RewardConfig)` grades (record, completion text) pairs with `vibeperf.rewards.score` (math-verify for
math/STEM, the sandboxed test runner for code) under the config's limits. `grade(items)` returns one
`RewardResult(reward, reason)` per item, in order; `scorer(items)` only the rewards. Where the work runs:
- in this process (default): math in the calling thread (math-verify's timeouts need the main thread), code tests in
  a pool of `workers` threads (each test run is its own sandboxed subprocess, so threads suffice);
- with `processes`: in `workers` spawned worker processes (`vibeperf.rewards.pool.WorkerPool`), started at the
  first call and reused until `close()` (math grading then runs in parallel too). A worker that crashes or hangs
  costs only its completion, which gets reward 0 with the reason in `Scorer.failures` (the RL step counts them as
  `reward_failures`); each completion's deadline is its grader's own limits plus a margin: 3 * math_timeout_s for
  math (gold parse, answer parse, verify), code_timeout_s per test plus one for code. Spawned, not forked: the parent
  may hold a rollout engine and OpenMP threads that a fork would copy half-alive. This module imports only the
  rewards and the config, so a worker starts quickly.
Use it as a context manager (or call `close()`) to stop the threads and workers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vibeperf.config import RewardConfig
from vibeperf.rewards.code import SandboxConfig
from vibeperf.rewards.math import RewardResult
from vibeperf.rewards.pool import WorkerPool
from vibeperf.rewards.registry import domain_kind, score

log = logging.getLogger("vibeperf.rewards")
MARGIN_S = 5.0


def grade_one(record: Any, text: str, cfg: RewardConfig) -> RewardResult:
    """The reward of one completion (`record` has `domain` and `answer` or `tests`)."""
    sandbox = SandboxConfig(
        wall_timeout_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb, all_or_nothing=cfg.code_all_or_nothing
    )
    return score(
        record.domain, record, text, sandbox=sandbox, require_boxed=cfg.require_boxed, math_timeout_s=cfg.math_timeout_s
    )


def _grade_in_worker(item: tuple) -> tuple[float, str]:
    record, text, cfg = item
    result = grade_one(record, text, cfg)
    return result.reward, result.reason


class Scorer:
    """Grades (record, completion text) pairs under `RewardConfig` (see the module docstring)."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self._threads: ThreadPoolExecutor | None = None
        self._workers: WorkerPool | None = None
        self.failures: list[str] = []
        """Why each pair of the last call that got reward 0 without being graded did (a worker crashed or hung)."""

    def deadline(self, record: Any) -> float:
        """Seconds a worker may spend on one completion of `record` before it is killed."""
        if getattr(record, "tests", None):
            return self.cfg.code_timeout_s * (len(record.tests) + 1) + MARGIN_S
        return 3.0 * self.cfg.math_timeout_s + MARGIN_S

    def grade(self, items: Sequence[tuple[Any, str]]) -> list[RewardResult]:
        """One RewardResult per (record, text), in order."""
        cfg = self.cfg
        self.failures = []
        if cfg.processes:
            if self._workers is None:
                self._workers = WorkerPool(_grade_in_worker, cfg.workers, name="reward worker")
            outcomes = self._workers.map([(r, t, cfg) for r, t in items], [self.deadline(r) for r, _ in items])
            self.failures = [o.reason for o in outcomes if not o.ok]
            if self.failures:
                log.warning(
                    "%d of %d rewards could not be computed and count 0 (first: %s)",
                    len(self.failures),
                    len(items),
                    self.failures[0],
                )
            return [RewardResult(*o.value) if o.ok else RewardResult(0.0, o.reason) for o in outcomes]
        if cfg.workers <= 1:
            return [grade_one(r, t, cfg) for r, t in items]
        if self._threads is None:
            self._threads = ThreadPoolExecutor(cfg.workers)
        pending = [
            self._threads.submit(grade_one, r, t, cfg) if domain_kind(r.domain) == "code" else None for r, t in items
        ]
        out = [grade_one(r, t, cfg) if p is None else None for (r, t), p in zip(items, pending)]
        return [x if p is None else p.result() for x, p in zip(out, pending)]

    def __call__(self, items: Sequence[tuple[Any, str]]) -> list[float]:
        """The rewards of `grade(items)`."""
        return [r.reward for r in self.grade(items)]

    def close(self) -> None:
        """Stop the worker threads or processes (a later call starts them again)."""
        if self._threads is not None:
            self._threads.shutdown(cancel_futures=True)
            self._threads = None
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

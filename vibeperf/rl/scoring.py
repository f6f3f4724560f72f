"""`Scorer`: the rewards of (RL record, completion text) pairs, in this process or in a pool of spawned workers.

With `reward.workers` > 0 the pairs go to `vibeperf.rewards.pool.WorkerPool`: a worker that crashes or hangs costs
only its pair, which gets reward 0 with the reason in `Scorer.failures` (the step goes on; the RL metrics count
them as `reward_failures`). Each pair's deadline is its grader's own limits plus a margin: 3 * math_timeout_s for
math (gold parse, answer parse, verify), code_timeout_s per test plus one for code.

This module imports only the reward functions and the config, so a spawned worker starts quickly (it imports this
module to unpickle its task, not the trainer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vibeperf.data import RLRecord
from vibeperf.rewards import SandboxConfig, score
from vibeperf.rewards.pool import WorkerPool
from vibeperf.rl.config import RewardConfig

log = logging.getLogger("vibeperf.rl")
MARGIN_S = 5.0


def _score_one(item: tuple) -> float:
    record, text, cfg = item
    return Scorer.score(record, text, cfg)


class Scorer:
    """Rewards of (record, completion text) pairs under `RewardConfig`; `close()` stops the workers, if any."""

    def __init__(self, cfg: RewardConfig):
        self.cfg, self._pool = cfg, None
        self.failures: list[str] = []
        """Why each pair of the last call that got reward 0 without being graded did (a worker crashed or hung)."""

    @staticmethod
    def score(record: RLRecord, text: str, cfg: RewardConfig) -> float:
        sandbox = SandboxConfig(wall_timeout_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb,
                                all_or_nothing=cfg.code_all_or_nothing)  # fmt: skip
        return score(record.domain, record, text, sandbox=sandbox, require_boxed=cfg.require_boxed,
                     math_timeout_s=cfg.math_timeout_s).reward  # fmt: skip

    def deadline(self, record: RLRecord) -> float:
        """Seconds a worker may spend on one completion of `record` before it is killed."""
        if record.tests:
            return self.cfg.code_timeout_s * (len(record.tests) + 1) + MARGIN_S
        return 3.0 * self.cfg.math_timeout_s + MARGIN_S

    def __call__(self, items: Sequence[tuple[RLRecord, str]]) -> list[float]:
        self.failures = []
        if self.cfg.workers == 0:
            return [self.score(record, text, self.cfg) for record, text in items]
        if self._pool is None:
            self._pool = WorkerPool(_score_one, self.cfg.workers, name="reward worker")
        outcomes = self._pool.map([(r, t, self.cfg) for r, t in items], [self.deadline(r) for r, _ in items])
        self.failures = [o.reason for o in outcomes if not o.ok]
        if self.failures:
            log.warning("%d of %d rewards could not be computed and count 0 (first: %s)", len(self.failures),
                        len(items), self.failures[0])  # fmt: skip
        return [o.value if o.ok else 0.0 for o in outcomes]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

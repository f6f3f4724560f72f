"""`Scorer`: the rewards of (RL record, completion text) pairs, in this process or in a pool of spawned workers.

This module imports only the reward functions and the config, so a spawned worker starts quickly (it imports this
module to unpickle its task, not the trainer).
"""

from __future__ import annotations

from collections.abc import Sequence

from vibeperf.data import RLRecord
from vibeperf.rewards import SandboxConfig, score
from vibeperf.rl.config import RewardConfig


def _score_one(item: tuple) -> float:
    record, text, cfg = item
    return Scorer.score(record, text, cfg)


class Scorer:
    """Rewards of (record, completion text) pairs under `RewardConfig`; `close()` stops the workers, if any."""

    def __init__(self, cfg: RewardConfig):
        self.cfg, self._pool = cfg, None

    @staticmethod
    def score(record: RLRecord, text: str, cfg: RewardConfig) -> float:
        sandbox = SandboxConfig(wall_timeout_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb,
                                all_or_nothing=cfg.code_all_or_nothing)  # fmt: skip
        return score(record.domain, record, text, sandbox=sandbox, require_boxed=cfg.require_boxed,
                     math_timeout_s=cfg.math_timeout_s).reward  # fmt: skip

    def __call__(self, items: Sequence[tuple[RLRecord, str]]) -> list[float]:
        if self.cfg.workers == 0:
            return [self.score(record, text, self.cfg) for record, text in items]
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the parent holds a rollout engine and OpenMP threads that a fork would copy half-alive.
            self._pool = ProcessPoolExecutor(self.cfg.workers, mp_context=multiprocessing.get_context("spawn"))
        chunk = max(1, len(items) // (4 * self.cfg.workers))
        return list(self._pool.map(_score_one, [(r, t, self.cfg) for r, t in items], chunksize=chunk))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

"""Faults injected into the reward side (issue 20): a hostile math answer graded from a thread, reward workers that
crash, hang or raise. Each must cost its own item (reward 0 with a reason), never the process or the step.

The worker functions below are module-level so that spawned workers can import them by name.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from vibeperf.config import RewardConfig
from vibeperf.data import RLRecord
from vibeperf.rewards import scorer as scoring
from vibeperf.rewards.pool import Outcome, WorkerPool


def _job(item):
    kind, value = item
    if kind == "crash":
        os._exit(value)
    if kind == "hang":
        time.sleep(3600)
    if kind == "raise":
        raise ValueError(f"bad item {value}")
    return value * 2


def test_worker_pool_contains_crash_hang_and_exception():
    items = [("ok", 1), ("crash", 7), ("ok", 2), ("hang", 0), ("raise", 3), ("ok", 4)]
    with WorkerPool(_job, 2, name="test worker") as pool:
        start = time.monotonic()
        out = pool.map(items, [60, 60, 60, 2.0, 60, 60])
        assert time.monotonic() - start < 120
        assert out[0] == Outcome(True, 2) and out[2] == Outcome(True, 4) and out[5] == Outcome(True, 8)
        assert out[1] == Outcome(False, None, "test worker died (exit code 7)")
        assert out[3] == Outcome(False, None, "test worker timed out after 2 s")
        assert out[4] == Outcome(False, None, "ValueError: bad item 3")
        assert pool.map([("ok", 5)], 60) == [Outcome(True, 10)]  # the replaced workers serve the next call


def test_math_reward_from_threads_costs_its_timeout():
    """Issue 20 defect 5: in a thread pool, `\\boxed{9^{9^{9^{9}}}}` froze the whole process (math-verify's timeout
    works only on the main thread). Run in a child process so that a freeze fails the test instead of hanging it."""
    code = textwrap.dedent(r"""
        import time
        from concurrent.futures import ThreadPoolExecutor
        from vibeperf.rewards import math_reward
        cases = [("1", r"\boxed{9^{9^{9^{9}}}}"), ("0.5", r"\boxed{\frac12}"), ("2", r"\boxed{3}")]
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda c: math_reward(*c, timeout_s=1), cases))  # workers start (imports)
            start = time.monotonic()
            out = list(pool.map(lambda c: math_reward(*c, timeout_s=1), cases))
        print([r.reward for r in out], out[0].reason, round(time.monotonic() - start, 1))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith("[0.0, 1.0, 0.0] math-verify timeout (1 s)"), line
    assert float(line.rsplit(" ", 1)[1]) < 3 * 1 + 2 + 5, line  # within the watchdog (3 x timeout + 2 s) + slack


def _faulty_score(item):
    record, text, cfg = item
    if text == "crash":
        os._exit(9)
    if text == "hang":
        time.sleep(3600)
    return (1.0, "") if text == record.answer else (0.0, "wrong")


def test_scorer_worker_crash_or_hang_gives_zero_with_a_reason(monkeypatch):
    monkeypatch.setattr(scoring, "_grade_in_worker", _faulty_score)
    scorer = scoring.Scorer(RewardConfig(workers=2, processes=True, math_timeout_s=1))
    monkeypatch.setattr(scoring, "MARGIN_S", -1.0)  # hang deadline: 3 * 1 - 1 = 2 s
    rec = RLRecord("p", "math", answer="4")
    try:
        assert scorer([(rec, "4"), (rec, "crash"), (rec, "5"), (rec, "hang"), (rec, "4")]) == [1, 0, 0, 0, 1]
        assert scorer.failures == ["reward worker died (exit code 9)", "reward worker timed out after 2 s"]
        assert scorer([(rec, "4")]) == [1.0] and scorer.failures == []
    finally:
        scorer.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_scorer_grades_hostile_math_within_its_timeout(workers):
    scorer = scoring.Scorer(RewardConfig(workers=workers, processes=workers > 0, math_timeout_s=1))
    rec = RLRecord("p", "math", answer="1")
    try:
        scorer([(rec, r"\boxed{1}")])
        start = time.monotonic()
        assert scorer([(rec, r"\boxed{9^{9^{9^{9}}}}"), (rec, r"\boxed{1}")]) == [0.0, 1.0]
        assert time.monotonic() - start < 3 * 1 + scoring.MARGIN_S + 5
    finally:
        scorer.close()

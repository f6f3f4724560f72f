"""Math / STEM answer reward through math-verify.

`math_reward(gold, completion)` returns `RewardResult(reward, reason)` with reward 1.0 when the completion's final
answer is mathematically equivalent to `gold` and 0.0 otherwise. It never raises: a missing answer, malformed LaTeX,
an unparseable gold answer, a math-verify error or timeout all give 0.0 and say why in `reason`.

- The answer is the content of the last `\\boxed{...}` (or `\\fbox{...}`) of the completion, found by brace
  matching. Without one, the reward is 0 ("no \\boxed{} answer") unless `require_boxed=False`, in which case
  math-verify extracts the final answer from the whole text.
- The gold answer is first rewritten where datasets write answers that math-verify misreads (unicode math, money,
  digit grouping, E notation, repeating decimals: `vibeperf.rewards.answers`).
- Both sides go through math-verify as `\\boxed{...}` (a bare gold such as `2\\sqrt{3}` is parsed as LaTeX, not as the
  plain number 2), then `verify(gold, pred)`, gold first: verify is not symmetric (e.g. for intervals vs sets).
- Timeouts. math-verify bounds `parse` and `verify` with `signal.alarm`, which works only in the main thread of the
  main interpreter. There `timeout_s` applies (a timeout gives 0, "math-verify timeout"). Called from any other thread
  (a thread pool), the grading runs in a spawned worker process instead (`vibeperf.rewards.pool.WorkerPool`, one per
  concurrent caller, kept for the next call), in that process's main thread where the alarms work, under a watchdog
  of 3 * timeout_s + 2 s (gold parse, answer parse, verify): a hostile answer such as `\\boxed{9^{9^{9^{9}}}}` costs
  its timeout and a reward of 0, and never freezes the caller's process. `timeout_s=None` grades in the thread itself
  with no limit.
"""

from __future__ import annotations

import atexit
import re
import threading
from dataclasses import dataclass

from vibeperf.rewards.answers import normalize_answer
from vibeperf.rewards.pool import WorkerPool

# math-verify's parse, verify and TimeoutException, bound by `_load()` on the first reward (importing vibeperf.rewards,
# and with it the RL trainer, must not need math-verify); module attributes so that tests can replace them.
parse = verify = TimeoutException = None


def _load() -> None:
    global parse, verify, TimeoutException
    if parse is None or verify is None or TimeoutException is None:
        import math_verify
        import math_verify.errors

        parse = parse or math_verify.parse
        verify = verify or math_verify.verify
        TimeoutException = TimeoutException or math_verify.errors.TimeoutException


_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_SHOW = 80


@dataclass(frozen=True)
class RewardResult:
    """A scalar reward in [0, 1] and a short human-readable reason (why it is not 1, or what matched)."""

    reward: float
    reason: str

    def __post_init__(self):
        if not 0.0 <= self.reward <= 1.0:
            raise ValueError(f"reward must be in [0, 1], got {self.reward}")


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` of `text`; None if there is none.

    Raises ValueError if the last one has unbalanced braces (e.g. `\\boxed{\\frac{1}{`).
    """
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    start = i = matches[-1].end()
    depth = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    raise ValueError(f"unbalanced braces in the last \\boxed{{...}}: '{_short(text[matches[-1].start() :])}'")


def signal_timeout(timeout_s: int | None) -> int | None:
    """math-verify's signal timeouts only in the main thread; elsewhere none (they would raise)."""
    if timeout_s is None or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(timeout_s))


def _parse_boxed(content: str, timeout: int | None) -> list:
    return parse(f"\\boxed{{{content}}}", parsing_timeout=timeout, raise_on_error=True)


def _parse_gold(gold: str, timeout: int | None) -> list:
    gold = str(gold).strip()
    if "\\boxed" in gold or "$" in gold:
        return parse(gold, parsing_timeout=timeout, raise_on_error=True)
    return _parse_boxed(gold, timeout)


def _math_reward(gold: str, completion: str, require_boxed: bool, timeout_s: int | None) -> RewardResult:
    timeout = signal_timeout(timeout_s)
    gold_parsed = _parse_gold(normalize_answer(gold), timeout)
    if not gold_parsed:
        return RewardResult(0.0, f"gold answer '{_short(gold)}' could not be parsed")
    try:
        boxed = last_boxed(completion)
    except ValueError as e:
        return RewardResult(0.0, f"malformed answer: {e}")
    if boxed is None:
        if require_boxed:
            return RewardResult(0.0, "no \\boxed{} answer")
        pred = parse(completion, parsing_timeout=timeout, raise_on_error=True)
        source = "from the text (no \\boxed{})"
    else:
        if not boxed.strip():
            return RewardResult(0.0, "empty \\boxed{} answer")
        pred = _parse_boxed(boxed, timeout)
        source = f"\\boxed{{{_short(boxed)}}}"
    if not pred:
        return RewardResult(0.0, f"answer {source} could not be parsed")
    if verify(gold_parsed, pred, timeout_seconds=timeout, raise_on_error=True):
        return RewardResult(1.0, f"correct: {source} matches gold '{_short(gold)}'")
    if all(isinstance(p, str) for p in pred):
        return RewardResult(0.0, f"answer {source} is not parseable math and differs from gold '{_short(gold)}'")
    return RewardResult(0.0, f"wrong: {source} parsed as '{_short(pred[0])}', gold '{_short(gold)}'")


_IDLE: list[WorkerPool] = []
_IDLE_LOCK = threading.Lock()


def _math_job(args: tuple) -> RewardResult:
    """A worker's grading (in its main thread, where math-verify's alarms work)."""
    gold, completion, require_boxed, timeout_s = args
    return math_reward(gold, completion, require_boxed=require_boxed, timeout_s=timeout_s)


def _close_idle() -> None:
    with _IDLE_LOCK:
        while _IDLE:
            _IDLE.pop().close()


atexit.register(_close_idle)


def _in_worker(gold: str, completion: str, require_boxed: bool, timeout_s: int) -> RewardResult:
    """`math_reward` in an idle worker process (a new one when every worker is busy), under its watchdog."""
    with _IDLE_LOCK:
        pool = _IDLE.pop() if _IDLE else None
    pool = pool or WorkerPool(_math_job, 1, init=_load, name="math-verify worker")
    try:
        out = pool.map([(gold, completion, require_boxed, timeout_s)], 3 * timeout_s + 2.0)[0]
    except BaseException:
        pool.close()
        raise
    with _IDLE_LOCK:
        _IDLE.append(pool)
    return out.value if out.ok else RewardResult(0.0, f"math-verify timeout ({timeout_s} s): {out.reason}")


def math_reward(gold: str, completion: str, *, require_boxed: bool = True, timeout_s: int | None = 5) -> RewardResult:
    """Reward 1.0 if the completion's final answer is equivalent to `gold` (math-verify), else 0.0; never raises.

    `require_boxed`: without a `\\boxed{}` answer the reward is 0 (True), or math-verify extracts the answer from the
    text (False). `timeout_s`: math-verify's per-parse / per-comparison limit in seconds; off the main thread the
    grading runs in a worker process under a watchdog (see the module docstring); None disables both.
    """
    _load()  # outside the catch-all below: a missing math-verify is an error, not a reward of 0
    if timeout_s is not None and threading.current_thread() is not threading.main_thread():
        return _in_worker(gold, completion, require_boxed, max(1, int(timeout_s)))
    try:
        return _math_reward(gold, completion, require_boxed, timeout_s)
    except TimeoutException:
        return RewardResult(0.0, f"math-verify timeout ({timeout_s} s)")
    # A grader must turn any failure of the parser into reward 0 with a reason, never an exception.
    except Exception as e:
        return RewardResult(0.0, f"math-verify error: {type(e).__name__}: {_short(e)}")

"""`WorkerPool`: spawned processes that run one function over items, where a crash or a hang costs only its item.

A grader runs hostile input (a huge exponent for sympy, a program for the sandbox): one item must never take the
whole run with it. `concurrent.futures.ProcessPoolExecutor` cannot give that: a dead worker breaks the whole pool
(BrokenProcessPool for every pending item) and a hung one blocks `map` forever. Here each item has a deadline and
each worker its own pipe:

- a worker that dies (a segfault, the OOM killer, `os._exit`) gives its item `Outcome(ok=False, reason="... died
  (exit code N)")` and is replaced;
- an item still running past its deadline gets its worker killed and `Outcome(ok=False, reason="... timed out")`;
- an exception inside `fn` is the item's `Outcome(ok=False, reason="Type: message")`, the worker lives on.

The deadline starts when the item reaches a worker that has finished starting (imports do not count). Workers are
spawned (never forked: a trainer's engine and OpenMP threads must not be copied half-alive) and kept for the next
`map`. `fn` and the items must be picklable (`fn` a module-level function).
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

_READY = "ready"
_STARTS = 3


@dataclass(frozen=True)
class Outcome:
    """The result of one item: `value` when `ok`, else None and why in `reason`."""

    ok: bool
    value: Any = None
    reason: str = ""


def _serve(conn, fn: Callable[[Any], Any], init: Callable[[], None] | None) -> None:
    """Worker loop: `init()`, announce readiness, then answer (index, item) with (index, ok, value or reason)."""
    if init is not None:
        init()
    conn.send(_READY)
    while True:
        try:
            index, item = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((index, True, fn(item)))
        except Exception as e:  # the item's failure, reported to the parent; the worker stays
            conn.send((index, False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))


class _Worker:
    def __init__(self, ctx, fn, init, name: str):
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, init), name=name, daemon=True)
        self.proc.start()
        child.close()
        self.conn, self.ready, self.job, self.deadline = parent, False, None, 0.0

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class WorkerPool:
    """`size` spawned workers running `fn(item)`; see the module docstring. `close()` (or `with`) ends them.

    `init`: a module-level function each worker runs once before it takes items (slow imports), outside deadlines.
    """

    def __init__(self, fn: Callable[[Any], Any], size: int, *, init: Callable[[], None] | None = None,
                 name: str = "vibeperf-worker"):  # fmt: skip
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.fn, self.init, self.name = fn, init, name
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [_Worker(self._ctx, fn, init, name) for _ in range(size)]

    def _replace(self, w: _Worker) -> _Worker:
        w.stop()
        new = _Worker(self._ctx, self.fn, self.init, self.name)
        self._workers[self._workers.index(w)] = new
        return new

    def map(self, items: Sequence[Any], deadlines: float | Sequence[float]) -> list[Outcome]:
        """One Outcome per item, in order. `deadlines`: seconds each item may run (one number for all)."""
        if isinstance(deadlines, (int, float)):
            deadlines = [float(deadlines)] * len(items)
        todo, out = deque(range(len(items))), [None] * len(items)
        failed_starts = 0
        while todo or any(w.job is not None for w in self._workers):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.job is None and todo:
                    i = todo.popleft()
                    w.job, w.deadline = i, now + deadlines[i]
                    w.conn.send((i, items[i]))
            busy = [w.deadline - now for w in self._workers if w.job is not None]
            timeout = max(0.0, min(busy)) if busy else 1.0
            wait([w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers], timeout)
            for w in list(self._workers):
                message = None
                try:
                    if w.conn.poll():
                        message = w.conn.recv()
                except (EOFError, OSError):
                    message = None
                if message == _READY:
                    w.ready = True
                elif message is not None:
                    i, ok, value = message
                    out[i] = Outcome(True, value) if ok else Outcome(False, None, value)
                    w.job = None
                elif not w.proc.is_alive():
                    code = w.proc.exitcode
                    if w.job is not None:
                        out[w.job] = Outcome(False, None, f"{self.name} died (exit code {code})")
                    elif not w.ready:
                        failed_starts += 1
                        if failed_starts >= _STARTS * len(self._workers):
                            raise RuntimeError(f"{self.name}: workers die while starting (exit code {code})")
                    self._replace(w)
                elif w.job is not None and time.monotonic() > w.deadline:
                    out[w.job] = Outcome(False, None, f"{self.name} timed out after {deadlines[w.job]:g} s")
                    self._replace(w)
        return out

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        for w in self._workers:
            w.stop()
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Preemption: SIGTERM or SIGINT during training stops the run cleanly at the next step boundary.

Clusters send SIGTERM some time before they kill a job. Inside `with Preemption(device) as preempt:` the first
SIGTERM or SIGINT only sets a flag (and logs what will happen); the loop asks `preempt.requested()` after each step,
and when it says so, saves a checkpoint, stops, and the command exits 0 (`checkpoint.resume=latest` continues the run
exactly). The first signal also puts the previous handlers back, so a second one acts as it normally would: SIGTERM
terminates the process at once, SIGINT raises KeyboardInterrupt. Under torchrun every process must stop at the same
step (the checkpoint is a collective), so `requested()` takes the flag's maximum over processes.

Handlers can only be installed from the main thread; elsewhere (a trainer driven from a thread) this does nothing.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from vibeperf import distributed as vdist

log = logging.getLogger("vibeperf.train")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stopped_note(signal_name: str | None) -> str:
    """The summary's note for a run a signal stopped early (it saved a checkpoint); empty when it ran through."""
    return f"; stopped early by {signal_name}, continue with checkpoint.resume=latest" if signal_name else ""


class Preemption:
    """The stop-at-the-next-step-boundary flag of a training loop (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.signal: str | None = None
        """Name of the signal that asked for the stop ("SIGTERM", "SIGINT"); None while none came."""
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signal = signal.Signals(signum).name
        self._restore()
        log.warning("%s: saving a checkpoint at the end of this step, then stopping (send it again to stop at once)",
                    self.signal)  # fmt: skip

    def requested(self) -> bool:
        """Whether to checkpoint and stop now (under torchrun: whether any process was signalled; a collective)."""
        if not vdist.is_distributed():
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=self.device)
        stop = bool(vdist.all_reduce(flag, "max").item())
        if stop and self.signal is None:
            self.signal = "a signal to another process"
        return stop

"""Helpers that several test modules share (their shared fixtures, `one_torch_thread` and `restore_threads`, are in
conftest.py). Import as `from helpers import ...`: pytest puts this folder on sys.path, and so does running a test
module as a script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vibeperf import _ext

ROOT = Path(__file__).resolve().parents[1]
TIME_KEYS = ("time_generate_s", "time_score_s", "time_update_s", "time_sync_s", "time_step_s")
"""The RL metrics that are wall-clock times: they differ between otherwise identical runs."""


def without_times(rows: list[dict]) -> list[dict]:
    """Metrics lines without their wall-clock times."""
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def metrics_lines(path: Path) -> list[dict]:
    """The JSON lines of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_report_script(script: str, out: Path, *, timeout: float) -> dict:
    """Run the test module `script` as a script (`--vllm-report out`) in a child process without TRITON_INTERPRET,
    and return the JSON report it wrote: vLLM binds OpenMP threads and freezes torch's thread count for its whole
    process, so it runs apart from the test session."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "--vllm-report", str(out)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(Path(out).read_text())


needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
    reason=f"needs a GPU and vibeperf._C built with CUDA ({_ext.EXT_ERROR or 'built without its CUDA part'})",
)
CUDA_BACKEND = pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda_ext])
"""backend="cuda" as a parameter of a backend-parametrised kernel test: runs with `-m gpu` where vibeperf._C has its
CUDA part (its inputs moved with `on_backend`), skipped elsewhere."""


def on_backend(backend: str, *tensors):
    """The tensors where `backend` runs: CUDA copies for "cuda", the same tensors otherwise (None stays None)."""
    return [t if t is None or backend != "cuda" else t.cuda() for t in tensors]


def to_cpu(t):
    """A result brought back for comparison with a CPU reference (None stays None)."""
    return None if t is None else t.detach().cpu()


def assert_compiles_like_eager(step, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """step(h, w) -> (loss, metric) compiles with fullgraph=True (no graph break) and gives eager's loss, metric and
    gradients of hidden and weight."""
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metric = torch.compile(step, fullgraph=True, backend="aot_eager")(h1, w1)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_loss, ref_metric = step(h2, w2)
    ref_loss.backward()
    torch.testing.assert_close((loss, metric, h1.grad, w1.grad), (ref_loss, ref_metric, h2.grad, w2.grad))

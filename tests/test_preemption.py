"""Crash safety of the training core (issue 20): a torn last metrics line, temporary checkpoints of dead runs, and
preemption: SIGTERM / SIGINT during training saves a checkpoint at the next step boundary and exits 0; resuming then
gives the same weights and metrics, bit for bit, as a run that was never interrupted (SFT and RL, on the CPU).

The runs are `python -m vibeperf` child processes, signalled once their first metrics line is written.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vibeperf.config import CheckpointConfig
from vibeperf.data import DataError
from vibeperf.sft.synthetic import synthetic_records
from vibeperf.train import Checkpointer, MetricsWriter, Preemption

ROOT = Path(__file__).resolve().parents[1]
# Wall-clock figures, and the attention-call counts the first logged line of each process carries.
SESSION_KEYS = ("time_s", "tokens_per_s", "mfu", "time_generate_s", "time_score_s", "time_update_s", "time_sync_s",
                "time_step_s", "attention")  # fmt: skip


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    """Issue 20 defect 3: a run killed while writing metrics.jsonl left a torn last line, and
    checkpoint.resume=latest then failed with JSONDecodeError."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, logger="vibeperf.train"):
        writer = MetricsWriter(tmp_path, resume_step=2)
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert f"{path}:4: torn last line" in caplog.text
    writer.write({"step": 3, "loss": 0.5})
    assert [r["step"] for r in writer.rows()] == [1, 2, 3]
    path.write_text("\n".join(lines) + "\n" + lines[0])  # a complete-looking line without its newline: torn too
    assert [r["step"] for r in writer.rows()] == [1, 2, 3]
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a metrics record"):
        MetricsWriter(tmp_path, resume_step=2)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_checkpoints_of_dead_runs_are_removed(tmp_path):
    """Issue 20 defect 3: `.step_N.tmp-PID-*` directories a kill left behind were never removed."""
    root = tmp_path / "checkpoints"
    dead, mine = _dead_pid(), os.getpid()
    stale = [root / f".step_00000004.tmp-{dead}-0123abcd", root / ".step_00000006.tmp-sharded",
             tmp_path / f".metrics.jsonl.tmp-{dead}-89abcdef",
             tmp_path / f".loss.png.tmp-{dead}-01234567.png"]  # fmt: skip
    live = [root / f".step_00000005.tmp-{mine}-0123abcd", root / "step_00000002", tmp_path / "metrics.jsonl",
            tmp_path / "notes.tmp-1-x"]  # fmt: skip
    for p in stale[:2] + live[:2]:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    for p in stale[2:] + live[2:]:
        p.write_text("x")
    Checkpointer(tmp_path, CheckpointConfig())
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)


def _wait_for_metrics(proc, path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().count("\n") >= 1:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first metrics line: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no metrics line in time")


def _run(argv, env=None):
    return subprocess.run([sys.executable, "-m", "vibeperf", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def _signalled(argv, out: Path, signals: list[int]):
    proc = subprocess.Popen([sys.executable, "-m", "vibeperf", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_metrics(proc, out / "metrics.jsonl")
    for s in signals:
        proc.send_signal(s)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr


def _weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in SESSION_KEYS} for r in rows]


def _same_run(a: Path, b: Path, step: int) -> None:
    wa, wb = _weights(a / "checkpoints" / f"step_{step:08d}"), _weights(b / "checkpoints" / f"step_{step:08d}")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _metrics(a) == _metrics(b)


@pytest.fixture(scope="module")
def sft_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = root / "copy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(48, task="copy")))
    recipe = {
        "model": {"path": "tiny"}, "optim": {"lr": 3e-3, "min_lr": 3e-4},
        "train": {"global_batch": 2, "device": "cpu", "loss_backend": "torch"},
        "checkpoint": {"keep_last": 0}, "logging": {"every": 1, "progress": False, "plot": False},
        "stages": [{"name": "copy", "data": [str(data)], "epochs": 3, "token_budget": 128}],
    }  # fmt: skip
    path = root / "sft.json"
    path.write_text(json.dumps(recipe))
    return path


def test_sft_sigterm_checkpoints_exits_0_and_resumes_bit_identically(tmp_path, sft_recipe):
    full, part = tmp_path / "full", tmp_path / "part"
    ref = _run(["sft", str(sft_recipe), f"output_dir={full}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    code, stdout, stderr = _signalled(["sft", str(sft_recipe), f"output_dir={part}"], part, [signal.SIGTERM])
    assert code == 0, stderr[-3000:]
    stopped = json.loads((part / "checkpoints").glob("step_*/trainer_state.json").__next__().read_text())["step"]
    assert 1 <= stopped < 72 and "stopped early by SIGTERM, continue with checkpoint.resume=latest" in stdout
    assert "SIGTERM: saving a checkpoint at the end of this step" in stderr and "Traceback" not in stderr
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "lo')  # and a torn line, as if it had been killed while writing
    resumed = _run(["sft", str(sft_recipe), f"output_dir={part}", "checkpoint.resume=latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "torn last line" in resumed.stderr and f"resumed from {part}/checkpoints/step_{stopped:08d}" in (
        resumed.stderr)  # fmt: skip
    _same_run(full, part, 72)


def test_first_signal_asks_for_a_stop_the_second_acts_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with Preemption() as preempt:
        assert not preempt.requested()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs at the next bytecode boundary of the main thread
        assert preempt.requested() and preempt.signal == "SIGINT"
        # the previous handlers are back: SIGTERM would terminate the process, SIGINT raises KeyboardInterrupt
        assert {s: signal.getsignal(s) for s in before} == before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    with Preemption() as preempt:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert preempt.signal == "SIGTERM" and signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before


def test_rl_sigint_checkpoints_exits_0_and_resumes_bit_identically(tmp_path):
    common = ["model.path=tiny-warm", "engine.kind=hf", "rollout.group_size=4", "rollout.prompts_per_step=4",
              "sampling.max_tokens=6", "loss.backend=torch", "loss.minibatches=2", "loss.token_budget=256",
              "train.cpu_threads=1", "train.device=cpu", "filter.enabled=false", "phases.0.steps=5",
              "logging.progress=false", "logging.plot=false", "checkpoint.keep_last=0"]  # fmt: skip
    recipe = str(ROOT / "recipes" / "rl_tiny.toml")
    full, part = tmp_path / "full", tmp_path / "part"
    ref = _run(["rl", recipe, *common, f"output_dir={full}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    code, stdout, stderr = _signalled(["rl", recipe, *common, f"output_dir={part}"], part, [signal.SIGINT])
    assert code == 0, stderr[-3000:]
    assert "stopped early by SIGINT" in stdout and "Traceback" not in stderr
    resumed = _run(["rl", recipe, *common, f"output_dir={part}", "checkpoint.resume=latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(full, part, 5)

"""MGPO RL under torchrun + FSDP2 on the CPU (gloo, 2 processes, the warm tiny model, fp32, transformers engine):
two RL steps on 2 processes equal the same two steps in one process (same global batch: each process samples its
share of the prompts with the same per-prompt seeds), each process's engine holds the trainer's weights after every
bucketed weight push, and the 2-process sharded checkpoint resumes in one process. The same file is the worker.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import metrics_lines, without_times

from vibeperf.config import config_from_dict
from vibeperf.data import write_jsonl
from vibeperf.rl.config import RLConfig
from vibeperf.rl.synthetic import digit_records

ROOT = Path(__file__).resolve().parents[1]


def _config(data: Path, out: Path, **overrides) -> RLConfig:
    """4 prompts x 4 samples per step in 2 minibatches (each process gets one prompt of each), 6-token completions,
    a push in buckets of 16 KiB (the tiny model's 2.4 MB take about 150 of them).

    AdamW with eps = 1: its step is then about lr * m, linear in the gradient. With eps = 1e-8 an entry whose
    gradient is the cancellation residue of positive and negative advantages (|g| ~ 1e-9, so its fp32 rounding error
    is O(|g|)) gets a step of up to lr in a direction set by that rounding: two correct runs then differ by up to lr
    in such entries (measured: 273 of the 131K LM-head entries by up to 5.9e-5 at lr 5e-4), which would hide a real
    gradient error of that size."""
    return config_from_dict(RLConfig, {
        "output_dir": str(out), "model": {"path": "tiny-warm"},
        "optim": {"lr": 0.05, "min_lr": 0.05, "warmup_frac": 0.0, "eps": 1.0},
        "rollout": {"group_size": 4, "prompts_per_step": 4, "sync_bucket_mb": 1 / 64},
        "engine": {"kind": "hf", "dtype": "float32"}, "sampling": {"max_tokens": 6, "seed": 0},
        "loss": {"backend": "torch", "minibatches": 2, "token_budget": 256},
        "filter": {"enabled": False},
        "train": {"cpu_threads": 1, "device": "cpu", "max_steps": 2},
        "logging": {"progress": False, "plot": False},
        "checkpoint": {"keep_last": 0, **overrides.pop("checkpoint", {})},
        "phases": [{"name": "digit", "steps": 4, "sources": [{"files": [str(data)]}]}],
        **overrides,
    })  # fmt: skip


def _worker(data: Path, out: Path) -> None:
    from vibeperf import distributed as vdist
    from vibeperf.rl.data import split_minibatches
    from vibeperf.rl.trainer import RLTrainer

    gaps = []

    def check_push(t: RLTrainer, record: dict) -> None:
        full = {n: x for bucket in vdist.full_tensor_buckets(t.model) for n, x in bucket}
        engine = t.engine.model.state_dict()
        gaps.append(max((engine[n] - x).abs().max().item() for n, x in full.items()))
        assert set(full) == set(engine), set(full) ^ set(engine)

    trainer = RLTrainer(_config(data, out, checkpoint={"every": 1}))
    assert trainer.world == 2 and trainer.fsdp_root is not None
    sizes = [b - a for a, b in split_minibatches(4, trainer.cfg.loss.minibatches, trainer.rank, trainer.world)]
    try:
        trainer.run(on_step=check_push)
    finally:
        trainer.close()
    (out / f"worker{os.environ['RANK']}.json").write_text(json.dumps({"push_gaps": gaps, "blocks": sizes}))


def _lines(out: Path) -> list[dict]:
    return without_times(metrics_lines(out / "metrics.jsonl"))


def _assert_lines_close(a: list[dict], b: list[dict], *, skip: tuple[str, ...] = ()) -> None:
    assert [sorted(x) for x in a] == [sorted(x) for x in b]
    for x, y in zip(a, b):
        for key in set(x) - set(skip):
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
            else:
                assert x[key] == y[key], (x["step"], key)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_rl_on_two_processes_equals_one_and_resumes_in_one(tmp_path, restore_threads):
    from safetensors.torch import load_file

    from vibeperf.rl.trainer import resolve_model_path, train

    resolve_model_path("tiny-warm")  # built here once, not by two torchrun workers at the same time
    data = tmp_path / "digit.jsonl"
    write_jsonl(data, digit_records(24, seed=0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           str(data), str(tmp_path / "dist")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]

    for r in (0, 1):
        w = json.loads((tmp_path / "dist" / f"worker{r}.json").read_text())
        assert w["blocks"] == [1, 1]  # one prompt of each minibatch per process
        assert len(w["push_gaps"]) == 2 and max(w["push_gaps"]) == 0.0, w  # the engine holds the trainer's weights

    one = train(_config(data, tmp_path / "one"))
    assert one.steps == 2
    # "rows" counts packed rows, which each process packs from its own share: 4 on 2 processes, 2 in one
    _assert_lines_close(_lines(tmp_path / "dist"), _lines(tmp_path / "one"), skip=("rows",))
    assert all(x["rows"] >= 2 and x["grad_norm"] > 0 for x in _lines(tmp_path / "one"))
    final = tmp_path / "dist" / "checkpoints" / "step_00000002"
    a, b = load_file(final / "model.safetensors"), load_file(one.last_checkpoint / "model.safetensors")
    start = load_file(Path(resolve_model_path("tiny-warm")) / "model.safetensors")
    assert a.keys() == b.keys()
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((b[k] - start[k]).abs().max().item() for k in b)
    print(f"2 RL steps: max |param gap| 2 processes vs 1: {gap:.3g} (the update moved them by up to {moved:.3g})")
    assert moved > 1e-4 and gap < 1e-6, (gap, moved)

    step1 = tmp_path / "dist" / "checkpoints" / "step_00000001"
    assert (step1 / "dcp" / ".metadata").is_file()
    resumed = train(_config(data, tmp_path / "res", checkpoint={"resume": str(step1)}))
    assert resumed.steps == 2
    _assert_lines_close(_lines(tmp_path / "res"), _lines(tmp_path / "one")[1:])
    c = load_file(resumed.last_checkpoint / "model.safetensors")
    assert max((c[k] - b[k]).abs().max().item() for k in c) < 1e-6


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))

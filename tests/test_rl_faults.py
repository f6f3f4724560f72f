"""Faults injected into RL runs on the CPU (issue 20), each on a short transformers-engine run of the tiny model: the
rollout engine raising mid-step or during a phase's static filter, a full disk while saving a checkpoint, non-finite
updates (stop or skip), a reward worker that crashes. Each ends in a named error (a RunError: one line from the CLI)
or is counted, never silently; checkpoints stay complete and a resume continues exactly. SFT's non-finite policy is
checked here too.
"""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vibeperf.config import config_from_dict, load_config
from vibeperf.data import write_jsonl
from vibeperf.errors import RunError
from vibeperf.rewards import scorer as scoring
from vibeperf.rl import trainer as rl_trainer
from vibeperf.rl import update as rl_update
from vibeperf.rl.config import RLConfig
from vibeperf.rl.synthetic import digit_records
from vibeperf.sft import trainer as sft_trainer
from vibeperf.sft.config import SFTConfig
from vibeperf.sft.synthetic import synthetic_records
from vibeperf.tiny_model import get_tiny_model
from vibeperf.train import checkpoint as checkpoint_mod

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """The RL trainer fixes torch's thread count and exports OMP_NUM_THREADS; give the rest of the suite its own."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(threads)))
    yield
    torch.set_num_threads(threads)


def _rl_config(tmp_path: Path, out: str, steps: int = 3, phases: list | None = None, **over) -> RLConfig:
    """One phase of `steps` steps (or `phases`: (name, steps, static filter) each, over the same data), transformers
    engine, groups of 4, a checkpoint after every step."""
    data = tmp_path / "digit.jsonl"
    if not data.exists():
        write_jsonl(data, digit_records(24, seed=0))
    cfg = {
        "output_dir": str(tmp_path / out), "model": {"path": "tiny-warm"},
        "optim": {"lr": 5e-4, "min_lr": 5e-4, "warmup_frac": 0.0},
        "rollout": {"group_size": 4, "prompts_per_step": 4}, "engine": {"kind": "hf", "dtype": "float32"},
        "sampling": {"max_tokens": 6, "seed": 0},
        "loss": {"backend": "torch", "minibatches": 2, "token_budget": 256},
        "filter": {"enabled": False},
        "train": {"cpu_threads": 1, "device": "cpu"},
        "logging": {"progress": False, "plot": False},
        "checkpoint": {"every": 1, "keep_last": 0, "resume": "latest"},
        "phases": [{"name": name, "steps": n, "static_filter": filt, "sources": [{"files": [str(data)]}]}
                   for name, n, filt in phases or [("one", steps, False)]],
    }  # fmt: skip
    for key, value in over.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return config_from_dict(RLConfig, cfg)


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))


def _no_temporaries(out: Path) -> bool:
    return not [p for p in out.rglob(".*") if ".tmp" in p.name]


def _weights(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


def test_rl_engine_raising_mid_step_stops_cleanly_and_resumes_exactly(tmp_path, monkeypatch):
    full = rl_trainer.train(_rl_config(tmp_path, "full"))
    original = rl_trainer.RLTrainer.step

    def step_with_a_dying_engine(self):
        if self.step_count == 2:  # the third step: the engine dies while sampling

            def broken(*args, **kwargs):
                raise RuntimeError("EngineCore died unexpectedly")

            self.engine.generate = broken
        return original(self)

    monkeypatch.setattr(rl_trainer.RLTrainer, "step", step_with_a_dying_engine)
    out = tmp_path / "part"
    with pytest.raises(RunError, match=r"^step 3: the rollout engine \(hf\) failed while sampling: RuntimeError: "
                                       r"EngineCore died unexpectedly; the run stops"):  # fmt: skip
        rl_trainer.train(_rl_config(tmp_path, "part"))
    assert _steps(out) == [1, 2] and _no_temporaries(out)
    monkeypatch.setattr(rl_trainer.RLTrainer, "step", original)
    resumed = rl_trainer.train(_rl_config(tmp_path, "part"))
    assert resumed.steps == 3 and _steps(out) == [1, 2, 3]
    a, b = _weights(full.last_checkpoint), _weights(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rl_engine_raising_in_the_static_filter_stops_cleanly_and_resumes_exactly(tmp_path, monkeypatch):
    """The engine dies while the static filter of the second phase samples: a RunError naming that phase and the
    cause, the first phase's checkpoints intact, no filter report written; a resume runs the filter and continues
    exactly as an uninterrupted run."""
    phases = [("one", 2, False), ("two", 1, True)]
    full = rl_trainer.train(_rl_config(tmp_path, "full", phases=phases))
    original = rl_trainer.RLTrainer._enter_phase

    def enter_with_a_dying_engine(self, index):
        if index == 1:

            def broken(*args, **kwargs):
                raise RuntimeError("EngineCore died unexpectedly")

            self.engine.generate = broken
        return original(self, index)

    monkeypatch.setattr(rl_trainer.RLTrainer, "_enter_phase", enter_with_a_dying_engine)
    out = tmp_path / "part"
    match = r"^static filter of phase 'two': the rollout engine \(hf\) failed while sampling: RuntimeError: "
    with pytest.raises(RunError, match=match + "EngineCore died unexpectedly; the run stops"):
        rl_trainer.train(_rl_config(tmp_path, "part", phases=phases))
    assert _steps(out) == [1, 2] and _no_temporaries(out) and not (out / "static_filter").exists()
    monkeypatch.setattr(rl_trainer.RLTrainer, "_enter_phase", original)
    resumed = rl_trainer.train(_rl_config(tmp_path, "part", phases=phases))
    assert resumed.steps == 3 and _steps(out) == [1, 2, 3] and resumed.filters == full.filters
    assert (out / "static_filter" / "two.json").is_file()
    a, b = _weights(full.last_checkpoint), _weights(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rl_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = checkpoint_mod.torch.save

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"^step 2: the checkpoint could not be written \(OSError: No space left on "
                                       r"device: .*\); the latest checkpoint is still .*step_00000001$"):  # fmt: skip
        rl_trainer.train(_rl_config(tmp_path, "run"))
    assert _steps(out) == [1] and _no_temporaries(out)
    state = json.loads((out / "checkpoints" / "step_00000001" / "trainer_state.json").read_text())
    assert state["step"] == 1 and (out / "checkpoints" / "step_00000001" / "model.safetensors").is_file()


def _nan_gradients(module):
    real = module.clip_gradients

    def clip(model, max_norm):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
        return real(model, max_norm)

    return clip


def test_rl_nonfinite_update_stops_or_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(rl_update, "clip_gradients", _nan_gradients(rl_update))
    with pytest.raises(RunError, match=r"^step 1: non-finite loss or gradient norm; the run stops here"):
        rl_trainer.train(_rl_config(tmp_path, "stop", steps=2))
    assert not (tmp_path / "stop" / "checkpoints").is_dir() or _steps(tmp_path / "stop") == []
    result = rl_trainer.train(_rl_config(tmp_path, "skip", steps=2, optim__nonfinite="skip"))
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [2, 4]  # two minibatches per step, every update left out
    start = load_file(Path(rl_trainer.resolve_model_path("tiny-warm")) / "model.safetensors")
    end = _weights(result.last_checkpoint)
    assert all(torch.equal(start[k], end[k]) for k in start)  # no update reached the weights
    shutil.rmtree(result.last_checkpoint)  # resume from step 1 and redo step 2 with finite gradients: the count
    monkeypatch.undo()  # carried by the checkpoint stays 2 (a run that forgot it would log 0)
    result = rl_trainer.train(_rl_config(tmp_path, "skip", steps=2, optim__nonfinite="skip"))
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nonfinite_skipped"]) for r in rows] == [(1, 2), (2, 2)]


def _crash_once(item):
    flag = os.environ["VIBEPERF_TEST_CRASH_FLAG"]
    if os.path.exists(flag):
        os.unlink(flag)
        os._exit(9)
    return scoring._grade_in_worker(item)


def test_rl_reward_worker_crash_costs_one_reward(tmp_path, monkeypatch):
    flag = tmp_path / "crash"
    flag.write_text("")
    monkeypatch.setenv("VIBEPERF_TEST_CRASH_FLAG", str(flag))
    monkeypatch.setattr(scoring, "_grade_in_worker", _crash_once)
    result = rl_trainer.train(_rl_config(tmp_path, "run", steps=2, reward__workers=1, reward__processes=True))
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and [r["reward_failures"] for r in rows] == [1, 0]


def test_sft_nonfinite_update_stops_or_is_skipped(tmp_path, monkeypatch):
    data = tmp_path / "copy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(8, task="copy")))
    base = [f"stages.0.data=['{data}']", "stages.0.token_budget=128", "train.global_batch=4", "train.device=cpu",
            "train.loss_backend=torch", "logging.progress=false", "logging.plot=false",
            "train.max_steps=2"]  # fmt: skip

    def cfg(out, *extra):
        c = load_config(SFTConfig, ROOT / "recipes" / "sft_tiny.toml", [*base, f"output_dir={tmp_path / out}", *extra])
        c.stages = c.stages[:1]
        return c

    monkeypatch.setattr(sft_trainer, "clip_gradients", _nan_gradients(sft_trainer))
    with pytest.raises(RunError, match=r"^step 1: non-finite loss or gradient norm"):
        sft_trainer.train(cfg("stop", "logging.every=1"))
    result = sft_trainer.train(cfg("skip", "optim.nonfinite=skip"))
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_skipped"] == 2
    start, end = load_file(get_tiny_model() / "model.safetensors"), _weights(result.last_checkpoint)
    assert all(torch.equal(start[k], end[k]) for k in start)
    monkeypatch.undo()  # finite gradients from here: a resumed run's count stays at the checkpoint's 2, a fresh one 0
    resumed = sft_trainer.train(cfg("skip", "optim.nonfinite=skip", "train.max_steps=3", "checkpoint.resume=latest"))
    rows = [json.loads(x) for x in (resumed.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed.steps == 3 and rows[-1]["step"] == 3 and rows[-1]["nonfinite_skipped"] == 2

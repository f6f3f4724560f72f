"""The shared training core (vibeperf.train): the schedule, the checkpointer and the metrics writer."""

from __future__ import annotations

import json

import pytest
import torch

from vibeperf.config import CheckpointConfig, ConfigError, OptimConfig
from vibeperf.errors import RunError
from vibeperf.train import Checkpointer, MetricsWriter, Schedule, Segment, list_checkpoints


def test_schedule_warmup_cosine_per_stage():
    schedule = Schedule((Segment("a", 0, 20, 1e-3, 1e-5, 2), Segment("b", 20, 10, 5e-4, 0.0, 1)))
    lrs = [schedule.lr_at(s) for s in range(30)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[19] == pytest.approx(1e-5) and all(x >= y for x, y in zip(lrs[1:20], lrs[2:20]))
    assert lrs[20] == pytest.approx(5e-4) and lrs[29] == pytest.approx(0.0, abs=1e-12)
    assert schedule.segments[schedule.locate(25)[0]].name == "b"


def test_schedule_build_defaults():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_frac=0.1)
    schedule = Schedule.build([("a", 10, None, None), ("b", 5, 5e-5, None), ("c", 3, 2e-3, 1e-3)], optim)
    assert schedule.segments == (Segment("a", 0, 10, 1e-3, 1e-4, 1), Segment("b", 10, 5, 5e-5, 5e-5, 1),
                                 Segment("c", 15, 3, 2e-3, 1e-3, 1))  # fmt: skip
    assert schedule.total_steps == 18 and schedule.locate(100) == (2, 85)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=optim.lr)
    sched = schedule.scheduler(opt, optim.lr)
    for step in range(18):
        assert opt.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(step))
        opt.step()
        sched.step()


class _Saveable(torch.nn.Linear):
    def save_pretrained(self, path, safe_serialization=True):
        torch.save(self.state_dict(), path / "weights.pt")


class _Tokenizer:
    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{}")


def test_checkpointer_keeps_last_and_resumes(tmp_path):
    model = _Saveable(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_last=2, resume="latest"))
    assert ckpt.resume_dir() is None
    for step in (1, 2, 3):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        ckpt.save(model, _Tokenizer(), opt, sched, {"step": step, "fingerprint": "x"})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    latest = ckpt.resume_dir()
    assert latest.name == "step_00000003"
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    state = ckpt.load(latest, model, opt2, sched2, {"fingerprint": ("x", "the data")})
    assert state["step"] == 3
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ConfigError, match="checkpoint.resume: .*the data changed since this checkpoint"):
        ckpt.load(latest, model, opt2, sched2, {"fingerprint": ("y", "the data")})
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        Checkpointer(tmp_path, CheckpointConfig(resume=str(tmp_path / "nope"))).resume_dir()


def test_checkpointer_leaves_nothing_on_a_failed_save(tmp_path):
    class Broken(_Saveable):
        def save_pretrained(self, path, safe_serialization=True):
            raise OSError("disk full")

    model = Broken(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    message = r"^step 1: the checkpoint could not be written \(OSError: disk full\); the latest checkpoint is still"
    with pytest.raises(RunError, match=message):
        Checkpointer(tmp_path, CheckpointConfig()).save(model, _Tokenizer(), opt, sched, {"step": 1})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_metrics_writer_trims_on_resume_and_plots(tmp_path):
    m = MetricsWriter(tmp_path)
    for step in range(1, 5):
        m.write({"step": step, "loss": 1.0 / step, "phase": "a" if step < 3 else "b"})
    m2 = MetricsWriter(tmp_path, resume_step=2)
    assert [r["step"] for r in m2.rows()] == [1, 2]
    m2.write({"step": 3, "loss": 0.1, "phase": "b"})
    m2.plot("loss.png", [("loss", [("loss", "loss")])], segment_key="phase")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    MetricsWriter(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == ""

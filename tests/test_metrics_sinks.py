"""Metrics where users look: TensorBoard event files beside metrics.jsonl with the same scalars at the same steps,
W&B through the same switch, and nothing at all when neither package is installed (or a one-line error naming the
config key when one is asked for by `true`)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from vibeperf import cli
from vibeperf.config import ConfigError
from vibeperf.train import metrics as metrics_mod
from vibeperf.train.metrics import MetricsWriter

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sft_tiny.toml"

RECORDS = [{"step": s, "stage": "broad", "loss": 2.0 / s, "lr": 1e-3 * s, "grad_norm": 0.5, "tokens": 100 * s,
            "finite": True, "times": {"fwd": 0.1 * s}} for s in (1, 2, 3)]  # fmt: skip


def _events(path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _without(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_tensorboard_gets_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    w = MetricsWriter(tmp_path, tensorboard=True)
    for r in RECORDS:
        w.write(r)
    w.close()
    events = _events(tmp_path)
    assert set(events) == {"loss", "lr", "grad_norm", "tokens", "times/fwd"}  # strings and bools are not scalars
    for tag in ("loss", "lr", "tokens"):
        assert [s for s, _ in events[tag]] == [1, 2, 3]
        assert [v for _, v in events[tag]] == pytest.approx([r[tag] for r in RECORDS], rel=1e-6)
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == RECORDS


def test_nothing_changes_without_the_packages(tmp_path, monkeypatch):
    _without(monkeypatch, "tensorboard", "wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    w = MetricsWriter(tmp_path, tensorboard="auto", wandb="auto")
    for r in RECORDS:
        w.write(r)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert w.tensorboard is None and w.wandb is None
    with pytest.raises(ConfigError, match="logging.tensorboard: true, but tensorboard is not installed"):
        MetricsWriter(tmp_path / "b", tensorboard=True)
    with pytest.raises(ConfigError, match="logging.wandb: true, but wandb is not installed"):
        MetricsWriter(tmp_path / "c", wandb=True)


def test_wandb_gets_the_same_scalars(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    MetricsWriter(tmp_path / "auto-unconfigured", wandb="auto").close()
    assert calls == []  # installed but not configured: auto stays off (it would prompt for a login)
    monkeypatch.setenv("WANDB_MODE", "offline")
    w = MetricsWriter(tmp_path / "run", wandb="auto", wandb_project="p", run_config={"a": 1})
    for r in RECORDS:
        w.write(r)
    w.close()
    assert calls[0] == ("init", {"project": "p", "name": "run", "dir": str(tmp_path / "run"), "config": {"a": 1},
                                 "resume": "allow"})  # fmt: skip
    assert [c[1] for c in calls[1:4]] == [1, 2, 3] and calls[1][2] == metrics_mod.scalars(RECORDS[0])
    assert calls[-1] == ("finish",)


def test_sft_writes_event_files_beside_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert cli.main(["sft", str(TINY_RECIPE), f"output_dir={out}", "train.device=cpu", "train.loss_backend=torch",
                     "train.max_steps=3", "logging.progress=false", "logging.tensorboard=true",
                     "checkpoint.save_final=false"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = _events(out)
    assert [s for s, _ in events["loss"]] == [r["step"] for r in rows]
    assert [v for _, v in events["loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert set(metrics_mod.scalars(rows[0])) == set(events)
    off = tmp_path / "off"
    assert cli.main(["sft", str(TINY_RECIPE), f"output_dir={off}", "train.device=cpu", "train.loss_backend=torch",
                     "train.max_steps=1", "logging.progress=false", "logging.tensorboard=false",
                     "checkpoint.save_final=false"]) == 0  # fmt: skip
    assert not list(off.glob("events.out.tfevents.*"))

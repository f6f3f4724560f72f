"""The README's main job runs end to end at a reduced size and shows learning."""

import json

from vibeperf import demo


def test_demo_runs_and_heldout_nll_falls(tmp_path, monkeypatch):
    # as a user runs it on a CPU machine: backend "auto" is the torch path, not the Triton interpreter of the tests
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    summary = demo.run(tmp_path, steps=12)
    before, after = summary["before_sft"], summary["after_sft"]
    assert after["heldout_nll"] < before["heldout_nll"] - 1.0, summary
    for name in ("report.md", "summary.json", "sft/metrics.jsonl", "sft/loss.png", "final_checkpoint/config.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "summary.json").read_text())["sft_steps"] == 12

"""The README's main job runs the whole recipe end to end at a reduced size, and its report shows learning."""

import json

from vibeperf import demo


def test_demo_small_learns_and_writes_the_report(tmp_path, monkeypatch):
    # as a user runs it on a CPU machine: backend "auto" is the torch path, not the Triton interpreter of the tests
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    summary = demo.run(tmp_path, "small", seed=0)
    before, sft, rl = ({r["stage"]: r for r in summary["evals"]}[s] for s in ("before SFT", "after SFT", "after RL"))
    assert before["sampled_accuracy"] < 0.05, before
    # seed 0 on the 2-core CPU machine: held-out greedy accuracy 0% -> 20.0% after SFT -> 33.3% after RL; math pass@1
    # (T=1, 4 samples) 0% -> 20.7% -> 29.8%
    assert sft["greedy_accuracy"] > before["greedy_accuracy"] + 0.1, summary["evals"]
    assert sft["sampled_accuracy"] > before["sampled_accuracy"] + 0.1, summary["evals"]
    assert rl["greedy_accuracy"] > sft["greedy_accuracy"] + 0.05, summary["evals"]
    assert rl["pass_at_k"]["math"][0] > sft["pass_at_k"]["math"][0] + 0.04, summary["evals"]
    for name in ("index.md", "summary.json", "accuracy.png", "pass_at_k.png", "clr.png", "sft_stage1/metrics.jsonl",
                 "sft_stage1/loss.png", "sft_stage2/metrics.jsonl", "rl/metrics.jsonl", "rl/reward.png",
                 "rl/length.png", "distill/distilled.jsonl", "sft_distill/metrics.jsonl", "clr/summary.json",
                 "final_checkpoint/config.json", "final_checkpoint/model.safetensors"):  # fmt: skip
        assert (tmp_path / name).exists(), name
    index = (tmp_path / "index.md").read_text()
    assert "| after RL |" in index and "accuracy.png" in index
    phases = {json.loads(line).get("phase") for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()}
    assert {"mgpo", "long2short"} <= phases, phases
    assert summary["clr"]["queries"] == demo.SIZES["small"].clr_queries

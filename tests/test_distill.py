"""Offline self-distillation, the long-sequence scorer, B5 --tiny, and the end-to-end CPU pipeline on the tiny model.

The pipeline test trains the tiny model for a few steps on four additions (so that it answers some problems right),
then runs the real commands in order through `vibeperf.cli.main`: eval -> spectrum -> distill -> sft on the distilled
set. Engines there are transformers `generate` ("hf"): vLLM's start-up on the CPU costs more than the whole test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vibeperf.cli import main as cli_main
from vibeperf.config import EngineConfig, RewardConfig
from vibeperf.data import Message, SFTRecord, read_sft_jsonl, write_jsonl
from vibeperf.distill import DistillConfig, NothingToDistill, SelectionConfig, run_distill, select_traces
from vibeperf.rewards import math_reward
from vibeperf.rollout import Completion, RolloutEngine, RolloutGroup
from vibeperf.tiny_model import get_tiny_model

REPO = Path(__file__).resolve().parents[1]
EPS32 = 2.0**-23


def test_select_traces_buckets_short_and_outliers():
    cfg = SelectionConfig(length_buckets=[100], min_length_quantile=0.0, min_tokens=2, low_quantile=0.25,
                          high_quantile=0.75)  # fmt: skip
    lengths = [1, 40, 40, 40, 40, 40, 200, 200, 200, 200, 200]
    scores = [50.0, 1, 2, 3, 4, 5, 0.1, 0.2, 0.3, 0.4, 100.0]  # bucket 1 scores below all of bucket 0's
    sel = select_traces(scores, lengths, cfg)
    assert sel.bucket.tolist() == [0] * 6 + [1] * 5
    assert sel.reason == ["short", "low", "kept", "kept", "kept", "outlier", "low", "kept", "kept", "kept", "outlier"]
    assert sel.weight.tolist() == pytest.approx([0, 0, 2 / 3, 1, 4 / 3, 0, 0, 2 / 3, 1, 4 / 3, 0])
    for b in (0, 1):
        assert sel.weight[sel.kept & (sel.bucket == b)].mean() == pytest.approx(1.0)
    assert sel.counts() == {"kept": 6, "short": 1, "low": 2, "outlier": 2}


def test_select_traces_edges():
    keep_all = SelectionConfig(length_buckets=[10], min_length_quantile=0.0, low_quantile=0.0, high_quantile=1.0)
    sel = select_traces([3.0, 1.0, 2.0, 7.0], [5, 5, 5, 50], keep_all)
    assert sel.kept.all() and sel.weight.tolist() == pytest.approx([1.5, 0.5, 1.0, 1.0])  # one trace alone: weight 1
    assert select_traces([0.0, 0.0], [5, 6], keep_all).weight.tolist() == [1.0, 1.0]  # all-zero scores: weight 1
    assert select_traces([], [], keep_all).kept.shape == (0,)
    by_quantile = SelectionConfig(length_buckets=[1000], min_length_quantile=0.5, low_quantile=0.0, high_quantile=1.0)
    sel = select_traces([1.0] * 5, [10, 20, 30, 40, 50], by_quantile)
    assert sel.min_length == 30 and sel.reason == ["short", "short", "kept", "kept", "kept"]
    with pytest.raises(ValueError, match="finite"):
        select_traces([float("nan")], [3], keep_all)


CHATS = [
    SFTRecord((Message("user", "What is 2 plus 3?"), Message("assistant", "2 + 3 = 5. The answer is \\boxed{5}."))),
    SFTRecord((Message("system", "Be brief."), Message("user", "Repeat exactly: apple river"),
               Message("assistant", "apple river"))),
    SFTRecord((Message("user", "Please explain recursion to me step by step."),
               Message("assistant", "Sure! Let's think step by step: a function calls itself on a smaller input "
                                    "until it reaches a base case, then the results combine. " * 3))),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from vibeperf.score import load_scorer

    model, _ = load_scorer("tiny", dtype="float32", device="cpu")
    return model, AutoTokenizer.from_pretrained(get_tiny_model())


def _reference(samples):
    """Per sample: fp64 and fp32 transformers forwards of the unpacked tokens -> (logp, entropy) at scored tokens, each
    computed in the forward's own dtype (the fp32 one is plain PyTorch at the precision of the path under test)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for dtype in (torch.float64, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(get_tiny_model(), dtype=dtype, attn_implementation="eager")
        rows = []
        with torch.no_grad():
            for s in samples:
                logits = model(input_ids=s.input_ids.long()[None]).logits[0, :-1]  # [L - 1, V]
                logq = logits.log_softmax(-1)
                keep = s.loss_mask[1:]
                lp = logq.gather(1, s.input_ids.long()[1:, None])[:, 0][keep]
                rows.append((lp, -(logq.exp() * logq).sum(-1)[keep]))
        out[dtype] = rows
    return out[torch.float64], out[torch.float32]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_slp_fused_packed_equals_reference_nll(tiny, backend):
    """S_LP through packed rows + linear_logprob equals the per-token NLL mean of an unpacked transformers forward.

    Tolerance (flash-attention's rule): the error against an fp64 forward is at most twice that of transformers' own
    fp32 forward, plus one fp32 epsilon. The budget packs the two short samples into one row and leaves the long one
    alone in its own (longer than the budget, never truncated).
    """
    from vibeperf.model import tokenize_records
    from vibeperf.score import plan_rows, score_samples

    model, tok = tiny
    samples = tokenize_records(CHATS, tok)
    budget = samples[0].length + samples[1].length
    assert samples[2].length > budget
    rows = plan_rows(samples, budget)
    assert sorted(r.sample_ids for r in rows) == [(0, 1), (2,)]
    scores = score_samples(model, samples, token_budget=budget, entropy=True, per_token=True, backend=backend)
    ref64, ref32 = _reference(samples)
    for s, (lp64, ent64), (lp32, ent32) in zip(scores, ref64, ref32):
        assert s.num_tokens == len(s.logprobs) == len(lp64)
        ours = torch.tensor(s.logprobs, dtype=torch.float64)
        assert _rel(ours, lp64) <= 2 * _rel(lp32, lp64) + EPS32
        assert _rel(torch.tensor(s.entropies), ent64) <= 2 * _rel(ent32, ent64) + EPS32
        slp64, slp32 = -lp64.mean(), -lp32.mean()
        assert abs(s.nll_mean - slp64) <= 2 * abs(slp32 - slp64) + EPS32 * slp64
        assert s.nll_sum == pytest.approx(s.nll_mean * s.num_tokens, rel=1e-12)


def test_score_cli(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"text": "the answer is correct because we first compute each value", "id": 7},
                      {"prompt": "What is 2 plus 3?", "response": "The answer is \\boxed{5}."},
                      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                       "id": "c"}])  # fmt: skip
    out = tmp_path / "out.jsonl"
    argv = ["score", "--model", "tiny", "--input", str(src), "--output", str(out), "--per-token", "--entropy",
            "--backend", "torch", "--device", "cpu", "--token-budget", "64"]  # fmt: skip
    assert cli_main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r.get("id") for r in rows] == ["7", None, "c"]
    for r in rows:
        assert r["num_tokens"] == len(r["logprobs"]) == len(r["entropies"]) > 0
        assert r["nll_mean"] == pytest.approx(-np.mean(r["logprobs"]), rel=1e-6)
        assert r["entropy_mean"] == pytest.approx(np.mean(r["entropies"]), rel=1e-6)
    src.write_text('{"text": "ok"}\n{"text": 5}\n')
    assert cli_main(argv) == 2
    assert "in.jsonl:2: field 'text': expected a string, got int" in capsys.readouterr().err


class Scripted(RolloutEngine):
    """Fixed completions per prompt (identity chat template); no model."""

    name = "scripted"

    def __init__(self, script):
        self.script = script

    def chat_prompt(self, user, system=None):
        return user

    def generate(self, prompts, *, n, sampling):
        return [RolloutGroup([0], [Completion([1] * (j + 1), torch.zeros(j + 1), "stop", self.script[p][j % len(
            self.script[p])]) for j in range(n)], p) for p in prompts]  # fmt: skip

    def update_weights(self, named_tensors):
        raise ValueError("scripted engines are not swapped")

    def close(self):
        pass


def _distill_cfg(tmp_path, data, **kw) -> DistillConfig:
    return DistillConfig(data=[str(data)], generators=["tiny", "tiny"], output_dir=str(tmp_path / "d"), num_samples=4,
                         engine=EngineConfig(kind="hf"), reward=RewardConfig(workers=1),
                         selection=SelectionConfig(length_buckets=[24], min_length_quantile=0.0, low_quantile=0.0,
                                                   high_quantile=1.0), **kw)  # fmt: skip


def test_distill_keeps_verified_unique_traces(tmp_path):
    data = tmp_path / "p.jsonl"
    write_jsonl(data, [{"prompt": "What is 1 plus 1?", "domain": "math", "answer": "2", "id": "one"},
                       {"prompt": "What is 2 plus 2?", "domain": "math", "answer": "4"}])  # fmt: skip
    script = {"What is 1 plus 1?": [r"1 + 1 = 2. The answer is \boxed{2}.", r"\boxed{3}", r"so \boxed{2}"],
              "What is 2 plus 2?": [r"\boxed{5}"]}  # fmt: skip
    result = run_distill(_distill_cfg(tmp_path, data), make=lambda path: Scripted(script), progress=False)
    # 2 generators x 2 prompts x 4 samples; prompt one: samples 0, 2, 3 (= 0) verified per generator, 2 unique
    assert result.counts["sampled"] == 16 and result.counts["verified"] == 6
    assert result.counts["duplicate"] == 4 and result.kept == 2
    records = read_sft_jsonl(result.output)
    lines = [json.loads(x) for x in result.output.read_text().splitlines()]
    assert [r.messages[-1].content for r in records] == script["What is 1 plus 1?"][0:3:2]
    assert [r.messages[0] for r in records] == [Message("user", "What is 1 plus 1?")] * 2
    assert all(x["id"] == "one" and x["generator"] == str(get_tiny_model()) for x in lines)
    weights = np.array([r.weight for r in records])
    s_lp = np.array([x["s_lp"] for x in lines])
    assert weights.mean() == pytest.approx(1.0) and weights == pytest.approx(s_lp / s_lp.mean())
    cands = [json.loads(x) for x in (tmp_path / "d" / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 2 and all(c["kept"] and c["reason"] == "kept" for c in cands)

    write_jsonl(data, [{"prompt": "What is 2 plus 2?", "domain": "math", "answer": "4"}])
    with pytest.raises(NothingToDistill):
        run_distill(_distill_cfg(tmp_path, data), make=lambda path: Scripted(script), progress=False)
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["kept"] == 0


def test_b5_tiny(tmp_path):
    from vibeperf.bench import b5_score

    out = tmp_path / "b5.json"
    assert b5_score.main(["--tiny", "--tokens", "256", "--repeats", "1", "--backend", "torch", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["impl"]: r for r in doc["results"]}
    assert set(rows) == {"vibeperf", "hf-logits"} and all(r["correct"] and r["ms"] > 0 for r in rows.values())
    assert rows["vibeperf"]["n_tokens"] == 256 and doc["extra"]["vibeperf"]["rel_error"] < 1e-5
    assert doc["extra"]["baseline_attempts"][0]["status"] == "ok" and doc["machine"]["gpu"] == "cpu"


ADDITIONS = [(1, 3), (2, 2), (3, 1), (0, 4)]


@pytest.fixture(scope="module")
def arith_checkpoints(tmp_path_factory):
    """The tiny model after 12 and 24 SFT steps on additions whose sum is 4 (answered "\\boxed{4}"): checkpoints that
    solve those problems sometimes, then always, and never one whose sum is not 4."""
    from vibeperf.config import load_config
    from vibeperf.sft.config import SFTConfig
    from vibeperf.sft.trainer import train
    from vibeperf.train import list_checkpoints

    root = tmp_path_factory.mktemp("arith")
    write_jsonl(root / "train.jsonl", [{"prompt": f"What is {a} plus {b}?", "response": "The answer is \\boxed{4}."}
                                       for a, b in ADDITIONS] * 8)  # fmt: skip
    cfg = load_config(SFTConfig, REPO / "recipes" / "sft_distilled_tiny.toml", [
        f"output_dir={root / 'sft'}", f"model.path={get_tiny_model()}", f"stages.0.data=['{root / 'train.jsonl'}']",
        "stages.0.epochs=12", "optim.lr=1e-2", "optim.min_lr=1e-3", "checkpoint.every=12", "checkpoint.keep_last=0",
        "logging.progress=false", "logging.plot=false", "train.loss_backend=torch",
    ])  # fmt: skip
    assert train(cfg).steps == 24
    return list_checkpoints(root / "sft")


def test_pipeline_eval_spectrum_distill_sft(arith_checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    first, last = arith_checkpoints
    data = tmp_path / "problems.jsonl"
    problems = [{"id": f"p{a}{b}", "prompt": f"What is {a} plus {b}?", "domain": "math", "answer": str(a + b),
                 "subdomain": "add-small" if a < 2 else "add-large"} for a, b in [*ADDITIONS, (2, 3)]]  # fmt: skip
    write_jsonl(data, problems)
    common = [f"data=['{data}']", "sampling.max_tokens=24"]

    assert cli_main(["eval", "recipes/eval_tiny.toml", f"model={last}", f"output_dir={tmp_path / 'eval'}",
                     "samples.math=4", *common]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "math/add-small" in printed and "pass@4" in printed
    results = [json.loads(x) for x in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["n"] for r in results] == [4] * 5 and sum(r["correct"] for r in results) > 0
    assert (tmp_path / "eval" / "pass_at_k.png").is_file()

    assert cli_main(["spectrum", "recipes/spectrum_tiny.toml", f"checkpoints=['{first.parent}']",
                     f"output_dir={tmp_path / 'spec'}", "k=2", "num_samples=2", "subdomains=['add-small', 'add-large']",
                     *common]) == 0  # fmt: skip
    sel = json.loads((tmp_path / "spec" / "selection.json").read_text())
    assert sel["checkpoints"] == [str(first), str(last)] and len(sel["chosen"]) == 2
    merged = Path(sel["merged"])
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()

    assert cli_main(["distill", "recipes/distill_tiny.toml", f"generators=['{first}', '{last}']", f"student={merged}",
                     f"output_dir={tmp_path / 'distill'}", "num_samples=4", "scoring.backend=torch",
                     "selection.low_quantile=0.0", *common]) == 0  # fmt: skip
    distilled = tmp_path / "distill" / "distilled.jsonl"
    records = read_sft_jsonl(distilled)
    by_prompt = {p["prompt"]: p["answer"] for p in problems}
    for r in records:
        assert math_reward(by_prompt[r.messages[0].content], r.messages[-1].content).reward == 1.0
    lines = [json.loads(x) for x in distilled.read_text().splitlines()]
    for bucket in {x["bucket"] for x in lines}:
        assert np.mean([x["weight"] for x in lines if x["bucket"] == bucket]) == pytest.approx(1.0)
    summary = json.loads((tmp_path / "distill" / "summary.json").read_text())
    assert summary["counts"]["sampled"] == 2 * 5 * 4 and summary["kept"] == len(records) > 0

    assert cli_main(["sft", "recipes/sft_distilled_tiny.toml", f"model.path={last}", f"stages.0.data=['{distilled}']",
                     f"output_dir={tmp_path / 'sft'}", "train.max_steps=2", "logging.progress=false",
                     "logging.plot=false", "checkpoint.save_final=false", "train.loss_backend=torch"]) == 0  # fmt: skip
    metrics = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and np.isfinite(metrics[-1]["loss"])


@pytest.mark.gpu
def test_b5_gpu_short(tmp_path):
    """B5's code at the 3B width (2 layers, 16K tokens) on a GPU: both methods correct, scoring needs less memory."""
    from vibeperf.bench import b5_score

    out = tmp_path / "b5.json"
    assert b5_score.main(["--tokens", "16384", "--layers", "2", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["impl"]: r for r in doc["results"]}
    assert rows["vibeperf"]["correct"] and rows["hf-logits"]["correct"]
    assert rows["vibeperf"]["extra_mem_gib"] < rows["hf-logits"]["extra_mem_gib"]

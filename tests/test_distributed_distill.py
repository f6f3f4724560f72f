"""`vibeperf distill` split across processes (torchrun): each process samples and scores a contiguous block of the
problems and rank 0 writes the files. Two ranks are played one after the other in this process (the gather between
them replaced by handing rank 1's share to rank 0), and rank 0's files equal a one-process run's."""

import json

import torch

from vibeperf import distributed as vdist
from vibeperf.config import EngineConfig, RewardConfig
from vibeperf.data import write_jsonl
from vibeperf.distill import DistillConfig, SelectionConfig, run_distill
from vibeperf.distill.config import ScoringConfig
from vibeperf.rollout import Completion, RolloutEngine, RolloutGroup

PROBLEMS = [(f"What is {a} plus {b}?", str(a + b)) for a, b in [(1, 1), (2, 2), (3, 1), (2, 5), (4, 4)]]


class Scripted(RolloutEngine):
    """Completion j of a prompt is `\\boxed{answer}` repeated (j % 3) + 1 times, or a wrong box when j == 2."""

    name = "scripted"

    def chat_prompt(self, user, system=None):
        return user

    def generate(self, prompts, *, n, sampling):
        answers = dict(PROBLEMS)

        def text(p, j):
            return f"so \\boxed{{{answers[p]}1}}" if j == 2 else " ".join([f"\\boxed{{{answers[p]}}}"] * (j % 3 + 1))

        return [RolloutGroup([0], [Completion([1] * (j + 1), torch.zeros(j + 1), "stop", text(p, j)) for j in range(n)],
                             p) for p in prompts]  # fmt: skip

    def update_weights(self, named_tensors):
        raise ValueError("scripted engines are not swapped")

    def close(self):
        pass


def _cfg(tmp_path, data, out) -> DistillConfig:
    return DistillConfig(data=[str(data)], generators=["tiny", "tiny"], output_dir=str(tmp_path / out), num_samples=4,
                         engine=EngineConfig(kind="hf"), reward=RewardConfig(workers=1), dedup=False,
                         scoring=ScoringConfig(backend="torch"),
                         selection=SelectionConfig(length_buckets=[24], min_length_quantile=0.0, low_quantile=0.1,
                                                   high_quantile=0.9))  # fmt: skip


def _files(out) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("seconds")
    return {"summary": summary, "distilled": (out / "distilled.jsonl").read_text(),
            "candidates": (out / "candidates.jsonl").read_text()}  # fmt: skip


def test_distill_split_over_processes_writes_the_one_process_files(tmp_path, monkeypatch):
    world = 2  # blocks of 2 and 3 problems
    data = tmp_path / "p.jsonl"
    write_jsonl(data, [{"prompt": p, "domain": "math", "answer": a} for p, a in PROBLEMS])
    one = run_distill(_cfg(tmp_path, data, "one"), make=lambda path: Scripted(), progress=False)

    shares = {}
    monkeypatch.setattr(vdist, "world_size", lambda: world)
    for r in reversed(range(world)):  # the others first: rank 0 gathers their shares

        def gather(mine, r=r):
            shares[r] = mine
            return {k: [x for q in sorted(shares) for x in shares[q][k]] for k in mine}

        monkeypatch.setattr(vdist, "rank", lambda r=r: r)
        monkeypatch.setattr(vdist, "gather_lists", gather)
        result = run_distill(_cfg(tmp_path, data, f"rank{r}"), make=lambda path: Scripted(), progress=False)
        lo, hi = len(PROBLEMS) * r // world, len(PROBLEMS) * (r + 1) // world
        assert {c[0] for c in shares[r]["candidates"]} == set(range(lo, hi)), "its own block of problems only"
        if r:
            assert not any((tmp_path / f"rank{r}").iterdir()), "only rank 0 writes"
    assert sorted(len(shares[r]["counts"]) for r in shares) == [1] * world
    assert result.counts == one.counts and result.kept == one.kept > 0
    assert _files(tmp_path / "rank0") == _files(tmp_path / "one")

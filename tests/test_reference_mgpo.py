"""The fp32 MGPO references against hand-worked values and an independent fp64 per-token Python loop."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
from vibeperf.kernels.ce.reference import linear_logprob_reference
from vibeperf.kernels.mgpo.reference import (
    group_advantages_reference,
    group_success_rate_reference,
    maxent_divergence_reference,
    mgpo_loss_reference,
    mgpo_weight_reference,
)

LOG2 = math.log(2.0)


def loop_advantages(rewards: list[float], groups: list[int], *, scale: str = "group", mgpo_lambda: float = 0.0):
    """(A' per sequence, w per group id) with explicit loops in Python floats."""
    members: dict[int, list[int]] = defaultdict(list)
    for s, g in enumerate(groups):
        members[g].append(s)
    adv = [0.0] * len(rewards)
    weights = {}
    for g, seqs in members.items():
        rs = [rewards[s] for s in seqs]
        n = len(rs)
        p = sum(1 for r in rs if r == 1) / n
        weights[g] = math.exp(-mgpo_lambda * sum(x * math.log(x / 0.5) for x in (p, 1 - p) if x > 0))
        if n < 2 or max(rs) == min(rs):
            continue
        mean = sum(rs) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (n - 1))
        for s in seqs:
            adv[s] = weights[g] * (rewards[s] - mean) / (std + 1e-6 if scale == "group" else 1.0)
    return adv, weights


@dataclass
class Case:
    hidden: torch.Tensor  # [N, H] fp64
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    targets: torch.Tensor  # [N]
    seq_index: torch.Tensor  # [N]
    group_index: torch.Tensor  # [S]
    rewards: torch.Tensor  # [S]
    old_logp: torch.Tensor  # [N]
    rollout_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    loss_mask: torch.Tensor | None


RATIOS = [0.5, 1.5, 0.95, 1.1, 0.7, 1.3, 1.0, 0.85]
ROLLOUT_SHIFT = [-0.3, 0.2, 1.0, 0.0, 0.9, -1.2, 0.5]


def make_case(
    lengths,
    groups,
    rewards,
    *,
    vocab=7,
    dim=5,
    ignored=(),
    masked=(),
    clip_ratios=False,
    rollout=False,
    ref=False,
    bias=False,
    temperature=1.0,
    interleave=False,
    seed=0,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    seq_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if interleave:
        seq_index = seq_index[torch.randperm(len(seq_index), generator=gen)]
    n = len(seq_index)
    hidden = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    weight = 0.7 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    b = 0.3 * torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[list(ignored)] = -100
    logp = linear_logprob_reference(hidden, weight, targets, bias=b, temperature=temperature)
    if clip_ratios:
        ratio = torch.tensor([RATIOS[t % len(RATIOS)] for t in range(n)], dtype=torch.float64)
        old = logp - ratio.log()
    else:
        old = logp + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64)
    # Ignored rows hold garbage on purpose: the loss must not look at them.
    old = torch.where(targets == -100, torch.full_like(old, 50.0), old)
    shift = torch.tensor([ROLLOUT_SHIFT[t % len(ROLLOUT_SHIFT)] for t in range(n)], dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(n, dtype=torch.bool)
        mask[list(masked)] = False
    return Case(
        hidden=hidden,
        weight=weight,
        bias=b,
        targets=targets,
        seq_index=seq_index,
        group_index=torch.tensor(groups),
        rewards=torch.tensor(rewards, dtype=torch.float64),
        old_logp=old,
        rollout_logp=old - shift if rollout else None,
        ref_logp=old + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64) if ref else None,
        loss_mask=mask,
    )


def loop_loss(
    c: Case,
    *,
    advantages=None,
    mgpo_lambda=0.0,
    scale="group",
    eps_low=0.2,
    eps_high=0.2,
    aggregation="seq-mean-token-mean",
    tis_cap=2.0,
    beta=0.0,
    temperature=1.0,
):
    """(loss, metrics) of MGPO token by token in Python floats; entropy as -sum p log p."""
    groups = c.group_index.tolist()
    if advantages is None:
        adv, weights = loop_advantages(c.rewards.tolist(), groups, scale=scale, mgpo_lambda=mgpo_lambda)
    else:
        adv, weights = list(advantages), {g: 1.0 for g in groups}
    hid, w_rows, tgt = c.hidden.tolist(), c.weight.tolist(), c.targets.tolist()
    bias = c.bias.tolist() if c.bias is not None else [0.0] * len(w_rows)
    per_seq: dict[int, list[float]] = defaultdict(list)
    ratios, entropies, low, high, capped, kls = [], [], 0, 0, 0, []
    for t, y in enumerate(tgt):
        if y == -100 or (c.loss_mask is not None and not bool(c.loss_mask[t])):
            continue
        z = [(sum(h * w for h, w in zip(hid[t], row)) + b) / temperature for row, b in zip(w_rows, bias)]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        logp = z[y] - lse
        entropies.append(-sum(math.exp(v - lse) * (v - lse) for v in z))
        seq = int(c.seq_index[t])
        a = adv[seq]
        ratio = math.exp(logp - float(c.old_logp[t]))
        ratios.append(ratio)
        low += ratio < 1 - eps_low and a < 0
        high += ratio > 1 + eps_high and a > 0
        term = min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)
        if c.rollout_logp is not None:
            is_w = math.exp(float(c.old_logp[t]) - float(c.rollout_logp[t]))
            capped += is_w > tis_cap
            term *= min(is_w, tis_cap)
        if beta > 0:
            d = float(c.ref_logp[t]) - logp
            kls.append(math.exp(d) - d - 1)
            term -= beta * kls[-1]
        per_seq[seq].append(term)
    terms = [x for seq in per_seq.values() for x in seq]
    num = max(len(terms), 1)
    if aggregation == "token-mean":
        objective = sum(terms) / num
    elif aggregation == "seq-mean-token-mean":
        objective = sum(sum(v) / len(v) for v in per_seq.values()) / max(len(per_seq), 1)
    else:
        max_len = max((len(v) for v in per_seq.values()), default=0)
        objective = sum(terms) / (len(groups) * max(max_len, 1))
    metrics = {
        "clip_frac_low": low / num,
        "clip_frac_high": high / num,
        "entropy_mean": sum(entropies) / num,
        "ratio_mean": sum(ratios) / num,
        "ratio_max": max(ratios, default=0.0),
        "tis_frac": capped / num,
        "mgpo_weights": [weights.get(g, 0.0) for g in range(max(groups) + 1)],
        "advantages": adv,
    }
    if beta > 0:
        metrics["kl_mean"] = sum(kls) / num
    return -objective, metrics


def run_reference(c: Case, dtype=torch.float64, *, advantages=None, **kw):
    cast = lambda t: None if t is None else t.to(dtype)
    given = {"advantages": advantages.to(dtype)} if advantages is not None else {"rewards": cast(c.rewards)}
    return mgpo_loss_reference(
        cast(c.hidden),
        cast(c.weight),
        c.targets,
        seq_index=c.seq_index,
        group_index=c.group_index,
        old_logp=cast(c.old_logp),
        rollout_logp=cast(c.rollout_logp),
        ref_logp=cast(c.ref_logp),
        loss_mask=c.loss_mask,
        bias=cast(c.bias),
        **given,
        **kw,
    )


AGGS = ["seq-mean-token-mean", "token-mean", "seq-sum-norm"]
# lengths, groups, rewards: two groups of unequal sizes and lengths, one group of three, a singleton.
BASE = dict(lengths=[3, 5, 1, 4, 6, 2, 3], groups=[0, 0, 0, 1, 1, 2, 2], rewards=[1.0, 0.0, 1.0, 0.0, 1.0, 0.3, 0.8])
LOSS_CASES = [
    (f"{agg}-{name}", agg, case_kw, loss_kw)
    for agg in AGGS
    for name, case_kw, loss_kw in [
        ("plain", {}, {}),
        ("clip", dict(clip_ratios=True), {}),
        ("clip-asym-lambda", dict(clip_ratios=True), dict(eps_low=0.1, eps_high=0.28, mgpo_lambda=1.5)),
        ("tis", dict(rollout=True, clip_ratios=True), dict(mgpo_lambda=1.0)),
        ("kl", dict(ref=True), dict(beta=0.1)),
        ("tis-kl-cap", dict(rollout=True, ref=True, clip_ratios=True), dict(beta=0.05, tis_cap=1.5)),
        ("ignored", dict(ignored=(0, 4, 5, 12), clip_ratios=True), dict(mgpo_lambda=0.5)),
        ("loss-mask", dict(masked=(1, 2, 3, 7, 8, 9, 10), clip_ratios=True), {}),
        ("empty-seq", dict(ignored=(8,), masked=(0, 1, 2)), {}),
        ("scale-none-temp-bias", dict(bias=True, temperature=0.7), dict(scale="none", temperature=0.7)),
        ("interleaved", dict(interleave=True, clip_ratios=True, rollout=True), dict(mgpo_lambda=2.0)),
    ]
]


@pytest.mark.parametrize("agg,case_kw,loss_kw", [c[1:] for c in LOSS_CASES], ids=[c[0] for c in LOSS_CASES])
def test_mgpo_loss_matches_python_loop(agg, case_kw, loss_kw):
    c = make_case(**BASE, **case_kw)
    want_loss, want = loop_loss(c, aggregation=agg, **loss_kw)
    out = run_reference(c, aggregation=agg, **loss_kw)
    torch.testing.assert_close(out.loss, torch.tensor(want_loss, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert set(out.metrics) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(
            out.metrics[name], torch.tensor(value, dtype=torch.float64), rtol=1e-10, atol=1e-12, msg=name
        )
    out32 = run_reference(c, torch.float32, aggregation=agg, **loss_kw)
    assert out32.loss.dtype == torch.float32 and all(m.dtype == torch.float32 for m in out32.metrics.values())
    torch.testing.assert_close(out32.loss, out.loss.float(), rtol=2e-5, atol=1e-6)


def test_clip_metrics_by_hand():
    # One group, rewards [1, 0]: A = (+0.5, -0.5) / std(1/sqrt 2); ratios 0.5, 1.5, 0.95, 1.1 cycle over the tokens.
    c = make_case([4, 4], [0, 0], [1.0, 0.0], clip_ratios=True)
    out = run_reference(c)
    torch.testing.assert_close(out.metrics["ratio_max"], torch.tensor(1.5, dtype=torch.float64))
    # Seq 0 (A > 0) tokens 0..3: ratio 1.5 is clipped high. Seq 1 (A < 0) tokens 4..7: 0.7 is clipped low.
    assert out.metrics["clip_frac_high"].item() == pytest.approx(1 / 8)
    assert out.metrics["clip_frac_low"].item() == pytest.approx(1 / 8)


def test_advantages_given_are_used_as_is():
    c = make_case(**BASE, clip_ratios=True)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 1.1, -0.7], dtype=torch.float64)
    want_loss, want = loop_loss(c, advantages=adv.tolist())
    out = run_reference(c, advantages=adv, mgpo_lambda=3.0)
    torch.testing.assert_close(out.loss, torch.tensor(want_loss, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["advantages"], adv)
    torch.testing.assert_close(out.metrics["mgpo_weights"], torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("agg", AGGS, ids=AGGS)
def test_degenerate_groups_give_zero_loss(agg):
    # Every group is all-correct, all-wrong or a singleton: no advantage anywhere, and nothing is NaN.
    c = make_case([3, 2, 4, 1, 2], [0, 0, 1, 1, 2], [1.0, 1.0, 0.0, 0.0, 1.0], clip_ratios=True)
    hidden = c.hidden.clone().requires_grad_(True)
    out = mgpo_loss_reference(
        hidden,
        c.weight,
        c.targets,
        seq_index=c.seq_index,
        group_index=c.group_index,
        rewards=c.rewards,
        old_logp=c.old_logp,
        mgpo_lambda=1.0,
        aggregation=agg,
    )
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(out.metrics["advantages"], torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(out.metrics["mgpo_weights"], torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.isfinite(hidden.grad).all() and not hidden.grad.any()
    # Ratios 0.5 and 1.5 are outside the clip range, but with A' = 0 no clip is active.
    assert out.metrics["clip_frac_low"].item() == 0.0 and out.metrics["clip_frac_high"].item() == 0.0


GRAD_CASES = [
    ("seqmean-tis-kl", "seq-mean-token-mean", dict(rollout=True, ref=True), dict(beta=0.1, mgpo_lambda=1.0)),
    ("tokenmean-ignored-mask", "token-mean", dict(ignored=(1,), masked=(4,)), {}),
    ("seqsumnorm-bias-temp", "seq-sum-norm", dict(bias=True, temperature=0.8), dict(temperature=0.8)),
]


@pytest.mark.parametrize("agg,case_kw,loss_kw", [c[1:] for c in GRAD_CASES], ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_finite_differences(agg, case_kw, loss_kw):
    c = make_case([3, 2, 2], [0, 0, 0], [1.0, 0.0, 0.5], vocab=5, dim=3, **case_kw)
    kw = dict(aggregation=agg, **loss_kw)

    def loss_fn(hidden, weight):
        return mgpo_loss_reference(
            hidden,
            weight,
            c.targets,
            seq_index=c.seq_index,
            group_index=c.group_index,
            rewards=c.rewards,
            old_logp=c.old_logp,
            rollout_logp=c.rollout_logp,
            ref_logp=c.ref_logp,
            loss_mask=c.loss_mask,
            bias=c.bias,
            **kw,
        ).loss

    hidden = c.hidden.clone().requires_grad_(True)
    weight = c.weight.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_fn, (hidden, weight))
    # Independently: central differences of the Python-loop loss w.r.t. hidden.
    (grad,) = torch.autograd.grad(loss_fn(hidden, c.weight), hidden)
    fd = torch.zeros_like(c.hidden)
    step = 1e-6
    for t in range(c.hidden.shape[0]):
        for h in range(c.hidden.shape[1]):
            plus, minus = c.hidden.clone(), c.hidden.clone()
            plus[t, h] += step
            minus[t, h] -= step
            fd[t, h] = (
                loop_loss(Case(**{**vars(c), "hidden": plus}), **kw)[0]
                - loop_loss(Case(**{**vars(c), "hidden": minus}), **kw)[0]
            ) / (2 * step)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    dead = c.targets == -100
    if c.loss_mask is not None:
        dead |= ~c.loss_mask
    assert not grad[dead].any()


ADV_CASES = [
    ("pairs", [0, 0, 1, 1], [1.0, 0.0, 0.2, 0.9]),
    ("unequal-sizes", [0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [1.0, 0.0, 0.0, 0.1, 0.5, 0.5, 0.9, 1.0, 0.0, 1.0]),
    ("singleton-and-equal", [0, 1, 1, 1, 2, 2], [0.7, 0.3, 0.3, 0.3, 1.0, 0.0]),
    ("unsorted-ids", [2, 0, 1, 0, 2, 1, 0], [0.0, 1.0, 0.25, 0.5, 1.0, 0.75, 0.0]),
]


@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("groups,rewards", [c[1:] for c in ADV_CASES], ids=[c[0] for c in ADV_CASES])
def test_advantages_match_python_loop(groups, rewards, scale):
    want, _ = loop_advantages(rewards, groups, scale=scale)
    got64 = group_advantages_reference(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), scale=scale)
    torch.testing.assert_close(got64, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    got32 = group_advantages_reference(torch.tensor(rewards), torch.tensor(groups), scale=scale)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert torch.equal(got32 == 0, torch.tensor(want) == 0)


def test_unbiased_std_by_hand():
    # rewards [1, 0, 0, 0]: mean 0.25; unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.75 / 3 = 0.25, std 0.5
    # (the biased std would be sqrt(0.1875) ~ 0.433).
    adv = group_advantages_reference(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.int64))
    std = 0.5 + 1e-6
    torch.testing.assert_close(adv, torch.tensor([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]))


def test_equal_rewards_are_exactly_zero():
    # sum([0.1] * 3) / 3 != 0.1 in floating point: the zero must come from the equality check, not the mean.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7], dtype=torch.float64)
    adv = group_advantages_reference(rewards, torch.tensor([0, 0, 0, 1]))
    assert torch.equal(adv, torch.zeros(4, dtype=torch.float64))


# p_c = 0.25: D_ME = 0.25 ln(0.5) + 0.75 ln(1.5) = -0.1732867951 + 0.3040988311 = 0.1308120359.
D_QUARTER = 0.25 * -0.6931471805599453 + 0.75 * 0.4054651081081644
WEIGHT_CASES = [
    ("lambda0", [1.0, 0.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0, 1, 1], 0.0, [1.0, 1.0]),
    ("pc-half", [1.0, 0.0, 0.0, 1.0, 0.0, 1.0], [0, 0, 1, 1, 2, 2], 3.0, [1.0, 1.0, 1.0]),
    ("pc-quarter", [1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], 1.0, [math.exp(-D_QUARTER)]),
    ("pc-quarter-lambda2", [0.0, 1.0, 0.0, 0.0], [0, 0, 0, 0], 2.0, [math.exp(-2 * D_QUARTER)]),
    ("pc-0-and-1", [0.0, 0.0, 1.0, 1.0, 1.0], [0, 0, 1, 1, 1], 1.0, [0.5, 0.5]),
    ("partial-credit-not-correct", [0.99, 0.5, 1.0, 0.0], [0, 0, 0, 0], 1.0, [math.exp(-D_QUARTER)]),
]


@pytest.mark.parametrize("rewards,groups,lam,want", [c[1:] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES])
def test_mgpo_weights(rewards, groups, lam, want):
    w = mgpo_weight_reference(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), mgpo_lambda=lam)
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-15)


def test_maxent_divergence_by_hand():
    p = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    want = torch.tensor([LOG2, D_QUARTER, 0.0, D_QUARTER, LOG2], dtype=torch.float64)
    torch.testing.assert_close(maxent_divergence_reference(p), want, rtol=1e-14, atol=1e-15)
    assert D_QUARTER == pytest.approx(0.1308120359, abs=1e-10)
    rate = group_success_rate_reference(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1, 1]))
    torch.testing.assert_close(rate, torch.tensor([0.5, 2 / 3]))


def test_bf16_inputs_give_fp32_outputs():
    c = make_case(**BASE, ref=True, rollout=True)
    out = run_reference(c, torch.bfloat16, beta=0.1)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(m.dtype == torch.float32 for m in out.metrics.values())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rewards=None, advantages=None), "exactly one"),
        (dict(advantages=torch.zeros(7)), "exactly one"),
        (dict(aggregation="seq-mean"), "aggregation"),
        (dict(beta=0.1), "ref_logp"),
        (dict(scale="batch"), "scale"),
        (dict(mgpo_lambda=-1.0), "mgpo_lambda"),
    ],
    ids=["neither", "both", "bad-aggregation", "beta-without-ref", "bad-scale", "negative-lambda"],
)
def test_bad_arguments_raise(kw, match):
    c = make_case(**BASE)
    args = dict(seq_index=c.seq_index, group_index=c.group_index, rewards=c.rewards, old_logp=c.old_logp) | kw
    with pytest.raises(ValueError, match=match):
        mgpo_loss_reference(c.hidden, c.weight, c.targets, **args)

"""fp32 references for the policy-loss family (DESIGN.md sections 2 and 2b): obviously right, slow, [N, V] logits.

The loss is written as TRL's GRPOTrainer and Liger's grpo_loss.py write it, on packed tokens, and differentiated by
autograd: nothing here shares code with the closed forms of `token_loss.py` that the fused op uses.
Everything is computed in fp32, or in fp64 when the inputs are fp64 (tests use that for finite differences).
Groups and sequences are numbered densely: `group_index` [S] holds ids in [0, num_groups) with
num_groups = group_index.max() + 1, and `seq_index` [N] holds ids in [0, S) with S = group_index.numel().
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from vibeperf.kernels.ce.reference import linear_logprob_reference

from .options import PolicyLossOptions

STD_EPS = 1e-6
ADVANTAGE_SCALES = ("group", "none", "no_std", "rloo")


class PolicyLossOutput(NamedTuple):
    """`loss`: scalar, differentiable w.r.t. hidden and weight; `metrics`: name -> detached tensor (no host sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def float_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _num_groups(group_index: torch.Tensor) -> int:
    return int(group_index.max()) + 1 if group_index.numel() else 0


def _group_sum(values: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """values: [S] -> per-group sums [num_groups]."""
    return values.new_zeros(num_groups).index_add(0, group_index, values)


def group_advantages_reference(
    rewards: torch.Tensor, group_index: torch.Tensor, *, scale: str = "group"
) -> torch.Tensor:
    """Advantages A [S] of each sequence from its group's rewards.

    rewards: [S]; group_index: [S] int64 group id of each sequence. scale "group": (r_i - mean_G r) / (std_G r + 1e-6),
    std_G the unbiased sample standard deviation (torch.std's default); "none" / "no_std": r_i - mean_G r (Dr.GRPO);
    "rloo": r_i - (mean of the other rewards of the group). Groups of one sample, or whose rewards are all equal, get
    exactly 0 (the check is on the rewards themselves, not on a rounded mean).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    r = rewards.to(float_dtype(rewards))
    num_groups = _num_groups(group_index)
    count = _group_sum(torch.ones_like(r), group_index, num_groups)  # [num_groups]
    total = _group_sum(r, group_index, num_groups)
    mean = total / count.clamp_min(1)
    centred = r - mean[group_index]  # [S]
    r_max = r.new_full((num_groups,), -torch.inf).scatter_reduce(0, group_index, r, "amax")
    r_min = r.new_full((num_groups,), torch.inf).scatter_reduce(0, group_index, r, "amin")
    degenerate = (count < 2) | (r_max == r_min)  # [num_groups]
    if scale == "group":
        var = _group_sum(centred.square(), group_index, num_groups) / (count - 1).clamp_min(1)
        adv = centred / (var.sqrt()[group_index] + STD_EPS)
    elif scale == "rloo":
        others = (total[group_index] - r) / (count[group_index] - 1).clamp_min(1)
        adv = r - others
    else:
        adv = centred
    return torch.where(degenerate[group_index], torch.zeros_like(adv), adv)


def group_success_rate_reference(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """p_c [num_groups]: the fraction of a group's rewards that are exactly 1 (an id with no member gets 0)."""
    correct = (rewards == 1).to(float_dtype(rewards))
    num_groups = _num_groups(group_index)
    count = _group_sum(torch.ones_like(correct), group_index, num_groups)
    return _group_sum(correct, group_index, num_groups) / count.clamp_min(1)


def maxent_divergence_reference(p_c: torch.Tensor) -> torch.Tensor:
    """D_ME = p log(p / 0.5) + (1 - p) log((1 - p) / 0.5), natural log, 0 log 0 = 0; same shape as p_c."""
    return torch.xlogy(p_c, p_c / 0.5) + torch.xlogy(1 - p_c, (1 - p_c) / 0.5)


def mgpo_weight_reference(rewards: torch.Tensor, group_index: torch.Tensor, *, mgpo_lambda: float) -> torch.Tensor:
    """MaxEnt weights w [num_groups] = exp(-mgpo_lambda * D_ME(p_c)), p_c from `group_success_rate_reference`.

    rewards: [S]; group_index: [S]. mgpo_lambda = 0 gives 1 everywhere (plain GRPO); p_c = 0.5 gives 1.
    """
    if mgpo_lambda < 0:
        raise ValueError(f"mgpo_lambda must be >= 0, got {mgpo_lambda}")
    return torch.exp(-mgpo_lambda * maxent_divergence_reference(group_success_rate_reference(rewards, group_index)))


def aggregate_reference(
    values: torch.Tensor, valid: torch.Tensor, seq_index: torch.Tensor, num_sequences: int, aggregation: str,
    max_len: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Reduce per-token values [N] over the `valid` [N] tokens to a scalar.

    - "seq-mean-token-mean": mean over each sequence's valid tokens, then mean over the sequences that have at least
      one valid token.
    - "token-mean", "bnpo": mean over all valid tokens (of this batch).
    - "seq-sum-norm" (Dr.GRPO): sum over all valid tokens / (num_sequences * max_len), where num_sequences counts
      every sequence of the batch (G groups' completions together) and max_len is the given length, or else the
      largest number of valid tokens in one sequence (the batch's own longest response).
    With no valid token at all the result is 0.
    """
    values = torch.where(valid, values, torch.zeros_like(values))
    if aggregation in ("token-mean", "bnpo"):
        return values.sum() / valid.sum().clamp_min(1)
    seq_sum = values.new_zeros(num_sequences).index_add(0, seq_index, values)  # [S]
    seq_len = values.new_zeros(num_sequences).index_add(0, seq_index, valid.to(values.dtype))  # [S]
    if aggregation == "seq-mean-token-mean":
        has_tokens = seq_len > 0
        seq_mean = torch.where(has_tokens, seq_sum / seq_len.clamp_min(1), torch.zeros_like(seq_sum))
        return seq_mean.sum() / has_tokens.sum().clamp_min(1)
    if aggregation == "seq-sum-norm":
        return values.sum() / (num_sequences * (seq_len.max().clamp_min(1) if max_len is None else max_len))
    raise ValueError(f"unknown aggregation {aggregation!r}")


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of values [N] over the valid [N] entries; 0 when none is valid."""
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp_min(1)


def _seq_sum(values: torch.Tensor, seq_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-token values [N] -> the sum over each token's own sequence, per token [N]."""
    return values.new_zeros(num_sequences).index_add(0, seq_index, values)[seq_index]


def policy_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor,
    group_index: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> PolicyLossOutput:
    """The policy loss of DESIGN.md section 2b on packed tokens (arguments as `policy_loss`).

    old_logp None: on-policy (old = logp detached). Per valid token (target != ignore_index and loss_mask):
        log_w = logp - old (token) | masked mean over the sequence (sequence) | its value + logp - sg(logp)
        (sequence_token); r = exp(log_w)
        ppo-clip: l = -min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A), dual-clip l = min(l, -c A) for A < 0
        cispo: l = -sg(min(r, eps_high)) A logp;  sapo: l = -A sigmoid(tau (r - 1)) 4 / tau
        l *= rollout factor (detached; truncated ratio, or 0 / 1 for a masked token)
        l += beta * kl(logp, ref) (* r when kl_bias_correction)
    loss = aggregate(l) - entropy_coef * aggregate(entropy).
    Metrics (means over valid tokens): clip_frac_low (r < 1 - eps_low and A < 0), clip_frac_high (r above its upper
    bound and A > 0), dual_clip_frac, ratio_mean, ratio_max, entropy_mean, tis_frac (rollout ratio truncated),
    mis_frac (token masked by the rollout correction), kl_mean (beta > 0); mgpo_weights [num_groups], advantages [S].
    """
    o = PolicyLossOptions() if options is None else options
    if (rewards is None) == (advantages is None):
        raise ValueError("give exactly one of rewards and advantages")
    if o.beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if o.rollout_correction is not None and rollout_logp is None:
        raise ValueError("rollout_correction needs rollout_logp")
    dtype = float_dtype(hidden)
    num_sequences = group_index.numel()
    num_groups = _num_groups(group_index)
    if rewards is not None:
        rewards = rewards.to(dtype)
        mgpo_weights = mgpo_weight_reference(rewards, group_index, mgpo_lambda=o.mgpo_lambda)
        adv = mgpo_weights[group_index] * group_advantages_reference(rewards, group_index, scale=o.advantage)
    else:
        mgpo_weights = torch.ones(num_groups, dtype=dtype, device=hidden.device)
        adv = advantages.to(dtype)

    logp, entropy = linear_logprob_reference(
        hidden, weight, targets, temperature=temperature, bias=bias, ignore_index=ignore_index, return_entropy=True
    )
    valid = targets != ignore_index
    if loss_mask is not None:
        valid = valid & loss_mask
    zero = torch.zeros_like(logp)
    vf = valid.to(dtype)
    a = adv[seq_index]  # [N]
    old = logp.detach() if old_logp is None else old_logp.to(dtype)
    # Invalid rows may hold garbage old/rollout/ref log-probs; zeroing the differences keeps exp() finite there.
    log_ratio = torch.where(valid, logp - old, zero)
    seq_len = _seq_sum(vf, seq_index, num_sequences).clamp_min(1)
    if o.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        seq_log_w = _seq_sum(log_ratio, seq_index, num_sequences) / seq_len
        log_w = seq_log_w if o.importance_sampling_level == "sequence" else seq_log_w.detach() + logp - logp.detach()
    r = torch.exp(log_w)

    if o.loss_type == "cispo":
        loss_t = -torch.clamp(r, max=o.epsilon_high).detach() * a * logp
        low = torch.zeros_like(valid)
        high = (r > o.epsilon_high) & (a > 0)
        dual = torch.zeros_like(valid)
    elif o.loss_type == "sapo":
        tau = torch.where(a > 0, torch.full_like(a, o.sapo_temperature_pos), torch.full_like(a, o.sapo_temperature_neg))
        loss_t = -a * torch.sigmoid(tau * (r - 1)) * 4 / tau
        low = high = dual = torch.zeros_like(valid)
    else:
        r1 = r if o.delta is None else torch.clamp(r, max=o.delta)
        loss_t = -torch.min(r1 * a, torch.clamp(r, 1 - o.epsilon_low, 1 + o.epsilon_high) * a)
        low = (r < 1 - o.epsilon_low) & (a < 0)
        high = (r > 1 + o.epsilon_high) & (a > 0)
        dual = torch.zeros_like(valid)
        if o.clip_ratio_c is not None:
            cap = -a * o.clip_ratio_c
            dual = (a < 0) & (loss_t > cap)
            loss_t = torch.where(a < 0, torch.min(loss_t, cap), loss_t)

    tis = mis = torch.zeros_like(valid)
    if o.rollout_correction is not None:
        rho_log = torch.where(valid, old - rollout_logp.to(dtype), zero)
        if o.rollout_correction in ("seq_tis", "seq_mask"):
            rho_log = _seq_sum(rho_log, seq_index, num_sequences)
        rho = torch.exp(rho_log)
        if o.rollout_correction.endswith("tis"):
            factor = torch.clamp(rho, max=o.rollout_cap)
            tis = rho > o.rollout_cap
        else:
            lo, hi = (
                (o.icepop_low, o.icepop_high)
                if o.rollout_correction == "icepop"
                else (1 / o.rollout_cap, o.rollout_cap)
            )
            mis = (rho < lo) | (rho > hi)
            factor = (~mis).to(dtype)
        loss_t = loss_t * factor.detach()

    metrics: dict[str, torch.Tensor] = {}
    if o.beta > 0:
        d = torch.where(valid, ref_logp.to(dtype) - logp, zero)  # log(ref / pi)
        kl = {"k1": -d, "k2": d.square() / 2, "k3": torch.exp(d) - d - 1}[o.kl]
        metrics["kl_mean"] = masked_mean(kl, valid).detach()
        loss_t = loss_t + o.beta * (kl * r if o.kl_bias_correction else kl)

    agg = o.resolved_aggregation
    aggregate = lambda x: aggregate_reference(x, valid, seq_index, num_sequences, agg, o.max_completion_length)
    loss = aggregate(loss_t)
    if o.entropy_coef > 0:
        loss = loss - o.entropy_coef * aggregate(entropy)
    rd = r.detach()
    mean = lambda flag: masked_mean(flag.to(dtype), valid)
    metrics |= {
        "clip_frac_low": mean(low), "clip_frac_high": mean(high), "dual_clip_frac": mean(dual),
        "ratio_mean": masked_mean(rd, valid), "ratio_max": torch.where(valid, rd, zero.detach()).max(),
        "entropy_mean": masked_mean(entropy.detach(), valid), "tis_frac": mean(tis), "mis_frac": mean(mis),
        "mgpo_weights": mgpo_weights.detach(), "advantages": adv.detach(),
    }  # fmt: skip
    return PolicyLossOutput(loss=loss, metrics=metrics)

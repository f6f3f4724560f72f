"""fp32 references for the MGPO loss (DESIGN.md section 2): obviously right, slow, [N, V] logits in memory.

Everything is computed in fp32, or in fp64 when the inputs are fp64 (tests use that for finite differences).
Groups and sequences are numbered densely: `group_index` [S] holds ids in [0, num_groups) with
num_groups = group_index.max() + 1, and `seq_index` [N] holds ids in [0, S) with S = group_index.numel().
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from vibeperf.kernels.linear_logprob.reference import linear_logprob_reference

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-sum-norm")
ADVANTAGE_SCALES = ("group", "none")
STD_EPS = 1e-6


class MGPOOutput(NamedTuple):
    """`loss`: scalar, differentiable w.r.t. hidden and weight; `metrics`: name -> detached tensor (no host sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _float_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _num_groups(group_index: torch.Tensor) -> int:
    return int(group_index.max()) + 1 if group_index.numel() else 0


def _group_sum(values: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """values: [S] -> per-group sums [num_groups]."""
    return values.new_zeros(num_groups).index_add(0, group_index, values)


def group_advantages_reference(
    rewards: torch.Tensor, group_index: torch.Tensor, *, scale: str = "group"
) -> torch.Tensor:
    """GRPO advantages A [S]: A_i = (r_i - mean_G r) / (std_G r + 1e-6).

    rewards: [S]; group_index: [S] int64 group id of each sequence. std_G is the unbiased sample standard deviation
    (torch.std's default). scale="none" returns r_i - mean_G r. Groups of one sample, or whose rewards are all equal,
    get exactly 0 (the check is on the rewards themselves, not on a rounded mean).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    r = rewards.to(_float_dtype(rewards))
    num_groups = _num_groups(group_index)
    count = _group_sum(torch.ones_like(r), group_index, num_groups)  # [num_groups]
    mean = _group_sum(r, group_index, num_groups) / count.clamp_min(1)
    centred = r - mean[group_index]  # [S]
    var = _group_sum(centred.square(), group_index, num_groups) / (count - 1).clamp_min(1)
    r_max = r.new_full((num_groups,), -torch.inf).scatter_reduce(0, group_index, r, "amax")
    r_min = r.new_full((num_groups,), torch.inf).scatter_reduce(0, group_index, r, "amin")
    degenerate = (count < 2) | (r_max == r_min)  # [num_groups]
    adv = centred if scale == "none" else centred / (var.sqrt()[group_index] + STD_EPS)
    return torch.where(degenerate[group_index], torch.zeros_like(adv), adv)


def group_success_rate_reference(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """p_c [num_groups]: the fraction of a group's rewards that are exactly 1 (an id with no member gets 0)."""
    correct = (rewards == 1).to(_float_dtype(rewards))
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
    values: torch.Tensor, valid: torch.Tensor, seq_index: torch.Tensor, num_sequences: int, aggregation: str
) -> torch.Tensor:
    """Reduce per-token values [N] over the `valid` [N] tokens to a scalar.

    - "seq-mean-token-mean": mean over each sequence's valid tokens, then mean over the sequences that have at least
      one valid token.
    - "token-mean": mean over all valid tokens.
    - "seq-sum-norm" (Dr.GRPO): sum over all valid tokens / (num_sequences * max_len), where num_sequences counts
      every sequence of the batch (G groups' completions together) and max_len is the largest number of valid tokens
      in one sequence; it is the batch's own longest response, not the generation budget.
    With no valid token at all the result is 0.
    """
    values = torch.where(valid, values, torch.zeros_like(values))
    if aggregation == "token-mean":
        return values.sum() / valid.sum().clamp_min(1)
    seq_sum = values.new_zeros(num_sequences).index_add(0, seq_index, values)  # [S]
    seq_len = values.new_zeros(num_sequences).index_add(0, seq_index, valid.to(values.dtype))  # [S]
    if aggregation == "seq-mean-token-mean":
        has_tokens = seq_len > 0
        seq_mean = torch.where(has_tokens, seq_sum / seq_len.clamp_min(1), torch.zeros_like(seq_sum))
        return seq_mean.sum() / has_tokens.sum().clamp_min(1)
    if aggregation == "seq-sum-norm":
        return values.sum() / (num_sequences * seq_len.max().clamp_min(1))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp_min(1)


def mgpo_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor,
    group_index: torch.Tensor,
    old_logp: torch.Tensor,
    rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    mgpo_lambda: float = 0.0,
    scale: str = "group",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    tis_cap: float = 2.0,
    beta: float = 0.0,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> MGPOOutput:
    """MGPO clipped policy-gradient loss on packed tokens.

    hidden: [N, H]; weight: [V, H]; bias: [V] or None; targets: [N] (ignore_index rows carry nothing);
    seq_index: [N] sequence id of each token, in [0, S); group_index: [S] group id of each sequence;
    rewards: [S] or advantages: [S], exactly one; old_logp, rollout_logp, ref_logp: [N]; loss_mask: [N] bool or None.

    A' = w_ME(group) * A_i from `rewards` (`mgpo_weight_reference`, `group_advantages_reference`), or `advantages`
    as given. Per valid token (target != ignore_index and loss_mask):
        ratio = exp(logp - old_logp)
        pg = min(ratio * A', clip(ratio, 1 - eps_low, 1 + eps_high) * A') * is_w
        is_w = detached min(exp(old_logp - rollout_logp), tis_cap) when rollout_logp is given, else 1
        objective = pg - beta * (exp(ref_logp - logp) - (ref_logp - logp) - 1)   (k3 KL, not IS-weighted)
    loss = -aggregate_reference(objective). Metrics are over valid tokens: clip_frac_low (ratio < 1 - eps_low and
    A' < 0), clip_frac_high (ratio > 1 + eps_high and A' > 0), entropy_mean, ratio_mean, ratio_max, tis_frac (IS weight
    capped; 0 without rollout_logp), kl_mean (only when beta > 0), mgpo_weights [num_groups] (1 when advantages are
    given), advantages [S] (the A' used).
    """
    if (rewards is None) == (advantages is None):
        raise ValueError("give exactly one of rewards and advantages")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    dtype = _float_dtype(hidden)
    num_sequences = group_index.numel()
    num_groups = _num_groups(group_index)

    if rewards is not None:
        rewards = rewards.to(dtype)
        mgpo_weights = mgpo_weight_reference(rewards, group_index, mgpo_lambda=mgpo_lambda)
        adv = mgpo_weights[group_index] * group_advantages_reference(rewards, group_index, scale=scale)
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
    # Invalid rows may hold garbage old/rollout/ref log-probs; zeroing the differences keeps exp() finite there.
    ratio = torch.exp(torch.where(valid, logp - old_logp.to(dtype), zero))  # [N]
    adv_tok = adv[seq_index]  # [N]
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    objective = torch.minimum(ratio * adv_tok, clipped * adv_tok)

    metrics: dict[str, torch.Tensor] = {}
    if rollout_logp is not None:
        is_raw = torch.exp(torch.where(valid, old_logp.to(dtype) - rollout_logp.to(dtype), zero))
        objective = objective * is_raw.clamp(max=tis_cap).detach()
        metrics["tis_frac"] = _masked_mean((is_raw > tis_cap).to(dtype), valid)
    else:
        metrics["tis_frac"] = zero.new_zeros(())
    if beta > 0:
        delta = torch.where(valid, ref_logp.to(dtype) - logp, zero)
        kl = torch.exp(delta) - delta - 1
        objective = objective - beta * kl
        metrics["kl_mean"] = _masked_mean(kl, valid).detach()

    loss = -aggregate_reference(objective, valid, seq_index, num_sequences, aggregation)
    ratio_d = ratio.detach()
    metrics["clip_frac_low"] = _masked_mean(((ratio_d < 1 - eps_low) & (adv_tok < 0)).to(dtype), valid)
    metrics["clip_frac_high"] = _masked_mean(((ratio_d > 1 + eps_high) & (adv_tok > 0)).to(dtype), valid)
    metrics["entropy_mean"] = _masked_mean(entropy.detach(), valid)
    metrics["ratio_mean"] = _masked_mean(ratio_d, valid)
    metrics["ratio_max"] = torch.where(valid, ratio_d, zero.detach()).max() if valid.numel() else zero.new_zeros(())
    metrics["mgpo_weights"] = mgpo_weights.detach()
    metrics["advantages"] = adv.detach()
    return MGPOOutput(loss=loss, metrics=metrics)

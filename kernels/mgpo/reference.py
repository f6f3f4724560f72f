"""fp32 reference for the MGPO loss (DESIGN.md section 2): obviously right, slow, [N, V] logits in memory.

The group statistics and aggregations are the policy family's (`policy/reference.py`, re-exported here); the MGPO
loss itself is written out on its own, a second oracle beside `policy_loss_reference`.

Everything is computed in fp32, or in fp64 when the inputs are fp64 (tests use that for finite differences).
Groups and sequences are numbered densely: `group_index` [S] holds ids in [0, num_groups) with
num_groups = group_index.max() + 1, and `seq_index` [N] holds ids in [0, S) with S = group_index.numel().
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from vibeperf.kernels.ce.reference import linear_logprob_reference
from vibeperf.kernels.policy.reference import (
    STD_EPS,
    aggregate_reference,
    float_dtype,
    group_advantages_reference,
    group_success_rate_reference,
    masked_mean,
    maxent_divergence_reference,
    mgpo_weight_reference,
)

__all__ = ["STD_EPS", "aggregate_reference", "group_advantages_reference", "group_success_rate_reference",
           "maxent_divergence_reference", "mgpo_weight_reference", "mgpo_loss_reference", "MGPOOutput"]  # fmt: skip

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-sum-norm")
ADVANTAGE_SCALES = ("group", "none")


class MGPOOutput(NamedTuple):
    """`loss`: scalar, differentiable w.r.t. hidden and weight; `metrics`: name -> detached tensor (no host sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


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
    dtype = float_dtype(hidden)
    num_sequences = group_index.numel()
    num_groups = int(group_index.max()) + 1

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
        metrics["tis_frac"] = masked_mean((is_raw > tis_cap).to(dtype), valid)
    else:
        metrics["tis_frac"] = zero.new_zeros(())
    if beta > 0:
        delta = torch.where(valid, ref_logp.to(dtype) - logp, zero)
        kl = torch.exp(delta) - delta - 1
        objective = objective - beta * kl
        metrics["kl_mean"] = masked_mean(kl, valid).detach()

    loss = -aggregate_reference(objective, valid, seq_index, num_sequences, aggregation)
    ratio_d = ratio.detach()
    metrics["clip_frac_low"] = masked_mean(((ratio_d < 1 - eps_low) & (adv_tok < 0)).to(dtype), valid)
    metrics["clip_frac_high"] = masked_mean(((ratio_d > 1 + eps_high) & (adv_tok > 0)).to(dtype), valid)
    metrics["entropy_mean"] = masked_mean(entropy.detach(), valid)
    metrics["ratio_mean"] = masked_mean(ratio_d, valid)
    metrics["ratio_max"] = torch.where(valid, ratio_d, zero.detach()).max() if valid.numel() else zero.new_zeros(())
    metrics["mgpo_weights"] = mgpo_weights.detach()
    metrics["advantages"] = adv.detach()
    return MGPOOutput(loss=loss, metrics=metrics)

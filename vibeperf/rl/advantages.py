"""Advantages of a step's completions, on the device and without a host sync.

- `long2short_shift`: the Long2Short length-aware reward shift of the correct completions of each group (the formula
  of `vibeperf.reference.long2short_shift`, which is its test oracle): s_i = 1 / L_i over the correct set C of a
  group, r'_i = r_i + lam * (s_i - mean_C s) / max_C |s_j - mean_C s|; a group with |C| < 2 or equal correct lengths
  is unchanged. Unlike the reference it takes `num_groups` and never reads a value back.
- `group_advantages`: A' = w_ME(p_c) * A per completion through the MGPO kernel's own group statistics
  (`vibeperf.kernels.policy.group_statistics`, what `policy_loss(rewards=..., group_index=...)` computes inside);
  with Long2Short, A comes from the shifted rewards while w_ME keeps the unshifted p_c (the share of reward-1
  completions). The trainer calls it once per step on the whole step's groups, then hands each packed row its
  sequences' A' (`mgpo_loss(advantages=...)`): a row may hold part of a group, so the group statistics cannot be
  taken row by row.
- `overlong_penalty`: DAPO's soft overlong punishment, a length-dependent reward term added to the rewards the
  advantages use (the MaxEnt weight and Long2Short's correct set still read the unshaped rewards).
"""

from __future__ import annotations

import torch

from vibeperf.kernels.policy import group_statistics


def long2short_shift(
    rewards: torch.Tensor, lengths: torch.Tensor, group_index: torch.Tensor, *, num_groups: int, lam: float
) -> torch.Tensor:
    """Shifted rewards r' [S] fp64 (see the module docstring). rewards: [S] (1 = correct); lengths: [S] completion
    tokens (> 0 where correct; not checked); group_index: [S] int64 in [0, num_groups)."""
    r = rewards.to(torch.float64)
    correct = r >= 1.0
    length = lengths.to(device=r.device, dtype=torch.float64)
    s = torch.where(correct, 1.0 / length.clamp_min(1), 0.0)  # [S]
    zeros = r.new_zeros(num_groups)
    n_c = zeros.index_add(0, group_index, correct.to(torch.float64))  # [G]
    s_bar = zeros.index_add(0, group_index, s) / n_c.clamp_min(1)
    dev = torch.where(correct, s - s_bar[group_index], 0.0)  # [S]
    max_dev = zeros.scatter_reduce(0, group_index, dev.abs(), "amax")
    inf = torch.full_like(zeros, torch.inf)
    len_max = (-inf).scatter_reduce(0, group_index, torch.where(correct, length, -torch.inf), "amax")
    len_min = inf.scatter_reduce(0, group_index, torch.where(correct, length, torch.inf), "amin")
    active = (n_c >= 2) & (len_max > len_min)  # [G]: decided on the integer lengths, not on rounded 1 / L
    return r + torch.where(correct & active[group_index], lam * dev / max_dev[group_index].clamp_min(1e-300), 0.0)


def overlong_penalty(lengths: torch.Tensor, *, max_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment [S] fp64 of completions of `lengths` [S] tokens with budget L = max_tokens and
    buffer B (0 < B <= L): 0 up to L - B tokens, then falling linearly to -factor at L: factor * ((L - B) - len) / B;
    -factor beyond L (a completion cut at the budget has len = L)."""
    length = lengths.to(torch.float64)
    soft = factor * ((max_tokens - buffer) - length) / buffer
    return torch.where(length <= max_tokens - buffer, 0.0, torch.where(length <= max_tokens, soft, -factor))


def group_advantages(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    group_index: torch.Tensor,
    *,
    num_groups: int,
    mgpo_lambda: float,
    scale: str,
    long2short_lambda: float | None,
    reward_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A' [S] fp32, w_ME [num_groups] fp32, the rewards the advantages use [S] fp64) of a step's completions.

    rewards: [S] in [0, 1] (1 = correct); lengths: [S] completion tokens; group_index: [S] int64; all on one device.
    Without Long2Short (`long2short_lambda` None) and reward_shift this is the kernel's `group_statistics(rewards)`.
    reward_shift: [S] added to the rewards the advantages use (`overlong_penalty`); w_ME keeps the unshifted p_c.
    """
    r = rewards.to(torch.float64)
    if reward_shift is not None:
        shaped = r + reward_shift.to(torch.float64)
        if long2short_lambda is not None:
            shaped = long2short_shift(r, lengths, group_index, num_groups=num_groups, lam=long2short_lambda) + (
                reward_shift.to(torch.float64)
            )
        adv, _ = group_statistics(shaped, group_index, num_groups=num_groups, mgpo_lambda=0.0, scale=scale)
        _, weights = group_statistics(r, group_index, num_groups=num_groups, mgpo_lambda=mgpo_lambda, scale=scale)
        return weights[group_index] * adv, weights, shaped
    if long2short_lambda is None:
        adv, weights = group_statistics(r, group_index, num_groups=num_groups, mgpo_lambda=mgpo_lambda, scale=scale)
        return adv, weights, r
    shifted = long2short_shift(r, lengths, group_index, num_groups=num_groups, lam=long2short_lambda)
    adv, _ = group_statistics(shifted, group_index, num_groups=num_groups, mgpo_lambda=0.0, scale=scale)
    _, weights = group_statistics(r, group_index, num_groups=num_groups, mgpo_lambda=mgpo_lambda, scale=scale)
    return weights[group_index] * adv, weights, shifted

"""Advantages and aggregation weights on the device, with fixed shapes and no host sync.

- `group_statistics`: A' [S] and the MGPO MaxEnt weights [G] from the rewards (estimators "group", "no_std", "rloo").
- `token_weights`: an aggregation as one weight per token [N], so that aggregate(x) = sum_t w_t x_t.
Every count and normaliser stays a device tensor; every shape comes from the inputs' shapes and `num_groups`.
The formulas are those of `reference.py` (`group_advantages_reference`, `mgpo_weight_reference`, `aggregate_reference`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import ADVANTAGES, AGGREGATIONS
from .reference import STD_EPS


def group_statistics(
    rewards: Tensor, group_index: Tensor, *, num_groups: int, mgpo_lambda: float, scale: str = "group"
) -> tuple[Tensor, Tensor]:
    """(A' [S], w_ME [num_groups]) in fp32.

    rewards: [S]; group_index: [S] int64 ids in [0, num_groups) (not checked: that would read them back); scale: the
    estimator, "group" | "no_std" (alias "none") | "rloo". A'_i = w_ME(g_i) * A_i; a group of one sample, or with
    equal rewards, has A = 0. An id that no sequence uses gets the weight of p_c = 0, as in the reference.
    """
    scale = "no_std" if scale == "none" else scale
    if scale not in ADVANTAGES:
        raise ValueError(f"advantage estimator must be one of {ADVANTAGES}, got {scale!r}")
    r = rewards.float()
    ones = torch.ones_like(r)
    sums = r.new_zeros(num_groups, 3).index_add_(0, group_index, torch.stack([ones, r, (r == 1).float()], 1))
    count, total, correct = sums.unbind(1)  # [G] each
    centred = r - (total / count.clamp_min(1))[group_index]  # [S]
    ext = r.new_full((num_groups, 2), -torch.inf).scatter_reduce_(
        0, group_index[:, None].expand(-1, 2), torch.stack([r, -r], 1), "amax"
    )  # [G, 2]: max r, -min r
    degenerate = (count < 2) | (ext[:, 0] == -ext[:, 1])
    if scale == "group":
        var = r.new_zeros(num_groups).index_add_(0, group_index, centred.square()) / (count - 1).clamp_min(1)
        adv = centred / (var.sqrt()[group_index] + STD_EPS)
    elif scale == "rloo":  # r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean)
        adv = centred * (count / (count - 1).clamp_min(1))[group_index]
    else:
        adv = centred
    adv = torch.where(degenerate[group_index], torch.zeros_like(adv), adv)
    p_c = correct / count.clamp_min(1)
    d_me = torch.xlogy(p_c, p_c / 0.5) + torch.xlogy(1 - p_c, (1 - p_c) / 0.5)
    weights = torch.exp(-mgpo_lambda * d_me)
    return weights[group_index] * adv, weights


def token_weights(
    valid: Tensor, seq_index: Tensor, num_sequences: int, aggregation: str, max_len: int | None = None
) -> Tensor:
    """The aggregation as a weight per token, w [N] fp32 (0 where not `valid`), so that aggregate(x) = sum_t w_t x_t.

    valid: [N] bool; seq_index: [N] ids in [0, num_sequences). "seq-mean-token-mean": 1 / (number of sequences with a
    valid token * valid tokens of the token's sequence); "token-mean" and "bnpo": 1 / (valid tokens); "seq-sum-norm":
    1 / (num_sequences * max_len), max_len the given length or the valid tokens of the longest sequence.
    """
    v = valid.float()
    if aggregation in ("token-mean", "bnpo"):
        return v / v.sum().clamp_min(1)
    seq_len = v.new_zeros(num_sequences).index_add_(0, seq_index, v)  # [S]
    if aggregation == "seq-mean-token-mean":
        return v / (seq_len[seq_index].clamp_min(1) * (seq_len > 0).sum().clamp_min(1))
    if aggregation == "seq-sum-norm":
        return v / (num_sequences * (seq_len.max().clamp_min(1) if max_len is None else max_len))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")

"""Plain references for the VibeThinker recipe formulas that are not kernels (the LM-head losses have theirs in
kernels/*/reference.py). They are test oracles: production code has its own functions, tested against these.

Long2Short reward shift, unbiased pass@k, learning potential and CLR aggregation. Each is written to be obviously
right; `clr_aggregate_reference` is a plain Python loop on purpose, the oracle for a vectorised aggregator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def long2short_shift(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    group_index: torch.Tensor,
    *,
    lam: float = 0.2,
    correct_threshold: float = 1.0,
) -> torch.Tensor:
    """Length-aware reward shift r' [S] of the 64K RL phase.

    rewards: [S]; lengths: [S] response lengths in tokens (> 0 where correct); group_index: [S] int64 group ids.
    Over the correct set C of each group (r_i >= correct_threshold): s_i = 1 / L_i, s_bar = mean_C s,
    r'_i = r_i + lam * (s_i - s_bar) / max_{j in C} |s_j - s_bar|, so the shifts of C sum to 0, shorter answers gain,
    longer ones lose, and the largest |shift| in C is exactly lam. Wrong answers are unchanged; a group with |C| < 2,
    or whose correct lengths are all equal, is unchanged (decided on the integer lengths, not on rounded 1 / L). The
    shift is computed in fp64 and returned in rewards' dtype (fp32 for non-float rewards).
    """
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    correct = rewards >= correct_threshold  # [S]
    if bool((correct & (lengths <= 0)).any()):
        raise ValueError("correct answers must have lengths > 0")
    lengths_c = lengths.to(torch.float64)
    s = torch.where(correct, 1.0 / lengths_c.clamp_min(1), torch.zeros_like(lengths_c))  # [S]
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    n_c = zeros.index_add(0, group_index, correct.to(torch.float64))  # [G]
    s_bar = zeros.index_add(0, group_index, s) / n_c.clamp_min(1)
    dev = torch.where(correct, s - s_bar[group_index], torch.zeros_like(s))  # [S]
    max_dev = zeros.scatter_reduce(0, group_index, dev.abs(), "amax")
    len_max = torch.full_like(zeros, -torch.inf).scatter_reduce(
        0, group_index, torch.where(correct, lengths_c, -torch.inf), "amax"
    )
    len_min = torch.full_like(zeros, torch.inf).scatter_reduce(
        0, group_index, torch.where(correct, lengths_c, torch.inf), "amin"
    )
    active = (n_c >= 2) & (len_max > len_min)  # [G]
    shift = torch.where(correct & active[group_index], lam * dev / max_dev[group_index].clamp_min(1e-300), 0.0)
    return (rewards.to(torch.float64) + shift).to(out_dtype)


def _pass_at_k_scalar(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return -math.expm1(math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1)))


def pass_at_k(
    n: int | Sequence[int] | np.ndarray, c: int | Sequence[int] | np.ndarray, k: int | Sequence[int] | np.ndarray
) -> float | np.ndarray:
    """Unbiased pass@k = 1 - C(n - c, k) / C(n, k) for n samples of which c are correct.

    Computed in the product form C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i), which never forms a
    binomial coefficient (the product is taken as exp of a sum of log1p terms, and 1 - it as -expm1, so small
    pass@k keep their digits); it is 1 when n - c < k. Python ints give a float; arrays or lists (broadcast together)
    give an np.ndarray of float64. Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    scalar = all(isinstance(x, (int, np.integer)) for x in (n, c, k))
    n_a, c_a, k_a = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (n, c, k)))
    if np.any(k_a > n_a):
        raise ValueError(f"pass@k needs k <= n, got k={k} for n={n}")
    if np.any(k_a < 1) or np.any(c_a < 0) or np.any(c_a > n_a):
        raise ValueError(f"pass@k needs k >= 1 and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if scalar:
        return _pass_at_k_scalar(int(n), int(c), int(k))
    sure = n_a - c_a < k_a  # some correct sample is in every k-subset
    j = np.arange(int(c_a.max(initial=0)))
    use = (j < c_a[..., None]) & ~sure[..., None]  # [..., max_c]: term j is (1 - k / (n - j)) for j < c
    i = np.where(use, n_a[..., None] - j, 1).astype(np.float64)
    log_miss = np.where(use, np.log1p(-np.where(use, k_a[..., None], 0) / i), 0.0).sum(-1)
    return np.where(sure, 1.0, -np.expm1(log_miss))


def learning_potential(
    token_logp: torch.Tensor,
    seq_index: torch.Tensor,
    *,
    num_sequences: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """S_LP [S] = -(mean of logp over each sequence's tokens), the length-normalised NLL.

    token_logp: [N] student log-probs of the response tokens; seq_index: [N] sequence id of each token in
    [0, num_sequences) (default max + 1); mask: [N] bool, tokens to count (e.g. targets != ignore_index), all by
    default. A sequence with no counted token gets 0. fp32 out (fp64 for fp64 input).
    """
    dtype = torch.float64 if token_logp.dtype == torch.float64 else torch.float32
    if num_sequences is None:
        num_sequences = int(seq_index.max()) + 1 if seq_index.numel() else 0
    keep = torch.ones_like(seq_index, dtype=torch.bool) if mask is None else mask
    logp = torch.where(keep, token_logp.to(dtype), torch.zeros((), dtype=dtype, device=token_logp.device))
    zeros = torch.zeros(num_sequences, dtype=dtype, device=token_logp.device)
    total = zeros.index_add(0, seq_index, logp)
    count = zeros.index_add(0, seq_index, keep.to(dtype))
    return -total / count.clamp_min(1)


def clr_reliability(verdicts: torch.Tensor) -> torch.Tensor:
    """Trajectory reliability r = ((1/M) sum_m v_m)^M; verdicts: [Q, K, M] or [K, M] in [0, 1] -> [Q, K] or [K]."""
    num_claims = verdicts.shape[-1]
    return verdicts.to(torch.float64 if verdicts.dtype == torch.float64 else torch.float32).mean(-1) ** num_claims


def clr_aggregate_reference(
    cluster_ids: torch.Tensor, verdicts: torch.Tensor
) -> tuple[torch.Tensor, list[dict[int, float]]]:
    """CLR answer selection as a plain Python loop (the oracle for the vectorised aggregator).

    cluster_ids: [Q, K] int64 >= 0, the answer cluster of each trajectory (equal ids = equivalent answers);
    verdicts: [Q, K, M] floats in [0, 1], the claim verdicts. r_k = ((1/M) sum_m v_km)^M and
    Score(G) = sum_{k in G} r_k, both in Python floats (fp64), summed in k order. The winner is the highest score
    (scores equal to 12 decimal places are tied, so summation order never decides);
    ties go to the larger cluster (more members), then to the cluster whose first member comes earliest in k order
    (never simply the smaller id). Returns the chosen cluster id per query [Q] (int64) and, per query, a dict
    cluster id -> score in first-seen order.
    """
    if cluster_ids.dim() != 2 or verdicts.dim() != 3 or verdicts.shape[:2] != cluster_ids.shape:
        raise ValueError(f"need cluster_ids [Q, K] and verdicts [Q, K, M], got {cluster_ids.shape}, {verdicts.shape}")
    if cluster_ids.shape[1] == 0 or verdicts.shape[2] == 0:
        raise ValueError("need at least one trajectory (K >= 1) and one claim (M >= 1)")
    if int(cluster_ids.min()) < 0:
        raise ValueError("cluster ids must be >= 0")
    chosen: list[int] = []
    all_scores: list[dict[int, float]] = []
    for ids, votes in zip(cluster_ids.tolist(), verdicts.tolist()):
        scores: dict[int, float] = {}
        sizes: dict[int, int] = {}
        first: dict[int, int] = {}
        for k, (cid, v) in enumerate(zip(ids, votes)):
            r = (sum(v) / len(v)) ** len(v)
            scores[cid] = scores.get(cid, 0.0) + r
            sizes[cid] = sizes.get(cid, 0) + 1
            first.setdefault(cid, k)
        best = max(scores, key=lambda g: (round(scores[g], 12), sizes[g], -first[g]))  # 12 decimals: a tie
        chosen.append(best)
        all_scores.append(scores)
    return torch.tensor(chosen, dtype=torch.int64), all_scores

"""The CLR aggregator, vectorised over queries (CPU or GPU, no host sync).

For each query, K trajectories each carry an answer cluster id and M claim verdicts v_{k,m} in [0, 1].
Trajectory reliability r_k = ((1/M) sum_m v_{k,m})^M; Score(G) = sum_{k in G} r_k; the highest-scoring cluster
wins; ties go to the larger cluster, then to the cluster whose first member comes first.
Scores equal to 12 decimal places count as tied, here and in `vibeperf.reference.clr_aggregate_reference`, so the
choice never depends on the order in which a GPU happened to add the r_k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

TIE_DECIMALS = 12


class CLRResult(NamedTuple):
    chosen: torch.Tensor  # [Q] int64: the winning cluster id
    scores: torch.Tensor  # [Q, C] fp64: Score of each cluster id (0 for ids no trajectory has)
    sizes: torch.Tensor  # [Q, C] int64: members of each cluster id
    reliability: torch.Tensor  # [Q, K] fp64: r_k


def clr_aggregate(cluster_ids: torch.Tensor, verdicts: torch.Tensor, num_clusters: int | None = None) -> CLRResult:
    """cluster_ids: [Q, K] int64 in [0, num_clusters) (default num_clusters = K, enough for K distinct answers);
    verdicts: [Q, K, M] in [0, 1] (binary, or probabilities of "true"). All outputs stay on the input device."""
    if cluster_ids.dim() != 2 or verdicts.dim() != 3 or verdicts.shape[:2] != cluster_ids.shape:
        raise ValueError(f"need cluster_ids [Q, K] and verdicts [Q, K, M], got {tuple(cluster_ids.shape)}, "
                         f"{tuple(verdicts.shape)}")  # fmt: skip
    q, k = cluster_ids.shape
    m = verdicts.shape[2]
    if k == 0 or m == 0:
        raise ValueError("need at least one trajectory (K >= 1) and one claim (M >= 1)")
    c = num_clusters or k
    ids = cluster_ids.to(torch.int64)
    reliability = verdicts.to(torch.float64).mean(-1).pow(m)  # [Q, K]
    scores = torch.zeros((q, c), dtype=torch.float64, device=ids.device).scatter_add_(1, ids, reliability)
    sizes = torch.zeros((q, c), dtype=torch.int64, device=ids.device).scatter_add_(1, ids, torch.ones_like(ids))
    order = torch.arange(k, device=ids.device).expand(q, k)
    first = torch.full((q, c), k, dtype=torch.int64, device=ids.device).scatter_reduce_(1, ids, order, "amin")
    present = sizes > 0
    rounded = torch.where(present, scores.round(decimals=TIE_DECIMALS), -torch.inf)  # [Q, C]
    tied = rounded == rounded.amax(1, keepdim=True)
    size_key = torch.where(tied, sizes, -1)
    tied &= size_key == size_key.amax(1, keepdim=True)
    chosen = torch.where(tied, first, k).argmin(1)  # the earliest first member among the remaining ties
    return CLRResult(chosen, scores, sizes, reliability)

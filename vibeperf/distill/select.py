"""Which scored trajectories offline distillation keeps, and their loss weights.

`select_traces(scores, lengths, cfg)`, for M verified trajectories with learning potential S_LP (`scores`, the
student's length-normalised NLL) and response lengths in tokens:
1. short: a trace shorter than `max(min_tokens, quantile(lengths, min_length_quantile))` is dropped (strictly
   shorter: quantile 0 drops nothing).
2. buckets: trace lengths are binned by the edges `length_buckets` ([0, e1), [e1, e2), ..., [e_last, inf)); the
   per-token NLL of a trace falls with its length, so scores are only compared inside a bucket.
3. in each bucket, over its traces that are not short: lo = quantile(S, low_quantile), hi = quantile(S,
   high_quantile) (numpy's linear interpolation); S < lo is dropped as "low" (little left to learn), S > hi as
   "outlier" (top outliers: garbled or off-distribution traces); the rest, the middle-to-high range, is kept.
4. weight of a kept trace = S / mean(S of the kept traces of its bucket): the normalised score, mean 1 per bucket (so
   the SFT loss keeps its scale) and larger for traces the student finds harder. A bucket whose kept scores are all 0
   gets weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vibeperf.distill.config import SelectionConfig

REASONS = ("kept", "short", "low", "outlier")


@dataclass
class TraceSelection:
    """Per trace: bucket index [M] int, kept [M] bool, reason [M] (one of REASONS), weight [M] (0 when dropped)."""

    bucket: np.ndarray
    kept: np.ndarray
    reason: list[str]
    weight: np.ndarray
    min_length: float
    """The length threshold that step 1 used."""

    def counts(self) -> dict[str, int]:
        return {r: sum(x == r for x in self.reason) for r in REASONS}


def bucket_names(edges: list[int]) -> list[str]:
    """Labels of the buckets of `edges`: "[0, e1)", ..., "[e_last, inf)"."""
    bounds = [0, *edges]
    return [f"[{a}, {b})" for a, b in zip(bounds, edges)] + [f"[{bounds[-1]}, inf)"]


def select_traces(scores, lengths, cfg: SelectionConfig) -> TraceSelection:
    """Keep / drop and weight each trace (see the module docstring). scores: [M] floats, lengths: [M] ints > 0."""
    scores = np.asarray(scores, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if scores.shape != lengths.shape or scores.ndim != 1:
        raise ValueError(f"scores and lengths must be [M] arrays of one length, got {scores.shape}, {lengths.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    m = len(scores)
    reason = np.full(m, "kept", dtype=object)
    weight = np.zeros(m)
    bucket = np.searchsorted(np.asarray(cfg.length_buckets, dtype=np.int64), lengths, side="right")
    if m == 0:
        return TraceSelection(bucket, np.zeros(0, dtype=bool), [], weight, float(cfg.min_tokens))
    min_length = max(float(cfg.min_tokens), float(np.quantile(lengths, cfg.min_length_quantile)))
    reason[lengths < min_length] = "short"
    for b in np.unique(bucket):
        idx = np.flatnonzero((bucket == b) & (reason == "kept"))
        if not len(idx):
            continue
        s = scores[idx]
        lo, hi = np.quantile(s, cfg.low_quantile), np.quantile(s, cfg.high_quantile)
        reason[idx[s < lo]] = "low"
        reason[idx[s > hi]] = "outlier"
        keep = idx[reason[idx] == "kept"]
        mean = scores[keep].mean() if len(keep) else 0.0
        weight[keep] = scores[keep] / mean if mean > 0 else 1.0
    kept = reason == "kept"
    return TraceSelection(bucket, kept, [str(r) for r in reason], weight, min_length)

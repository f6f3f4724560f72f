"""CLR (claim-level reliability) inference: vectorised aggregation of claim verdicts into an answer choice."""

from .aggregate import CLRResult, clr_aggregate

__all__ = ["CLRResult", "clr_aggregate"]

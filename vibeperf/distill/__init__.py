"""Offline self-distillation: rejection sampling with RL checkpoints, learning-potential scoring by the student
through the fused LM-head kernel, length-bucketed selection, and a weighted SFT dataset (see `vibeperf.distill.run`).

    from vibeperf.config import load_config
    from vibeperf.distill import DistillConfig, run_distill
    result = run_distill(load_config(DistillConfig, "recipes/distill_tiny.toml"))
"""

from vibeperf.distill.config import DistillConfig, ScoringConfig, SelectionConfig
from vibeperf.distill.run import DistillResult, NothingToDistill, rejection_sample, run_distill
from vibeperf.distill.select import TraceSelection, bucket_names, select_traces

__all__ = [
    "DistillConfig",
    "DistillResult",
    "NothingToDistill",
    "ScoringConfig",
    "SelectionConfig",
    "TraceSelection",
    "bucket_names",
    "rejection_sample",
    "run_distill",
    "select_traces",
]

"""Evaluation: unbiased pass@k per domain and subdomain (`vibeperf eval`), and Spectrum checkpoint selection and
merging (`vibeperf spectrum`). Sampling and verification are shared with offline distillation (`sampling`); the
engine, sampling and reward sections are `vibeperf.config`'s.

    from vibeperf.config import load_config
    from vibeperf.eval import EvalConfig, run_eval, format_table
    print(format_table(run_eval(load_config(EvalConfig, "recipes/eval_tiny.toml")).summaries))
"""

from vibeperf.eval.config import EvalConfig, SamplesConfig, SpectrumConfig
from vibeperf.eval.passk import EvalResult, GroupSummary, format_table, pass_at_k_curve, run_eval, summarize
from vibeperf.eval.sampling import CheckpointEngines, Graded, sample_and_grade
from vibeperf.eval.spectrum import find_checkpoints, merge_checkpoints, run_spectrum, select_checkpoints

__all__ = [
    "CheckpointEngines",
    "EvalConfig",
    "EvalResult",
    "Graded",
    "GroupSummary",
    "SamplesConfig",
    "SpectrumConfig",
    "find_checkpoints",
    "format_table",
    "merge_checkpoints",
    "pass_at_k_curve",
    "run_eval",
    "run_spectrum",
    "sample_and_grade",
    "select_checkpoints",
    "summarize",
]

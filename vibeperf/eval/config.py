"""Configuration of `vibeperf eval` and `vibeperf spectrum`.

The engine, sampling and reward sections are the shared ones (`vibeperf.config`); every field follows
`vibeperf.config`'s rules (a docstring per field, checks in `__post_init__`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vibeperf.config import DataFile, EngineConfig, RewardConfig, SamplingConfig, check


def eval_sampling() -> SamplingConfig:
    """Sampling defaults of eval, spectrum and distill: long completions, seed 0 (every problem gets seed + rank)."""
    return SamplingConfig(max_tokens=32768, seed=0)


@dataclass
class SamplesConfig:
    """Samples per problem, by the kind of its domain (vibeperf.rewards.domain_kind)."""

    math: int = 64
    """Samples per math / STEM problem (n of pass@k)."""
    code: int = 8
    """Samples per code problem."""

    def __post_init__(self):
        check(self.math >= 1, "math", f"must be >= 1, got {self.math}")
        check(self.code >= 1, "code", f"must be >= 1, got {self.code}")


@dataclass
class EvalConfig:
    """Pass@k evaluation of one checkpoint on verifiable problems (vibeperf.eval.passk)."""

    data: list[str | DataFile]
    """RL data files (JSONL, JSONL.gz or parquet; {"prompt", "domain", "answer" | "tests", optional "subdomain", "id"}
    rows, tests in any format of vibeperf.data.code_formats), read in order; an entry is a path or a table {path,
    fields, domain, prompt_template} mapping the file's own columns (vibeperf.config.DataFile)."""
    model: str = "tiny"
    """Hugging Face checkpoint directory; "tiny" is the locally built tiny Qwen2."""
    output_dir: str = "runs/eval"
    """Where results.jsonl, summary.json and pass_at_k.png go."""
    system_prompt: str = ""
    """System message put before every problem ("" for none)."""
    max_problems: int = 0
    """Evaluate only the first this many problems (0: all)."""
    save_completions: bool = False
    """Also write every completion's text and reward to results.jsonl."""
    plot: bool = True
    """Draw pass@k against k (pass_at_k.png)."""
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    """n per problem."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine."""
    sampling: SamplingConfig = field(default_factory=eval_sampling)
    """Sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verification."""

    def __post_init__(self):
        check(len(self.data) > 0, "data", "must list at least one JSONL file")
        check(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        check(self.max_problems >= 0, "max_problems", f"must be >= 0, got {self.max_problems}")


@dataclass
class SpectrumConfig:
    """Per-subdomain checkpoint selection by pass@k and merging (vibeperf.eval.spectrum)."""

    checkpoints: list[str]
    """Checkpoint directories, or directories holding checkpoints (each subdirectory with a config.json and
    safetensors, in natural name order: step_9 before step_10); all must share one architecture."""
    data: list[str | DataFile]
    """Probing sets: RL data files (as `EvalConfig.data`); problems are grouped by "subdomain" (their "domain" when they
    have none)."""
    output_dir: str = "runs/spectrum"
    """Where probe.jsonl, selection.json and the merged checkpoint (merged/) go."""
    k: int = 8
    """Select by pass@k at this k."""
    num_samples: int = 16
    """Samples per probing problem (n >= k)."""
    subdomains: list[str] = field(default_factory=list)
    """Subdomains to select for, in this order (empty: every subdomain of the data, sorted)."""
    weights: list[float] = field(default_factory=list)
    """Merge weight of each subdomain's checkpoint, in `subdomains` order, normalised to sum 1 (empty: 1/N each)."""
    merge_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the merged floating-point tensors (auto: each tensor's dtype in the first kept checkpoint)."""
    system_prompt: str = ""
    """System message put before every problem ("" for none)."""
    max_problems: int = 0
    """Probe only the first this many problems of the data (0: all)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine (one engine is reused across checkpoints: their weights are swapped in place)."""
    sampling: SamplingConfig = field(default_factory=eval_sampling)
    """Sampling (the same seeds for every checkpoint, so they are compared on common random numbers)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verification."""

    def __post_init__(self):
        check(len(self.checkpoints) > 0, "checkpoints", "must list at least one checkpoint or directory")
        check(len(self.data) > 0, "data", "must list at least one JSONL file")
        check(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        check(self.num_samples >= self.k, "num_samples", f"must be >= k={self.k}, got {self.num_samples}")
        check(len(set(self.subdomains)) == len(self.subdomains), "subdomains", "must not repeat a name")
        n_sub, n_w = len(self.subdomains), len(self.weights)
        check(not n_w or n_w == n_sub, "weights", f"needs one weight per entry of subdomains ({n_sub}), got {n_w}")
        check(all(w >= 0 for w in self.weights) and (not n_w or sum(self.weights) > 0), "weights",
              f"must be >= 0 with a positive sum, got {self.weights}")  # fmt: skip
        check(self.max_problems >= 0, "max_problems", f"must be >= 0, got {self.max_problems}")

"""Configuration of `vibeperf distill` (offline self-distillation); loaded like every recipe (`vibeperf.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vibeperf.config import (
    Attention,
    DataFile,
    EngineConfig,
    LossBackend,
    RewardConfig,
    SamplingConfig,
    check,
    check_device_name,
)
from vibeperf.eval.config import eval_sampling


@dataclass
class ScoringConfig:
    """How the student scores the kept trajectories (vibeperf.score.score_samples)."""

    token_budget: int = 65536
    """Tokens per packed row; a longer trajectory is scored alone in its own row (never truncated)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Student weights dtype (auto: bf16 on CUDA, fp32 on the CPU)."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    backend: LossBackend = "auto"
    """Backend of the fused LM-head scoring kernel (vibeperf.kernels.linear_logprob)."""
    attention: Attention = "auto"
    """Packed-row attention of the student (vibeperf.model.attention)."""

    def __post_init__(self):
        check(self.token_budget >= 2, "token_budget", f"must be >= 2, got {self.token_budget}")
        check_device_name(self.device)


@dataclass
class SelectionConfig:
    """Which scored trajectories are kept (vibeperf.distill.select.select_traces)."""

    length_buckets: list[int] = field(default_factory=lambda: [2048, 8192, 32768])
    """Bucket edges in response tokens, increasing: [0, e1), [e1, e2), ..., [e_last, inf). Scores are ranked within a
    bucket, since the per-token NLL of a trace falls with its length."""
    min_length_quantile: float = 0.05
    """Drop traces shorter than this quantile of all verified trace lengths (the extremely short ones)."""
    min_tokens: int = 0
    """Also drop traces with fewer response tokens than this."""
    low_quantile: float = 0.25
    """Within a bucket, drop traces whose S_LP is below this quantile (too easy for the student to learn from)."""
    high_quantile: float = 0.98
    """Within a bucket, drop traces whose S_LP is above this quantile (top outliers); keeps the middle-to-high range."""

    def __post_init__(self):
        edges = self.length_buckets
        check(all(e > 0 for e in edges) and all(a < b for a, b in zip(edges, edges[1:])), "length_buckets",
              f"must be positive and increasing, got {edges}")  # fmt: skip
        check(0 <= self.min_length_quantile < 1, "min_length_quantile",
              f"must be in [0, 1), got {self.min_length_quantile}")  # fmt: skip
        check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        lo, hi = self.low_quantile, self.high_quantile
        check(0 <= lo <= hi <= 1, "low_quantile", f"need 0 <= low_quantile <= high_quantile <= 1, got {lo}, {hi}")


@dataclass
class DistillConfig:
    """Offline self-distillation: rejection sampling, learning-potential scoring and selection (vibeperf.distill)."""

    data: list[str | DataFile]
    """RL data files of the prompts (as `EvalConfig.data`), read in order."""
    generators: list[str]
    """Checkpoints that sample the trajectories (the RL checkpoints): checkpoint directories, or directories of them
    (every checkpoint inside, in natural name order); "tiny" is the tiny local model."""
    student: str = ""
    """Checkpoint whose NLL scores the trajectories ("" = the last generator, e.g. the newest RL checkpoint)."""
    output_dir: str = "runs/distill"
    """Where candidates.jsonl, distilled.jsonl (the weighted SFT set) and summary.json go."""
    num_samples: int = 8
    """Samples per prompt and generator."""
    require_stop: bool = True
    """Keep only completions that ended with a stop token (never one cut at max_tokens)."""
    dedup: bool = True
    """Keep one copy of identical verified completions of a prompt."""
    system_prompt: str = ""
    """System message put before every prompt when sampling ("" for none); it is kept in the SFT records too."""
    max_problems: int = 0
    """Use only the first this many prompts (0: all)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine (reused across generators of one architecture)."""
    sampling: SamplingConfig = field(default_factory=eval_sampling)
    """Sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verification (a kept trajectory has reward 1)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Student scoring."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Bucketing, short-trace and outlier dropping."""

    def __post_init__(self):
        check(len(self.data) > 0, "data", "must list at least one JSONL file")
        check(len(self.generators) > 0, "generators", "must list at least one checkpoint")
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        check(self.max_problems >= 0, "max_problems", f"must be >= 0, got {self.max_problems}")

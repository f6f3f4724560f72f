"""FLOP accounting for MFU, and the peak it is divided by.

`step_flops(config, n_params, seq_lengths)`: model FLOPs of one training step (forward + backward, no recompute):
6 * P * T + 6 * n_layers * n_heads * head_dim * sum_d L_d^2, where P counts the parameters used in matmuls (all but
the input embedding; the LM head included; `matmul_params`), T = sum_d L_d the tokens, and the second term is causal
attention (QK^T and PV, 2 * L^2 * head_dim per head and layer forward, half of the full square, times 3 for backward).
A forward-only pass (scoring, old log-probs) is a third of it.
"""

from __future__ import annotations

import torch


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

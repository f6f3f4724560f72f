"""Token log-prob / NLL / entropy of an LM head on the engine of `lmhead/`: `linear_logprob`, `linear_cross_entropy`.

backend="auto": on CUDA tensors "triton" or "cuda" (the vibeperf._C path: cuBLASLt GEMMs and a CUDA row kernel,
`lmhead/cuda_backend.py`) by the measured table of `lmhead/autoselect.py` (Triton wherever the table has no entry
or the extension has no CUDA part); on the CPU "torch" (chunked plain PyTorch), or "triton" when
TRITON_INTERPRET=1 (the test set-up). An explicit "cuda" needs the extension built with CUDA and CUDA tensors.
schedule (the no-grad forward of "triton") and workspace_bytes (the logits workspace budget): `lmhead/settings.py`;
None takes the environment's default at the call.
"""

from __future__ import annotations

import torch

from ..lmhead import autoselect, check_head_inputs, prepare_head_inputs, resolve_backend, settings
from . import ops
from .reference import linear_cross_entropy_reference, linear_logprob_reference

__all__ = ["linear_logprob", "linear_cross_entropy", "linear_logprob_reference", "linear_cross_entropy_reference"]


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    schedule: str | None = None,
    workspace_bytes: int | None = None,
):
    """log softmax((hidden @ weight.T + bias) / temperature)[targets], never materialising the logits.

    hidden: [N, H], weight: [V, H] (bf16, fp16 or fp32, same dtype), targets: [N] (ignore_index rows give 0 and
    no gradient), bias: [V] or None. Returns logp [N] fp32, and entropy [N] fp32 when return_entropy; both are
    differentiable w.r.t. hidden, weight and bias. schedule, workspace_bytes: see the module docstring.
    """
    check_head_inputs(hidden, weight, targets, bias, temperature)
    schedule, workspace_bytes = settings.forward_schedule(schedule), settings.check_workspace(workspace_bytes)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    backend = resolve_backend(
        backend, hidden.device, auto=lambda: autoselect.auto_backend("train" if grad else "forward", hidden, weight)
    )
    hidden, weight, targets, bias = prepare_head_inputs(hidden, weight, targets, bias)
    logp, _, ent = ops.linear_logprob_op(hidden, weight, targets, bias, float(temperature), int(ignore_index),
                                         bool(return_entropy), backend, schedule, workspace_bytes)  # fmt: skip
    return (logp, ent) if return_entropy else logp


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    token_weight: torch.Tensor | None = None,
    backend: str = "auto",
    schedule: str | None = None,
    workspace_bytes: int | None = None,
):
    """Cross-entropy of an LM head without logits in memory.

    reduction "mean" (over non-ignored rows; 0 when there are none) or "sum": the gradients are computed in the
    forward pass (three GEMM-sized passes) and scaled by the incoming gradient in backward. "none": per-token NLL
    [N] through `linear_logprob` (recompute backward). token_weight: optional [N] per-token loss weights
    (e.g. distillation weights); "mean" then divides the weighted sum by the number of non-ignored rows.
    schedule, workspace_bytes: see the module docstring.
    """
    if reduction == "none":
        nll = -linear_logprob(hidden, weight, targets, temperature=temperature, bias=bias,
                              ignore_index=ignore_index, backend=backend, schedule=schedule,
                              workspace_bytes=workspace_bytes)  # fmt: skip
        return nll if token_weight is None else nll * token_weight
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    check_head_inputs(hidden, weight, targets, bias, temperature)
    schedule, workspace_bytes = settings.forward_schedule(schedule), settings.check_workspace(workspace_bytes)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    work = "train" if (need_dh or need_dw) else "forward"
    backend = resolve_backend(backend, hidden.device, auto=lambda: autoselect.auto_backend(work, hidden, weight))
    hidden, weight, targets, bias = prepare_head_inputs(hidden, weight, targets, bias)
    n = hidden.shape[0]
    w = torch.ones(n, device=hidden.device, dtype=torch.float32)
    if token_weight is not None:
        if token_weight.shape != (n,):
            raise ValueError(f"token_weight must be [N={n}], got shape {tuple(token_weight.shape)}")
        w = token_weight.to(torch.float32).contiguous()
    if reduction == "mean":
        w = w / (targets != ignore_index).sum().clamp_min(1)  # stays on the device: no host sync
    if not (need_dh or need_dw):
        logp, _, _ = ops.linear_logprob_op(hidden, weight, targets, bias, float(temperature), int(ignore_index), False,
                                           backend, schedule, workspace_bytes)  # fmt: skip
        return -(w * logp).sum()
    loss, *_ = ops.linear_nll_fused_op(hidden, weight, targets, bias, w, float(temperature), int(ignore_index), need_dh,
                                       need_dw, backend, workspace_bytes)  # fmt: skip
    return loss

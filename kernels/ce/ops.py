"""torch custom ops (fake + autograd registered) for the LM-head scoring and NLL ops.

- vibeperf::linear_logprob: forward of logp (and entropy) without logits in memory; its backward is the
  recompute op vibeperf::linear_logprob_bwd (arbitrary upstream gradients of logp and entropy).
- vibeperf::linear_nll_fused: sum_t w_t * nll_t whose gradients are computed in the forward (three GEMM-sized
  passes); the backward only scales them by the incoming scalar gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import lmhead
from ..lmhead import triton_rows, upstream


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors, never None, and no two returns may alias: an unneeded output is a fresh [0]."""
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op("vibeperf::linear_logprob", mutates_args=())
def linear_logprob_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    temperature: float,
    ignore_index: int,
    want_entropy: bool,
    backend: str,
    schedule: str,
    workspace_bytes: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (logp [N], lse [N], entropy [N], or [0] when not wanted), fp32."""
    return lmhead.scores(hidden, weight, targets, bias, temperature, ignore_index, want_entropy, backend, schedule,
                         workspace_bytes)  # fmt: skip


@linear_logprob_op.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, want_entropy, backend, schedule, workspace_bytes):
    n = hidden.shape[0]
    out = hidden.new_empty(n, dtype=torch.float32)
    return out, torch.empty_like(out), hidden.new_empty(n if want_entropy else 0, dtype=torch.float32)


@torch.library.custom_op("vibeperf::linear_logprob_bwd", mutates_args=())
def linear_logprob_bwd_op(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    temperature: float,
    ignore_index: int,
    need_dh: bool,
    need_dw: bool,
    backend: str,
    workspace_bytes: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute backward. Returns (dh [N, H], dW [V, H], db [V]); an unneeded one is an empty [0] tensor."""
    _, _, _, dh, dw, db = lmhead.chunked_engine(backend, workspace_bytes)(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
        loss=triton_rows.LOSS_GIVEN, g_logp=grad_logp.float().contiguous(),
        g_ent=None if grad_entropy is None else grad_entropy.float().contiguous(), need_dh=need_dh, need_dw=need_dw,
    )  # fmt: skip
    return _or_empty(dh, hidden), _or_empty(dw, hidden), _or_empty(db, hidden)


@linear_logprob_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, bias, temperature, ignore_index, need_dh, need_dw, backend,
      workspace_bytes):  # fmt: skip
    return (
        torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
        torch.empty_like(weight) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if (need_dw and bias is not None) else hidden.new_empty(0),
    )


def _logprob_setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, want_entropy, backend, _, workspace_bytes = inputs
    ctx.save_for_backward(hidden, weight, targets, bias)
    ctx.args = (temperature, ignore_index, backend, workspace_bytes)
    ctx.want_entropy = want_entropy
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros, no entropy-gradient term


def _logprob_backward(ctx, grad_logp, _grad_lse, grad_entropy):  # lse is internal, never differentiated
    hidden, weight, targets, bias = ctx.saved_tensors
    temperature, ignore_index, backend, workspace_bytes = ctx.args
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
    if grad_entropy is None and grad_logp is None:
        return (None,) * 10
    if grad_logp is None:
        grad_logp = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    dh, dw, db = linear_logprob_bwd_op(
        grad_logp, grad_entropy if ctx.want_entropy else None, hidden, weight, targets, bias,
        temperature, ignore_index, need_dh, need_dw, backend, workspace_bytes,
    )  # fmt: skip
    return (dh if need_dh else None, dw if need_dw else None, None,
            db if (need_dw and bias is not None) else None) + (None,) * 6  # fmt: skip


linear_logprob_op.register_autograd(_logprob_backward, setup_context=_logprob_setup_context)


@torch.library.custom_op("vibeperf::linear_nll_fused", mutates_args=())
def linear_nll_fused_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    token_weight: Tensor,
    temperature: float,
    ignore_index: int,
    need_dh: bool,
    need_dw: bool,
    backend: str,
    workspace_bytes: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """loss = sum_t token_weight_t * nll_t and its gradients, in one sweep. Returns (loss [], dh, dW, db)."""
    logp, _, _, dh, dw, db = lmhead.chunked_engine(backend, workspace_bytes)(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
        loss=triton_rows.LOSS_NLL, g_logp=token_weight, need_dh=need_dh, need_dw=need_dw,
    )  # fmt: skip
    loss = -(token_weight * logp).sum()
    return loss, _or_empty(dh, hidden), _or_empty(dw, hidden), _or_empty(db, hidden)


@linear_nll_fused_op.register_fake
def _(hidden, weight, targets, bias, token_weight, temperature, ignore_index, need_dh, need_dw, backend,
      workspace_bytes):  # fmt: skip
    return (
        hidden.new_empty((), dtype=torch.float32),
        torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
        torch.empty_like(weight) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if (need_dw and bias is not None) else hidden.new_empty(0),
    )


def _nll_setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[3] is not None
    _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.set_materialize_grads(False)  # no zero gradients made for the gradient outputs (an [N, H] and a [V, H] fill)


def _nll_backward(ctx, grad_loss, _gdh, _gdw, _gdb):
    if grad_loss is None:
        return (None,) * 11
    dh, dw, db = (upstream.scale_by_upstream(t, grad_loss) for t in ctx.saved_tensors)
    return (dh, dw, None, db if ctx.has_bias else None) + (None,) * 7


linear_nll_fused_op.register_autograd(_nll_backward, setup_context=_nll_setup_context)

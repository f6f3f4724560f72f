"""MGPO loss pieces on the device: group statistics, the aggregation's token weights, and the fused custom op.

- `group_statistics`: A' [S] and the MaxEnt weights [G] from the rewards, vectorised with fixed shapes.
- `token_weights`: the aggregation as one weight per token [N], so that loss = -sum_t w_t * objective_t.
- `mgpo_loss_fwd`: host launcher, the chunked LM-head engine with the MGPO closed form in its row epilogue.
- vibeperf::mgpo_loss_fused: the custom op around it; the gradients are computed in the forward (three GEMM-sized
  passes) and the backward only scales them in place by the incoming scalar gradient.
None of it reads a value back to the host: every count and normaliser stays a device tensor, and every shape comes
from the inputs' shapes and the caller's `num_groups`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linear_logprob import ops as lp_ops
from ..linear_logprob import triton_rows
from .reference import AGGREGATIONS, STD_EPS

MGPO_OUTPUTS = triton_rows.MGPO_OUTPUTS


def group_statistics(
    rewards: Tensor, group_index: Tensor, *, num_groups: int, mgpo_lambda: float, scale: str = "group"
) -> tuple[Tensor, Tensor]:
    """(A' [S], w_ME [num_groups]) in fp32, the formulas of `reference.mgpo_weight_reference` and
    `reference.group_advantages_reference` without a host sync.

    rewards: [S]; group_index: [S] int64 ids in [0, num_groups) (not checked: that would read them back).
    A'_i = w_ME(g_i) * A_i; a group of one sample, or with equal rewards, has A = 0. An id that no sequence uses
    gets the weight of p_c = 0, as in the reference.
    """
    r = rewards.float()
    ones = torch.ones_like(r)
    sums = r.new_zeros(num_groups, 3).index_add_(0, group_index, torch.stack([ones, r, (r == 1).float()], 1))
    count, total, correct = sums.unbind(1)  # [G] each
    centred = r - (total / count.clamp_min(1))[group_index]  # [S]
    var = r.new_zeros(num_groups).index_add_(0, group_index, centred.square()) / (count - 1).clamp_min(1)
    ext = r.new_full((num_groups, 2), -torch.inf).scatter_reduce_(
        0, group_index[:, None].expand(-1, 2), torch.stack([r, -r], 1), "amax"
    )  # [G, 2]: max r, -min r
    degenerate = (count < 2) | (ext[:, 0] == -ext[:, 1])
    adv = centred if scale == "none" else centred / (var.sqrt()[group_index] + STD_EPS)
    adv = torch.where(degenerate[group_index], torch.zeros_like(adv), adv)
    p_c = correct / count.clamp_min(1)
    d_me = torch.xlogy(p_c, p_c / 0.5) + torch.xlogy(1 - p_c, (1 - p_c) / 0.5)
    weights = torch.exp(-mgpo_lambda * d_me)
    return weights[group_index] * adv, weights


def token_weights(valid: Tensor, seq_index: Tensor, num_sequences: int, aggregation: str) -> Tensor:
    """The aggregation as a weight per token, w [N] fp32 (0 where not `valid`), so that loss = -sum_t w_t obj_t.

    valid: [N] bool; seq_index: [N] ids in [0, num_sequences). As `reference.aggregate_reference` defines them:
    "seq-mean-token-mean" 1 / (number of sequences with a valid token * valid tokens of the token's sequence);
    "token-mean" 1 / (valid tokens); "seq-sum-norm" 1 / (num_sequences * valid tokens of the longest sequence).
    """
    v = valid.float()
    if aggregation == "token-mean":
        return v / v.sum().clamp_min(1)
    seq_len = v.new_zeros(num_sequences).index_add_(0, seq_index, v)  # [S]
    if aggregation == "seq-mean-token-mean":
        return v / (seq_len[seq_index].clamp_min(1) * (seq_len > 0).sum().clamp_min(1))
    if aggregation == "seq-sum-norm":
        return v / (num_sequences * seq_len.max().clamp_min(1))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def mgpo_loss_fwd(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    token_adv: Tensor,
    old_logp: Tensor,
    rollout_logp: Tensor | None,
    ref_logp: Tensor | None,
    token_weight: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    tis_cap: float,
    beta: float,
    temperature: float,
    ignore_index: int,
    need_dh: bool,
    need_dw: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Host launcher. hidden: [N, H], weight: [V, H], targets: [N] int64 (ignore_index: not in the loss),
    token_adv / old_logp / token_weight: [N] fp32, rollout_logp / ref_logp: [N] fp32 or None (ref_logp only when the
    KL term is on). Returns (loss [], terms [N, len(MGPO_OUTPUTS)], entropy [N], dh, dW, db); see MGPOTokens.
    """
    terms = torch.empty((hidden.shape[0], len(MGPO_OUTPUTS)), device=hidden.device, dtype=torch.float32)
    mgpo = triton_rows.MGPOTokens(
        adv=token_adv, old_logp=old_logp, rollout_logp=rollout_logp, ref_logp=ref_logp, out=terms,
        clip_low=1.0 - eps_low, clip_high=1.0 + eps_high, tis_cap=tis_cap, beta=beta,
    )  # fmt: skip
    _, entropy, _, dh, dw, db = lp_ops.chunked_engine(backend)(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
        loss=triton_rows.LOSS_MGPO, g_logp=token_weight, want_entropy=True, need_dh=need_dh, need_dw=need_dw,
        mgpo=mgpo,
    )  # fmt: skip
    loss = -(token_weight * terms[:, 0]).sum()
    return loss, terms, entropy, dh, dw, db


@torch.library.custom_op("vibeperf::mgpo_loss_fused", mutates_args=())
def mgpo_loss_fused_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    token_adv: Tensor,
    old_logp: Tensor,
    rollout_logp: Tensor | None,
    ref_logp: Tensor | None,
    token_weight: Tensor,
    eps_low: float,
    eps_high: float,
    tis_cap: float,
    beta: float,
    temperature: float,
    ignore_index: int,
    need_dh: bool,
    need_dw: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`mgpo_loss_fwd` as an op: (loss [], terms [N, 6], entropy [N], dh, dW, db); an unneeded gradient is [0]."""
    loss, terms, entropy, dh, dw, db = mgpo_loss_fwd(
        hidden, weight, targets, bias, token_adv, old_logp, rollout_logp, ref_logp, token_weight,
        eps_low=eps_low, eps_high=eps_high, tis_cap=tis_cap, beta=beta, temperature=temperature,
        ignore_index=ignore_index, need_dh=need_dh, need_dw=need_dw, backend=backend,
    )  # fmt: skip
    given = lambda t: t if t is not None else hidden.new_empty(0)  # outputs may not alias: one empty each
    return loss, terms, entropy, given(dh), given(dw), given(db)


@mgpo_loss_fused_op.register_fake
def _(hidden, weight, targets, bias, token_adv, old_logp, rollout_logp, ref_logp, token_weight, eps_low, eps_high,
      tis_cap, beta, temperature, ignore_index, need_dh, need_dw, backend):  # fmt: skip
    n = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty((n, len(MGPO_OUTPUTS)), dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.float32),
        torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
        torch.empty_like(weight) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if (need_dw and bias is not None) else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[3] is not None
    _, _, _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)


def _backward(ctx, grad_loss, _g_terms, _g_entropy, _g_dh, _g_dw, _g_db):
    dh, dw, db = ctx.saved_tensors

    def scale(t):
        if not t.numel():
            return None
        if torch.compiler.is_compiling() or type(t) is not torch.Tensor:  # traced (or subclass): stay functional
            return t * grad_loss.to(t.dtype)
        # Eager: the saved gradients belong to this node alone, so scale them in place instead of holding a second
        # copy (a second backward through the same graph is refused by autograd's version check). Detached: they
        # are also this node's outputs, and a gradient must not carry its grad_fn (torch.autograd.grad keeps it).
        return t.detach().mul_(grad_loss.to(t.dtype))

    return (scale(dh), scale(dw), None, scale(db) if ctx.has_bias else None) + (None,) * 14


mgpo_loss_fused_op.register_autograd(_backward, setup_context=_setup_context)

"""MGPO (MaxEnt-Guided Policy Optimization) clipped policy loss on packed tokens, fused into the LM head: `mgpo_loss`.

The per-token gradient dLoss/dlogp is a closed form formed right after the log-sum-exp in the row epilogue of the
chunked LM-head engine, so loss, metrics and the gradients of hidden / weight (/ bias) cost three GEMM-sized passes
and never hold [N, V] logits. backend="auto" picks "triton" or "cuda" (vibeperf._C: cuBLASLt GEMMs and the same
closed form in its CUDA row kernel) for CUDA tensors by the measured table of `linear_logprob.autoselect`, and on the
CPU "torch" (the same engine with a plain-torch row epilogue), or "triton" when TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from ..linear_logprob import _prepare, autoselect, check_head_inputs, resolve_backend
from . import ops
from .reference import ADVANTAGE_SCALES, AGGREGATIONS, MGPOOutput, mgpo_loss_reference

__all__ = ["mgpo_loss", "mgpo_loss_reference", "MGPOOutput"]


def _check_inputs(n, seq_index, group_index, rewards, advantages, old_logp, rollout_logp, ref_logp, loss_mask,
                  *, mgpo_lambda, scale, eps_low, eps_high, aggregation, tis_cap, beta, num_groups):  # fmt: skip
    """Shapes, dtypes and option values; raises ValueError naming the argument. Never reads a tensor's values."""
    if seq_index.shape != (n,) or seq_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seq_index must be an integer [N={n}] tensor, got {seq_index.dtype} {tuple(seq_index.shape)}")
    if group_index.dim() != 1 or group_index.numel() == 0 or group_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"group_index must be a non-empty integer [S] tensor, got {group_index.dtype} "
                         f"{tuple(group_index.shape)}")  # fmt: skip
    s = group_index.numel()
    if (rewards is None) == (advantages is None):
        raise ValueError("give exactly one of rewards and advantages")
    for name, t, size in [("rewards", rewards, s), ("advantages", advantages, s), ("old_logp", old_logp, n),
                          ("rollout_logp", rollout_logp, n), ("ref_logp", ref_logp, n)]:  # fmt: skip
        if t is not None and (t.shape != (size,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float [{size}] tensor, got {t.dtype} {tuple(t.shape)}")
    if loss_mask is not None and (loss_mask.shape != (n,) or loss_mask.dtype != torch.bool):
        raise ValueError(f"loss_mask must be a bool [N={n}] tensor, got {loss_mask.dtype} {tuple(loss_mask.shape)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not mgpo_lambda >= 0:
        raise ValueError(f"mgpo_lambda must be >= 0, got {mgpo_lambda}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if not tis_cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if num_groups is not None and not (isinstance(num_groups, int) and num_groups >= 1):
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")


def _metrics(terms, entropy, valid, weights, adv, with_kl) -> dict[str, torch.Tensor]:
    """Token means over the valid tokens of the per-token terms [N, 6] (MGPO_OUTPUTS) and entropy [N]: one reduction."""
    per_token = torch.cat([terms[:, 1:], entropy[:, None]], dim=1)  # [N, 6]: ratio kl low high capped entropy
    ratio, kl, low, high, capped, ent = (per_token.sum(0) / valid.sum().clamp_min(1)).unbind(0)
    metrics = {"tis_frac": capped}
    if with_kl:
        metrics["kl_mean"] = kl
    metrics |= {
        "clip_frac_low": low,
        "clip_frac_high": high,
        "entropy_mean": ent,
        "ratio_mean": ratio,
        "ratio_max": terms[:, 1].amax() if terms.shape[0] else terms.new_zeros(()),
        "mgpo_weights": weights,
        "advantages": adv,
    }
    return metrics


def mgpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor,
    group_index: torch.Tensor,
    old_logp: torch.Tensor,
    rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    mgpo_lambda: float = 0.0,
    scale: str = "group",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    tis_cap: float = 2.0,
    beta: float = 0.0,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_groups: int | None = None,
    backend: str = "auto",
) -> MGPOOutput:
    """MGPO clipped policy-gradient loss of an LM head on packed tokens, with its metrics, without a host sync.

    hidden: [N, H], weight: [V, H] (bf16, fp16 or fp32, same dtype), bias: [V] or None; targets: [N] (ignore_index
    rows are not in the loss); seq_index: [N] sequence id of each token in [0, S); group_index: [S] group id of each
    sequence in [0, num_groups); rewards: [S] or advantages: [S], exactly one; old_logp, rollout_logp, ref_logp: [N]
    (fp32 is best); loss_mask: [N] bool or None. Sequences may be packed in any order and have any lengths; groups
    any sizes.

    The math is `reference.mgpo_loss_reference`'s (DESIGN.md section 2): A' = w_ME(group) * A from the rewards
    (group advantages with `scale`, MaxEnt weight with `mgpo_lambda`), or `advantages` used as A' as given; per
    valid token (target != ignore_index and loss_mask) ratio = exp(logp - old_logp),
    objective = min(ratio A', clip(ratio, 1 - eps_low, 1 + eps_high) A') * is_w - beta * k3(ref_logp, logp) with
    is_w = min(exp(old_logp - rollout_logp), tis_cap) (detached; 1 without rollout_logp), and
    loss = -aggregation(objective): "seq-mean-token-mean", "token-mean" or "seq-sum-norm" (sum / (S * max_len),
    max_len the batch's longest valid sequence). Only hidden, weight and bias receive gradients; the backward can
    run once (the gradients are computed in the forward and scaled in place).

    num_groups: the number of group ids; it sets the size of metrics["mgpo_weights"]. None takes S (a shape: S
    sequences form at most S groups), so the weights come padded to [S], an id without a sequence having the weight
    of p_c = 0, as in the reference. Ids are never read back to find it.

    Returns MGPOOutput(loss [] fp32, metrics): detached fp32 tensors, means over the valid tokens: clip_frac_low
    (ratio < 1 - eps_low and A' < 0), clip_frac_high (ratio > 1 + eps_high and A' > 0), entropy_mean, ratio_mean,
    ratio_max (0 without valid tokens), tis_frac (IS weight above tis_cap; 0 without rollout_logp), kl_mean (only
    when beta > 0); mgpo_weights [num_groups] (1 when advantages are given) and advantages [S] (the A' used).
    """
    check_head_inputs(hidden, weight, targets, bias, temperature)
    n = hidden.shape[0]
    _check_inputs(n, seq_index, group_index, rewards, advantages, old_logp, rollout_logp, ref_logp, loss_mask,
                  mgpo_lambda=mgpo_lambda, scale=scale, eps_low=eps_low, eps_high=eps_high, aggregation=aggregation,
                  tis_cap=tis_cap, beta=beta, num_groups=num_groups)  # fmt: skip
    backend = resolve_backend(backend, hidden.device, has_cuda_path=True,
                              auto=lambda: autoselect.auto_backend("mgpo", hidden, weight))
    hidden, weight, targets, bias = _prepare(hidden, weight, targets, bias)
    seq_index, group_index = seq_index.to(torch.int64), group_index.to(torch.int64)
    num_sequences = group_index.numel()
    num_groups = num_groups or num_sequences

    valid = targets != ignore_index
    if loss_mask is not None:
        valid = valid & loss_mask
        targets = torch.where(valid, targets, ignore_index)
    if rewards is not None:
        adv, weights = ops.group_statistics(rewards.detach(), group_index, num_groups=num_groups,
                                            mgpo_lambda=float(mgpo_lambda), scale=scale)  # fmt: skip
    else:
        adv = advantages.detach().float()
        weights = torch.ones(num_groups, device=hidden.device, dtype=torch.float32)
    f32 = lambda t: None if t is None else t.detach().float().contiguous()
    token_weight = ops.token_weights(valid, seq_index, num_sequences, aggregation)

    grad_on = torch.is_grad_enabled()
    loss, terms, entropy, _, _, _ = ops.mgpo_loss_fused_op(
        hidden, weight, targets, bias, adv[seq_index].contiguous(), f32(old_logp), f32(rollout_logp),
        f32(ref_logp) if beta > 0 else None, token_weight,
        eps_low=float(eps_low), eps_high=float(eps_high), tis_cap=float(tis_cap), beta=float(beta),
        temperature=float(temperature), ignore_index=int(ignore_index),
        need_dh=grad_on and hidden.requires_grad,
        need_dw=grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad)),
        backend=backend,
    )  # fmt: skip
    return MGPOOutput(loss, _metrics(terms.detach(), entropy.detach(), valid, weights, adv, beta > 0))

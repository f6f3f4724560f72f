"""The fused policy loss: host launcher and the torch custom op around it.

`policy_loss_fwd` prepares the per-token constants on the device (rollout factors, the sequence-level ratio and its
coupled gradient), runs the LM-head engine once with `token_loss.PolicyStep` between the row statistics and the dz
write, and assembles the loss and the per-token metric columns. GEMM-sized passes: three (head GEMM, dh, dW), plus
one scoring forward before them when the sequence-level ratio needs this call's log-probs of whole sequences
(`extra_pass`). vibeperf::policy_loss_fused computes the gradients in the forward; its backward only scales them in
place by the incoming scalar gradient. Nothing reads a value back to the host.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .. import lmhead
from ..lmhead import cuda_backend, triton_rows, upstream
from .options import (
    ADVANTAGES,
    AGGREGATIONS,
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    PPO_CLIP_TYPES,
    ROLLOUT_CORRECTIONS,
    PolicyLossOptions,
)
from .token_loss import TERMS, PolicyStep, PolicyTokens, rollout_factors, sequence_constants

METRIC_TERMS = ("ratio", "kl", "clip_low", "clip_high", "dual_clip", "tis", "mis")  # columns of the op's terms


def rollout_in_step(o: PolicyLossOptions, on_policy: bool) -> bool:
    """Whether the rollout correction is formed per token in the step: on-policy (old = this call's log-probs), a
    token-level correction, and no sequence-level ratio whose coupled gradient needs the factors beforehand."""
    return (on_policy and o.rollout_correction in ("token_tis", "token_mask", "icepop")
            and o.importance_sampling_level != "sequence")  # fmt: skip


def extra_pass(o: PolicyLossOptions, on_policy: bool) -> bool:
    """Whether the loss needs a scoring forward before its three passes: a sequence-level ratio off-policy (its value
    needs the current log-probs of the whole sequence before any gradient), level "sequence" with the
    bias-corrected KL (its gradient couples every token's KL), or an on-policy rollout correction that cannot be
    formed in the step (sequence-level rho, or level "sequence"). On-policy the ratio is exactly 1: no extra pass."""
    level = o.importance_sampling_level
    if on_policy and o.rollout_correction is not None and not rollout_in_step(o, on_policy):
        return True
    return level != "token" and (not on_policy or (level == "sequence" and o.beta > 0 and o.kl_bias_correction))


def cuda_unsupported(o: PolicyLossOptions, on_policy: bool) -> str | None:
    """The first setting that the CUDA row kernel's fixed PPO-clip form (LOSS_MGPO) does not run, or None."""
    checks = [
        ("loss_type", o.loss_type in PPO_CLIP_TYPES),
        ("importance_sampling_level", o.importance_sampling_level == "token"),
        ("delta", o.delta is None),
        ("clip_ratio_c", o.clip_ratio_c is None),
        ("kl", o.kl == "k3" or o.beta == 0),
        ("kl_bias_correction", not o.kl_bias_correction or o.beta == 0),
        ("rollout_correction", o.rollout_correction in (None, "token_tis")),
        ("entropy_coef", o.entropy_coef == 0),
    ]
    for field, ok in checks:
        if not ok:
            return f"PolicyLossOptions.{field}={getattr(o, field)!r}"
    return "old_logp=None (on-policy)" if on_policy else None


def policy_loss_fwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, token_adv: Tensor, old_logp: Tensor | None,
    rollout_logp: Tensor | None, ref_logp: Tensor | None, token_weight: Tensor, seq_index: Tensor,
    num_sequences: int, o: PolicyLossOptions, *, temperature: float, ignore_index: int, need_dh: bool, need_dw: bool,
    backend: str, schedule: str | None = None, workspace_bytes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Host launcher. hidden: [N, H], weight: [V, H], targets: [N] int64 (ignore_index: not in the loss; a loss mask
    is folded in by the caller), token_adv / token_weight: [N] fp32 (A' and the aggregation weight of each token),
    old_logp / rollout_logp / ref_logp: [N] fp32 or None, seq_index: [N] int64.
    schedule / workspace_bytes: the engine's settings (lmhead/settings.py).
    Returns (loss [], terms [N, len(METRIC_TERMS)], entropy [N], dh, dW, db).
    """
    n = hidden.shape[0]
    valid = targets != ignore_index
    f32 = dict(device=hidden.device, dtype=torch.float32)
    on_policy = old_logp is None
    engine = lmhead.chunked_engine(backend, workspace_bytes)
    head = dict(temperature=temperature, ignore_index=ignore_index, need_dh=need_dh, need_dw=need_dw)
    if backend == "cuda":
        out = torch.empty((n, len(cuda_backend.MGPO_OUTPUTS)), **f32)
        mgpo = cuda_backend.MGPOTokens(adv=token_adv, old_logp=old_logp, rollout_logp=rollout_logp,
                                       ref_logp=ref_logp if o.beta > 0 else None, out=out,
                                       clip_low=1.0 - o.epsilon_low, clip_high=1.0 + o.epsilon_high,
                                       tis_cap=o.rollout_cap, beta=o.beta)  # fmt: skip
        _, entropy, _, dh, dw, db = engine(hidden, weight, targets, bias, loss=cuda_backend.LOSS_MGPO,
                                           g_logp=token_weight, want_entropy=True, mgpo=mgpo, **head)  # fmt: skip
        loss = -(token_weight * out[:, 0]).sum()
        zeros = torch.zeros(n, **f32)
        terms = torch.stack([out[:, 1], out[:, 2], out[:, 3], out[:, 4], zeros, out[:, 5], zeros], dim=1)
        return loss, terms, entropy, dh, dw, db

    logp_pre = None
    if extra_pass(o, on_policy):
        logp_pre = lmhead.scores(hidden, weight, targets, bias, temperature, ignore_index, False, backend, schedule,
                                 workspace_bytes)[0]  # fmt: skip
    in_step = rollout_in_step(o, on_policy)
    c, flags = token_weight, torch.zeros((n, 2), **f32)
    if o.rollout_correction is not None and not in_step:
        old = logp_pre if on_policy else old_logp
        factor, tis, mis = rollout_factors(o, valid, old, rollout_logp, seq_index, num_sequences)
        c, flags = token_weight * factor, torch.stack([tis.float(), mis.float()], dim=1)
    t = PolicyTokens(valid=valid, adv=token_adv, old=old_logp, seq_log_w=None, c=c, w=token_weight,
                     ref=ref_logp if o.beta > 0 else None, seq_grad=None, seq_kl_grad=None, flags=flags,
                     rollout=rollout_logp if in_step else None, out=torch.empty((n, len(TERMS)), **f32))  # fmt: skip
    if o.importance_sampling_level != "token":
        vf = valid.float()
        seq_len = vf.new_zeros(num_sequences).index_add_(0, seq_index, vf)[seq_index].clamp_min(1)
        if on_policy:
            t.seq_log_w = torch.zeros(n, **f32)
        else:
            d = torch.where(valid, logp_pre - old_logp, 0.0)
            t.seq_log_w = d.new_zeros(num_sequences).index_add_(0, seq_index, d)[seq_index] / seq_len
        if o.importance_sampling_level == "sequence":
            sequence_constants(t, seq_len, seq_index, num_sequences, logp_pre, o)
    g_ent = -o.entropy_coef * token_weight if o.entropy_coef > 0 else None
    _, entropy, _, dh, dw, db = engine(hidden, weight, targets, bias, loss=triton_rows.LOSS_GIVEN, g_logp=None,
                                       g_ent=g_ent, want_entropy=True, step=PolicyStep(t, o), **head)  # fmt: skip
    cols = dict(zip(TERMS, t.out.unbind(1)))
    loss = (cols["c"] * cols["pg"]).sum()
    if o.beta > 0:
        loss = loss + o.beta * (token_weight * cols["kl_loss"]).sum()
    if o.entropy_coef > 0:
        loss = loss - o.entropy_coef * (token_weight * entropy).sum()
    return loss, torch.stack([cols[k] for k in METRIC_TERMS], dim=1), entropy, dh, dw, db


_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossOptions))
_CHOICES = {"loss_type": LOSS_TYPES, "importance_sampling_level": IS_LEVELS, "aggregation": AGGREGATIONS,
            "advantage": ADVANTAGES, "kl": KL_ESTIMATORS, "rollout_correction": ROLLOUT_CORRECTIONS}  # fmt: skip


def encode_options(o: PolicyLossOptions) -> list[float]:
    """The options as the custom op takes them (ops take no dataclasses): one float per field, a choice by its index,
    None as NaN. Plain Python over constants, so torch.compile folds it."""
    out = []
    for name in _FIELDS:
        value = getattr(o, name)
        if value is None:
            out.append(math.nan)
        elif name in _CHOICES:
            out.append(float(_CHOICES[name].index(value)))
        else:
            out.append(float(value))
    return out


def decode_options(code: list[float]) -> PolicyLossOptions:
    """The inverse of `encode_options`."""
    kw = {}
    for name, x in zip(_FIELDS, code):
        if math.isnan(x):
            kw[name] = None
        elif name in _CHOICES:
            kw[name] = _CHOICES[name][int(x)]
        elif name == "max_completion_length":
            kw[name] = int(x)
        elif name == "kl_bias_correction":
            kw[name] = bool(x)
        else:
            kw[name] = x
    return PolicyLossOptions(**kw)


@torch.library.custom_op("vibeperf::policy_loss_fused", mutates_args=())
def policy_loss_fused_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    token_adv: Tensor,
    old_logp: Tensor | None,
    rollout_logp: Tensor | None,
    ref_logp: Tensor | None,
    token_weight: Tensor,
    seq_index: Tensor,
    num_sequences: int,
    options: list[float],
    temperature: float,
    ignore_index: int,
    need_dh: bool,
    need_dw: bool,
    backend: str,
    schedule: str,
    workspace_bytes: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`policy_loss_fwd` as an op: (loss [], terms [N, 7], entropy [N], dh, dW, db); an unneeded gradient is [0]."""
    loss, terms, entropy, dh, dw, db = policy_loss_fwd(
        hidden, weight, targets, bias, token_adv, old_logp, rollout_logp, ref_logp, token_weight, seq_index,
        num_sequences, decode_options(options), temperature=temperature, ignore_index=ignore_index,
        need_dh=need_dh, need_dw=need_dw, backend=backend, schedule=schedule, workspace_bytes=workspace_bytes,
    )  # fmt: skip
    given = lambda t: t if t is not None else hidden.new_empty(0)  # outputs may not alias: one empty each
    return loss, terms, entropy, given(dh), given(dw), given(db)


@policy_loss_fused_op.register_fake
def _(hidden, weight, targets, bias, token_adv, old_logp, rollout_logp, ref_logp, token_weight, seq_index,
      num_sequences, options, temperature, ignore_index, need_dh, need_dw, backend, schedule,
      workspace_bytes):  # fmt: skip
    n = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty((n, len(METRIC_TERMS)), dtype=torch.float32),
        hidden.new_empty(n, dtype=torch.float32),
        torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
        torch.empty_like(weight) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if (need_dw and bias is not None) else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[3] is not None
    _, _, _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.set_materialize_grads(False)  # no zero gradients made for the outputs the loss does not use ([N, H], [V, H])


def _backward(ctx, grad_loss, _g_terms, _g_entropy, _g_dh, _g_dw, _g_db):
    if grad_loss is None:
        return (None,) * 19
    # Detached (scale_by_upstream): they are also this node's outputs, and a gradient must not carry its grad_fn
    # (torch.autograd.grad keeps it).
    dh, dw, db = (upstream.scale_by_upstream(t, grad_loss) for t in ctx.saved_tensors)
    return (dh, dw, None, db if ctx.has_bias else None) + (None,) * 15


policy_loss_fused_op.register_autograd(_backward, setup_context=_setup_context)

"""Row epilogue of the chunked LM-head training path.

One program per token row of a logits chunk z = h W^T ([C, V], written by the head GEMM). Pass 1 streams the row
once for the log-sum-exp (online, running max from -inf), the target's log-prob and the entropy; the per-token
gradient coefficient g = dLoss/dlogp is formed right there (given by the caller, or the closed form of the loss);
pass 2 streams the row again (mostly from L2) and overwrites it in place with dLoss/dz:
    g * (onehot(y) - softmax(z)) + g_H * softmax(z) * (E_p[z] - z),   times 1/temperature.
The dh and dW GEMMs then read that chunk; no [N, V] tensor ever exists.
LOSS_MGPO forms g from the MGPO clipped policy objective of the token (`mgpo_token_grad`) and writes the per-token
terms the loss and its metrics are reduced from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_fwd import INTERPRET, LN2, LOG2E, row_softmax_state

LOSS_GIVEN = 0  # g_logp / g_ent hold upstream gradients of logp / entropy
LOSS_NLL = 1  # loss = sum_t w_t * nll_t: g_logp holds w_t, so dLoss/dlogp = -w_t
LOSS_MGPO = 2  # loss = -sum_t w_t * objective_t (MGPO): g_logp holds w_t, the rest comes in MGPOTokens
MGPO_OUTPUTS = ("objective", "ratio", "kl", "clip_low", "clip_high", "tis_capped")


class MGPOTokens(NamedTuple):
    """Per-token inputs and outputs of LOSS_MGPO; every tensor is fp32 and contiguous.

    adv: [C] A' of the token's sequence; old_logp: [C]; rollout_logp: [C] or None (no truncated importance
    sampling); ref_logp: [C] or None (no KL term); out: [C, len(MGPO_OUTPUTS)], written for every row, 0 on ignored
    rows: the objective term (unnormalised), the ratio, the k3 KL, and the flags (0 / 1) clipped low, clipped high,
    IS weight capped. clip_low = 1 - eps_low and clip_high = 1 + eps_high bound the ratio; beta weighs the KL.
    """

    adv: torch.Tensor
    old_logp: torch.Tensor
    rollout_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    out: torch.Tensor
    clip_low: float
    clip_high: float
    tis_cap: float
    beta: float

    def rows(self, i0: int, i1: int) -> MGPOTokens:
        cut = lambda t: None if t is None else t[i0:i1]
        return self._replace(adv=self.adv[i0:i1], old_logp=self.old_logp[i0:i1], rollout_logp=cut(self.rollout_logp),
                             ref_logp=cut(self.ref_logp), out=self.out[i0:i1])  # fmt: skip


@triton.jit
def mgpo_token_grad(
    logp, valid, adv, old_logp, rollout_logp, ref_logp, clip_low, clip_high, tis_cap, beta,
    HAS_ROLLOUT: tl.constexpr, HAS_KL: tl.constexpr,
):  # fmt: skip
    """MGPO terms of one token: (d objective / d logp, objective, ratio, kl, clipped low, clipped high, IS capped).

    objective = min(ratio A', clip(ratio) A') * is_w - beta * kl with ratio = exp(logp - old_logp),
    is_w = min(exp(old_logp - rollout_logp), tis_cap) (a constant), kl = exp(ref - logp) - (ref - logp) - 1.
    The clipped side of the min is the smaller one exactly when a clip flag is set, and it is flat in logp.
    Log-prob differences are zeroed on invalid rows, whose old / rollout / ref log-probs may be garbage.
    """
    ratio = tl.exp(tl.where(valid, logp - old_logp, 0.0))
    is_low = valid & (ratio < clip_low) & (adv < 0)
    is_high = valid & (ratio > clip_high) & (adv > 0)
    objective = tl.minimum(ratio * adv, tl.minimum(tl.maximum(ratio, clip_low), clip_high) * adv)
    d_objective = tl.where(is_low | is_high, 0.0, ratio * adv)
    capped = valid & False
    if HAS_ROLLOUT:
        is_raw = tl.exp(tl.where(valid, old_logp - rollout_logp, 0.0))
        is_w = tl.minimum(is_raw, tis_cap)
        objective *= is_w
        d_objective *= is_w
        capped = valid & (is_raw > tis_cap)
    kl = tl.zeros_like(ratio)
    if HAS_KL:
        delta = tl.where(valid, ref_logp - logp, 0.0)
        kl = tl.exp(delta) - delta - 1.0
        objective -= beta * kl
        d_objective -= beta * (1.0 - tl.exp(delta))
    return d_objective, objective, ratio, kl, is_low, is_high, capped


@triton.jit(do_not_specialize=["ignore_index"])
def lmhead_row_grad_kernel(
    z_ptr,  # [C, V] raw logits h W^T, overwritten with dLoss / d(h W^T)
    b_ptr,  # [V] or dummy
    tgt_ptr,  # [C] int64
    g_logp_ptr,  # [C] fp32, see LOSS_*
    g_ent_ptr,  # [C] fp32 upstream gradient of entropy (GRAD_ENTROPY)
    logp_ptr,  # [C] fp32 out
    ent_ptr,  # [C] fp32 out (WANT_ENTROPY)
    lse_ptr,  # [C] fp32 out
    adv_ptr,  # [C] fp32 A' of each token (LOSS_MGPO, as old_ptr .. mgpo_out_ptr: see MGPOTokens)
    old_ptr,  # [C] fp32
    rollout_ptr,  # [C] fp32 (HAS_ROLLOUT)
    ref_ptr,  # [C] fp32 (HAS_KL)
    mgpo_out_ptr,  # [C, 6] fp32 out
    V,
    stride_z,
    scale_log2,  # log2(e) / temperature
    inv_temp,
    ignore_index,
    clip_low,
    clip_high,
    tis_cap,
    beta,
    LOSS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    HAS_ROLLOUT: tl.constexpr,
    HAS_KL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    safe_tgt = tl.where(valid, tgt, 0)

    m, s, t = row_softmax_state(z_row, b_ptr, V, scale_log2, HAS_BIAS, WANT_ENTROPY or GRAD_ENTROPY, BLOCK_V)
    lse2 = m + tl.log2(s)
    z_t = tl.load(z_row + safe_tgt).to(tl.float32)
    if HAS_BIAS:
        z_t += tl.load(b_ptr + safe_tgt).to(tl.float32)
    logp = tl.where(valid, (z_t * scale_log2 - lse2) * LN2, 0.0)
    mean_zc = t / s  # E_p[z] - m, base 2
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse2 * LN2)
    if WANT_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, (tl.log2(s) - mean_zc) * LN2, 0.0))

    if LOSS == 0:
        g = tl.load(g_logp_ptr + row)
    elif LOSS == 1:
        g = -tl.load(g_logp_ptr + row)
    else:
        rollout = tl.zeros_like(logp)
        ref = tl.zeros_like(logp)
        if HAS_ROLLOUT:
            rollout = tl.load(rollout_ptr + row)
        if HAS_KL:
            ref = tl.load(ref_ptr + row)
        d_obj, obj, ratio, kl, low, high, capped = mgpo_token_grad(
            logp, valid, tl.load(adv_ptr + row), tl.load(old_ptr + row), rollout, ref,
            clip_low, clip_high, tis_cap, beta, HAS_ROLLOUT, HAS_KL,
        )  # fmt: skip
        g = -tl.load(g_logp_ptr + row) * d_obj
        out_row = mgpo_out_ptr + row * 6  # MGPO_OUTPUTS, in order
        tl.store(out_row, tl.where(valid, obj, 0.0))
        tl.store(out_row + 1, tl.where(valid, ratio, 0.0))
        tl.store(out_row + 2, tl.where(valid, kl, 0.0))
        tl.store(out_row + 3, tl.where(low, 1.0, 0.0))
        tl.store(out_row + 4, tl.where(high, 1.0, 0.0))
        tl.store(out_row + 5, tl.where(capped, 1.0, 0.0))
    g = tl.where(valid, g, 0.0)
    g_ent = tl.zeros([], tl.float32)
    if GRAD_ENTROPY:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + row), 0.0)

    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = z * scale_log2
        p = tl.exp2(z - lse2)
        dz = g * (tl.where(offs == tgt, 1.0, 0.0) - p)
        if GRAD_ENTROPY:
            dz += g_ent * p * (mean_zc - (z - m)) * LN2
        tl.store(z_row + offs, (dz * inv_temp).to(z_ptr.dtype.element_ty), mask=mask)


def lmhead_row_grad(
    z: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    loss: int,
    want_entropy: bool,
    mgpo: MGPOTokens | None = None,
):
    """Host launcher: in place on z [C, V]; returns (logp [C], entropy [C] or None, lse [C]), fp32.

    mgpo: the per-token MGPO inputs / outputs, required by (and only read with) loss=LOSS_MGPO.
    """
    c, v = z.shape
    logp = torch.empty(c, device=z.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else logp
    block_v = 128 if INTERPRET else 4096
    if loss == LOSS_MGPO:
        m = mgpo
        mgpo_ptrs = (m.adv, m.old_logp, m.rollout_logp if m.rollout_logp is not None else m.adv,
                     m.ref_logp if m.ref_logp is not None else m.adv, m.out)  # fmt: skip
        mgpo_args = (m.clip_low, m.clip_high, m.tis_cap, m.beta)
        has_rollout, has_kl = m.rollout_logp is not None, m.ref_logp is not None
    else:
        mgpo_ptrs, mgpo_args, has_rollout, has_kl = (g_logp,) * 5, (0.0, 0.0, 0.0, 0.0), False, False
    lmhead_row_grad_kernel[(c,)](
        z, bias if bias is not None else z, targets, g_logp, g_ent if g_ent is not None else g_logp,
        logp, ent, lse, *mgpo_ptrs,
        v, z.stride(0), LOG2E / temperature, 1.0 / temperature, ignore_index, *mgpo_args,
        LOSS=loss, HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, GRAD_ENTROPY=g_ent is not None,
        HAS_ROLLOUT=has_rollout, HAS_KL=has_kl, BLOCK_V=block_v, num_warps=1 if INTERPRET else 16,
    )  # fmt: skip
    return logp, (ent if want_entropy else None), lse

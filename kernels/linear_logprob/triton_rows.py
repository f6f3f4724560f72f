"""Row epilogue of the chunked LM-head training path.

One program per token row of a logits chunk z = h W^T ([C, V], written by the head GEMM). Pass 1 streams the row
once for the log-sum-exp (online, running max from -inf), the target's log-prob and the entropy; the per-token
gradient coefficient g = dLoss/dlogp is formed right there (given by the caller, or the closed form of the loss);
pass 2 streams the row again (mostly from L2) and overwrites it in place with dLoss/dz:
    g * (onehot(y) - softmax(z)) + g_H * softmax(z) * (E_p[z] - z),   times 1/temperature.
The dh and dW GEMMs then read that chunk; no [N, V] tensor ever exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import INTERPRET, LN2, LOG2E

LOSS_GIVEN = 0  # g_logp / g_ent hold upstream gradients of logp / entropy
LOSS_NLL = 1  # loss = sum_t w_t * nll_t: g_logp holds w_t, so dLoss/dlogp = -w_t


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
    V,
    stride_z,
    scale_log2,  # log2(e) / temperature
    inv_temp,
    ignore_index,
    LOSS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    safe_tgt = tl.where(valid, tgt, 0)

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = z * scale_log2  # [BLOCK_V], base-2 logits
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(z - m_new)
        s = s * alpha + tl.sum(p, axis=0)
        if WANT_ENTROPY or GRAD_ENTROPY:
            t = t * alpha + tl.sum(p * tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse2 = m + tl.log2(s)
    z_t = tl.load(z_row + safe_tgt).to(tl.float32)
    if HAS_BIAS:
        z_t += tl.load(b_ptr + safe_tgt).to(tl.float32)
    logp = tl.where(valid, (z_t * scale_log2 - lse2) * LN2, 0.0)
    mean_z2 = t / s  # E_p[z] in base-2 units
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse2 * LN2)
    if WANT_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, (lse2 - mean_z2) * LN2, 0.0))

    if LOSS == 0:
        g = tl.load(g_logp_ptr + row)
    else:
        g = -tl.load(g_logp_ptr + row)
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
            dz += g_ent * p * (mean_z2 - z) * LN2
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
):
    """Host launcher: in place on z [C, V]; returns (logp [C], entropy [C] or None, lse [C]), fp32."""
    c, v = z.shape
    logp = torch.empty(c, device=z.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else logp
    block_v = 128 if INTERPRET else 4096
    lmhead_row_grad_kernel[(c,)](
        z, bias if bias is not None else z, targets, g_logp, g_ent if g_ent is not None else g_logp,
        logp, ent, lse,
        v, z.stride(0), LOG2E / temperature, 1.0 / temperature, ignore_index,
        LOSS=loss, HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, GRAD_ENTROPY=g_ent is not None,
        BLOCK_V=block_v, num_warps=1 if INTERPRET else 16,
    )  # fmt: skip
    return logp, (ent if want_entropy else None), lse

"""The chunked LM-head engine: forward and backward in three GEMM-sized passes, never an [N, V] tensor.

For each chunk of C tokens (C chosen so the chunk's logits fit a bounded workspace, see `chunk_rows`):
  1. z = h_c W^T                 head GEMM into the reusable [C, V] workspace (weight dtype)
  2. row epilogue                lse, log-prob, entropy, the gradient coefficient g = dLoss/dlogp, and dz in place
  3. dh_c = dz W ; dW += dz^T h_c   (dW accumulated in fp32)
The row epilogue is the Triton kernel of `triton_rows.py`, or the same math in plain torch (backend "torch").
The same loop serves a loss whose per-token gradient is known in the forward (NLL with token weights; the MGPO
loss plugs its closed form in the same place) and the recompute backward for arbitrary upstream gradients.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import triton_rows

DEFAULT_WORKSPACE_BYTES = int(os.environ.get("VIBEPERF_LMHEAD_WORKSPACE_MB", "512")) * 2**20


def chunk_rows(n_tokens: int, vocab: int, elem_bytes: int, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> int:
    """Tokens per chunk: the [C, V] logits workspace stays within `workspace_bytes` (C a multiple of 128)."""
    c = max(128, workspace_bytes // (vocab * elem_bytes) // 128 * 128)
    return min(c, n_tokens) if n_tokens > 0 else 1


def mgpo_token_grad_torch(logp: torch.Tensor, valid: torch.Tensor, m: triton_rows.MGPOTokens) -> torch.Tensor:
    """Plain-torch twin of `triton_rows.mgpo_token_grad` on [C] rows: writes m.out, returns d objective / d logp."""
    zero = torch.zeros_like(logp)
    ratio = torch.exp(torch.where(valid, logp - m.old_logp, zero))
    low = valid & (ratio < m.clip_low) & (m.adv < 0)
    high = valid & (ratio > m.clip_high) & (m.adv > 0)
    objective = torch.minimum(ratio * m.adv, ratio.clamp(m.clip_low, m.clip_high) * m.adv)
    d_objective = torch.where(low | high, zero, ratio * m.adv)
    capped = torch.zeros_like(valid)
    if m.rollout_logp is not None:
        is_raw = torch.exp(torch.where(valid, m.old_logp - m.rollout_logp, zero))
        is_w = is_raw.clamp(max=m.tis_cap)
        objective, d_objective = objective * is_w, d_objective * is_w
        capped = valid & (is_raw > m.tis_cap)
    kl = zero
    if m.ref_logp is not None:
        delta = torch.where(valid, m.ref_logp - logp, zero)
        kl = torch.exp(delta) - delta - 1
        objective = objective - m.beta * kl
        d_objective = d_objective - m.beta * (1 - torch.exp(delta))
    terms = (objective, ratio, kl, low.float(), high.float(), capped.float())  # MGPO_OUTPUTS, in order
    m.out.copy_(torch.where(valid[:, None], torch.stack(terms, dim=1), 0.0))
    return d_objective


def row_grad_torch(z, targets, bias, g_logp, g_ent, temperature, ignore_index, loss, want_entropy, mgpo=None):
    """Plain-torch twin of `triton_rows.lmhead_row_grad` (same signature and in-place contract)."""
    zf = z.float()
    if bias is not None:
        zf = zf + bias.float()
    zf = zf / temperature
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(zf, dim=-1)
    logq = zf - lse[:, None]  # log-softmax: centred, so large logits cause no cancellation below
    p = torch.exp(logq)
    logp = torch.where(valid, logq.gather(1, safe[:, None]).squeeze(1), 0.0)
    neg_ent = (p * logq).sum(-1)  # E_p[z] - lse
    ent = torch.where(valid, -neg_ent, 0.0) if want_entropy else None
    if loss == triton_rows.LOSS_MGPO:
        g = -g_logp * mgpo_token_grad_torch(logp, valid, mgpo)
    else:
        g = g_logp if loss == triton_rows.LOSS_GIVEN else -g_logp
    g = torch.where(valid, g, 0.0)
    dz = -g[:, None] * p
    dz.scatter_add_(1, safe[:, None], g[:, None])
    if g_ent is not None:
        dz += torch.where(valid, g_ent, 0.0)[:, None] * p * (neg_ent[:, None] - logq)
    z.copy_(dz / temperature)
    return logp, ent, lse


_DTYPE_OUT_ADDMM: bool | None = None


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b of a lower precision, accumulated in fp32 and in place."""
    global _DTYPE_OUT_ADDMM
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _DTYPE_OUT_ADDMM is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _DTYPE_OUT_ADDMM = True
            return
        except (RuntimeError, TypeError) as exc:
            _DTYPE_OUT_ADDMM = False
            warnings.warn(f"in-place fp32 addmm of {a.dtype} inputs is unavailable ({exc}); using mm + add_",
                          RuntimeWarning, stacklevel=2)
    if acc.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


def lmhead_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    temperature: float,
    ignore_index: int,
    loss: int,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None = None,
    want_entropy: bool = False,
    need_dh: bool = True,
    need_dw: bool = True,
    backend: str = "triton",
    chunk: int | None = None,
    mgpo: triton_rows.MGPOTokens | None = None,
):
    """Runs the three passes over all chunks.

    hidden: [N, H], weight: [V, H] (same dtype), targets: [N] int64, g_logp / g_ent: [N] fp32 (see LOSS_* in
    triton_rows); mgpo: the [N]-row MGPO inputs and outputs of loss=LOSS_MGPO (its `out` is written).
    Returns (logp [N], entropy [N] or None, lse [N], dh [N, H] or None, dW [V, H] or None, db [V] or None); dh in
    hidden's dtype, dW / db in weight's dtype (accumulated in fp32).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    c = chunk or chunk_rows(n, v, weight.element_size())
    dev = hidden.device
    logp = torch.empty(n, device=dev, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else None
    dh = torch.empty_like(hidden) if need_dh else None
    dw32 = torch.zeros((v, h), device=dev, dtype=torch.float32) if need_dw else None
    db32 = torch.zeros(v, device=dev, dtype=torch.float32) if (need_dw and bias is not None) else None
    workspace = torch.empty((min(c, n), v), device=dev, dtype=weight.dtype)
    row_grad = triton_rows.lmhead_row_grad if backend == "triton" else row_grad_torch
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        h_c = hidden[i0:i1]
        z = workspace[: i1 - i0]
        torch.mm(h_c, weight.T, out=z)  # [C, V]
        lp, en, ls = row_grad(
            z, targets[i0:i1], bias, g_logp[i0:i1], None if g_ent is None else g_ent[i0:i1],
            temperature, ignore_index, loss, want_entropy, None if mgpo is None else mgpo.rows(i0, i1),
        )  # fmt: skip
        logp[i0:i1] = lp
        lse[i0:i1] = ls
        if want_entropy:
            ent[i0:i1] = en
        if need_dh:
            torch.mm(z, weight, out=dh[i0:i1])  # [C, H]
        if need_dw:
            _accumulate_fp32(dw32, z.T, h_c)  # [V, H]
            if db32 is not None:
                db32 += z.sum(0, dtype=torch.float32)
    dw = None if dw32 is None else dw32.to(weight.dtype)
    db = None if db32 is None else db32.to(bias.dtype)
    return logp, ent, lse, dh, dw, db

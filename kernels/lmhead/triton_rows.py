"""Row epilogue of the chunked LM-head training path.

One program per token row of a logits chunk z = h W^T ([C, V], written by the head GEMM). The statistics phase
streams the row once for the log-sum-exp (online, running max from -inf), the target's log-prob and the entropy; the
gradient phase streams it again and overwrites it in place with dLoss/dz:
    g * (onehot(y) - softmax(z)) + g_H * softmax(z) * (E_p[z] - z),   times 1/temperature,
g = dLoss/dlogp and g_H = dLoss/dentropy of the token. PHASE_FULL runs both in one program (g known before the pass:
the row is re-read mostly from L2); PHASE_STATS and PHASE_GRAD run them as two launches, so that a loss can form g
from the chunk's log-probs in between (`chunked.TokenStep`: the policy losses), from lse and entropy stored in [C]
vectors. The dh and dW GEMMs then read that chunk; no [N, V] tensor ever exists.
When the head GEMM already folded each output tile into partial softmax states (`triton_gemm.py`), the statistics
come from those [tiles] partials of the row instead of a pass over it (`partials=`): PHASE_FULL then reads and
writes the row once, and PHASE_STATS reads no logit but the target's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import INTERPRET, LN2, LOG2E, num_sms, row_softmax_state

LOSS_GIVEN = 0  # g_logp / g_ent hold upstream gradients of logp / entropy
LOSS_NLL = 1  # loss = sum_t w_t * nll_t: g_logp holds w_t, so dLoss/dlogp = -w_t
PHASE_FULL, PHASE_STATS, PHASE_GRAD = 0, 1, 2
LOG2E_C = tl.constexpr(LOG2E)  # kernels may read only constexpr globals


@triton.jit
def merge_partial_states(part_ptr, row, plane, n_part, WANT_T: tl.constexpr):
    """One row's softmax state (m, s, t), base 2, from its per-tile partial states (m_j, s_j, t_j), each relative
    to its own max: s = sum_j s_j 2^(m_j - m), t = sum_j 2^(m_j - m) (t_j + s_j (m_j - m)). The m, s and t
    planes are `plane` elements apart, each [C, n_part]."""
    BLOCK: tl.constexpr = 1024
    base = part_ptr + row * n_part
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for j0 in range(0, n_part, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        mx = tl.maximum(mx, tl.load(base + offs, mask=offs < n_part, other=float("-inf")))
    m = tl.max(mx, axis=0)
    s = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    for j0 in range(0, n_part, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        ok = offs < n_part
        mj = tl.load(base + offs, mask=ok, other=float("-inf"))
        w = tl.exp2(mj - m)
        sj = tl.load(base + plane + offs, mask=ok, other=0.0)
        s += w * sj
        if WANT_T:
            tj = tl.load(base + 2 * plane + offs, mask=ok, other=0.0)
            t += tl.where(ok, w * (tj + sj * (mj - m)), 0.0)
    return m, tl.sum(s, axis=0), tl.sum(t, axis=0)


@triton.jit
def store_row_statistics(logp_ptr, lse_ptr, ent_ptr, row, valid, zt2, m, s, t, WANT_ENTROPY: tl.constexpr):
    """Stores a row's log-prob, lse and (WANT_ENTROPY) entropy, natural log, from its softmax state (m, s, t) and its
    target's logit zt2, all base 2 (0 on an ignored row but lse); returns lse, base 2."""
    lse2 = m + tl.log2(s)
    tl.store(logp_ptr + row, tl.where(valid, (zt2 - lse2) * LN2, 0.0))
    tl.store(lse_ptr + row, lse2 * LN2)
    if WANT_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, (tl.log2(s) - t / s) * LN2, 0.0))
    return lse2


@triton.jit
def row_loss_gradient(g_logp_ptr, row, valid, LOSS: tl.constexpr):
    """g = dLoss/dlogp of a row from the coefficient given for LOSS (LOSS_GIVEN: itself, LOSS_NLL: its negative); 0 on
    an ignored row."""
    g = tl.load(g_logp_ptr + row)
    if LOSS != 0:
        g = -g
    return tl.where(valid, g, 0.0)


@triton.jit(do_not_specialize=["ignore_index", "part_plane", "n_part"])
def lmhead_row_grad_kernel(
    z_ptr,  # [C, V] raw logits h W^T, overwritten with dLoss / d(h W^T) (not PHASE_STATS)
    b_ptr,  # [V] or dummy
    tgt_ptr,  # [C] int64
    g_logp_ptr,  # [C] fp32, see LOSS_*
    g_ent_ptr,  # [C] fp32 upstream gradient of entropy (GRAD_ENTROPY)
    logp_ptr,  # [C] fp32 out (in PHASE_GRAD: unused)
    ent_ptr,  # [C] fp32 out (WANT_ENTROPY); in PHASE_GRAD the entropy in (GRAD_ENTROPY)
    lse_ptr,  # [C] fp32 out; in PHASE_GRAD the log-sum-exp in
    part_ptr,  # [3, C, n_part] fp32 partial states (m, s, t) per vocabulary tile (FROM_PARTIALS) or dummy
    part_plane,  # C * n_part
    n_part,
    V,
    stride_z,
    scale_log2,  # log2(e) / temperature
    inv_temp,
    ignore_index,
    LOSS: tl.constexpr,
    PHASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    FROM_PARTIALS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index

    if PHASE == 2:
        lse2 = tl.load(lse_ptr + row) * LOG2E_C
        ez2 = lse2  # E_p[z] in base 2 (only read when GRAD_ENTROPY)
        if GRAD_ENTROPY:
            ez2 = lse2 - tl.load(ent_ptr + row) * LOG2E_C
    else:
        safe_tgt = tl.where(valid, tgt, 0)
        if FROM_PARTIALS:
            m, s, t = merge_partial_states(part_ptr, row, part_plane, n_part, WANT_ENTROPY or GRAD_ENTROPY)
        else:
            m, s, t = row_softmax_state(z_row, b_ptr, V, scale_log2, HAS_BIAS, WANT_ENTROPY or GRAD_ENTROPY,
                                        BLOCK_V)  # fmt: skip
        ez2 = m + t / s  # E_p[z], base 2
        z_t = tl.load(z_row + safe_tgt).to(tl.float32)
        if HAS_BIAS:
            z_t += tl.load(b_ptr + safe_tgt).to(tl.float32)
        lse2 = store_row_statistics(logp_ptr, lse_ptr, ent_ptr, row, valid, z_t * scale_log2, m, s, t, WANT_ENTROPY)

    if PHASE != 1:
        g = row_loss_gradient(g_logp_ptr, row, valid, LOSS)
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
                dz += g_ent * p * (ez2 - z) * LN2
            tl.store(z_row + offs, (dz * inv_temp).to(z_ptr.dtype.element_ty), mask=mask)


def row_vectors(count: int, rows: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """`count` fp32 [rows] vectors from one allocation, each starting on a 64-byte boundary whatever `rows` is. Triton
    specialises a pointer on 16-byte alignment: planes rows * 4 bytes apart would have each kernel given them compile
    again whenever a batch's token count changes its remainder mod 4 (a packed batch's count changes every step)."""
    plane = triton.cdiv(rows, 16) * 16
    return torch.empty((count, plane), device=device, dtype=torch.float32)[:, :rows].unbind(0)


def _row_outputs(c: int, device: torch.device, want_entropy: bool, phase: int, stats):
    """(logp, entropy or None, lse) of a launcher: `stats` as given in PHASE_GRAD, else new [C] fp32 tensors."""
    if phase == PHASE_GRAD:
        return stats
    logp = torch.empty(c, device=device, dtype=torch.float32)
    return logp, (torch.empty_like(logp) if want_entropy else None), torch.empty_like(logp)


def lmhead_row_grad(
    z: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    loss: int,
    want_entropy: bool,
    phase: int = PHASE_FULL,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    partials: torch.Tensor | None = None,
):
    """Host launcher on z [C, V]; returns (logp [C], entropy [C] or None, lse [C]), fp32.

    PHASE_FULL: statistics and dz in place. PHASE_STATS: statistics only (z untouched; g_logp / g_ent unused).
    PHASE_GRAD: dz in place from `stats` = (logp, entropy or None, lse) of an earlier PHASE_STATS launch (entropy
    needed when g_ent is given), which are returned as they are.
    partials: [3, C, tiles] fp32 partial softmax states of the rows (`triton_gemm.head_gemm_stats`), read instead
    of a statistics pass over z (bias-free; PHASE_FULL and PHASE_STATS).
    """
    c, v = z.shape
    assert partials is None or (partials.is_contiguous() and partials.shape[1] == c and bias is None)
    logp, ent, lse = _row_outputs(c, z.device, want_entropy, phase, stats)
    dummy = logp
    lmhead_row_grad_kernel[(c,)](
        z, bias if bias is not None else z, targets, g_logp if g_logp is not None else dummy,
        g_ent if g_ent is not None else dummy, logp, ent if ent is not None else dummy, lse,
        partials if partials is not None else dummy, 0 if partials is None else partials.stride(0),
        0 if partials is None else partials.shape[2], v, z.stride(0), LOG2E / temperature, 1.0 / temperature,
        ignore_index,
        LOSS=loss, PHASE=phase, HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy and phase != PHASE_GRAD,
        GRAD_ENTROPY=g_ent is not None and phase != PHASE_STATS, FROM_PARTIALS=partials is not None,
        BLOCK_V=128 if INTERPRET else 4096, num_warps=1 if INTERPRET else 16,
    )  # fmt: skip
    return logp, (ent if want_entropy else None), lse


# The scaled gradient path (`chunked.py`): the head GEMM stores P = 2^(z - mref) per row (`triton_gemm`, STORE_P) with
# mref = the target's logit + SCALE_REF_LOG2 (base 2, logits / temperature), known before the GEMM. For a row whose
# lse2 - mref <= P_MAX_LOG2 (its NLL at most SCALE_REF_LOG2 + P_MAX_LOG2 bits: 96, i.e. 66.5 nats), no entry of P
# was capped and dLoss/dz = alpha P + beta onehot(y) exactly, with alpha = -g 2^(mref - lse2) / temperature, P's
# target entry set to 0 and beta = g (1 - p_y) / temperature. The target's term, each row's largest, is kept out of
# the bf16 GEMMs: the engine adds it in fp32 beside them (dh_r += beta_r W_y, dW_y += beta_r h_r: `scale_rows`,
# `add_target_rows`), so it is rounded once, as the row pass's -1 + p_y is. Every other row (g = 0 on ignored rows
# aside) is listed and `refill` rewrites it from a recomputed logit row: P = p (target entry 0), alpha = -g /
# temperature. P loses nothing of note to underflow: an entry below 2^-126 has p < 2^(SCALE_REF_LOG2 - 126) = 2^-94.
SCALE_REF_LOG2 = 32.0
P_MAX_LOG2 = 64.0  # P <= 2^P_MAX_LOG2: finite in bf16 / fp32, and so are its GEMMs' sums over any vocabulary


@triton.jit(do_not_specialize=["ignore_index"])
def target_logit_kernel(h_ptr, w_ptr, tgt_ptr, out_ptr, H, stride_h, stride_w, scale_log2, ref_log2, ignore_index,
                        BLOCK_H: tl.constexpr):  # fmt: skip
    """out[r] = (h_r . W[y_r]) * scale_log2 + ref_log2, fp32 (W[0] on an ignored row): one program per row."""
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row)
    tgt = tl.where(tgt != ignore_index, tgt, 0).to(tl.int64)
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs = k0 + tl.arange(0, BLOCK_H)
        ok = offs < H
        hv = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
        acc += hv * tl.load(w_ptr + tgt * stride_w + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, tl.sum(acc, axis=0) * scale_log2 + ref_log2)


@triton.jit(do_not_specialize=["ignore_index", "part_plane", "n_part"])
def lmhead_row_scale_kernel(
    p_ptr,  # [C, V] P = 2^(z - mref) from the head GEMM; the target entry is rewritten (PHASE_FULL / PHASE_GRAD)
    tgt_ptr,  # [C] int64
    mref_ptr,  # [C] fp32: the target's logit + SCALE_REF_LOG2, base 2
    g_logp_ptr,  # [C] fp32, see LOSS_*
    logp_ptr,  # [C] fp32 out (not PHASE_GRAD)
    ent_ptr,  # [C] fp32 out (WANT_ENTROPY)
    lse_ptr,  # [C] fp32 out; in PHASE_GRAD the log-sum-exp in
    alpha_ptr,  # [C] fp32 out (not PHASE_STATS): dLoss/dz = alpha P + beta onehot(y) ...
    beta_ptr,  # [C] fp32 out (not PHASE_STATS): ... (0 on ignored rows)
    list_ptr,  # [C] int32 out: the rows `refill` must rewrite, in any order ...
    count_ptr,  # [1] int32 (zeroed by the caller): ... and their number
    part_ptr,  # [3, C, n_part] fp32 partial states (m, s, t) of the head GEMM
    part_plane,
    n_part,
    stride_p,
    inv_temp,
    ignore_index,
    LOSS: tl.constexpr,
    PHASE: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    REF_LOG2: tl.constexpr,
    MAX_LOG2: tl.constexpr,
):
    """The row epilogue of the scaled path: statistics from the partials (as `lmhead_row_grad_kernel` with
    FROM_PARTIALS), then alpha, beta and P's target entry (0), or the row listed for `refill`. No pass over the row."""
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    mref = tl.load(mref_ptr + row)
    zt2 = mref - REF_LOG2
    if PHASE == 2:
        lse2 = tl.load(lse_ptr + row) * LOG2E_C
    else:
        m, s, t = merge_partial_states(part_ptr, row, part_plane, n_part, WANT_ENTROPY)
        lse2 = store_row_statistics(logp_ptr, lse_ptr, ent_ptr, row, valid, zt2, m, s, t, WANT_ENTROPY)
    if PHASE != 1:
        g = row_loss_gradient(g_logp_ptr, row, valid, LOSS) * inv_temp
        up = lse2 - mref  # P = p 2^up
        fits = up <= MAX_LOG2
        tl.store(alpha_ptr + row, tl.where(fits, -g * tl.exp2(-up), -g))
        tl.store(beta_ptr + row, g * (1.0 - tl.exp2(zt2 - lse2)))
        if valid:
            if fits:
                tl.store(p_ptr + row * stride_p + tgt, tl.zeros([], p_ptr.dtype.element_ty))
            else:
                tl.store(list_ptr + tl.atomic_add(count_ptr, 1), row.to(tl.int32))


@triton.jit
def lmhead_row_refill_kernel(p_ptr, h_ptr, w_ptr, tgt_ptr, lse_ptr, list_ptr, count_ptr, V, H, stride_p, stride_h,
                             stride_w, scale_log2, NUM_PROGS: tl.constexpr, BLOCK_V: tl.constexpr,
                             BLOCK_H: tl.constexpr):  # fmt: skip
    """Rewrites each listed row of P as p (its target entry 0) from its logits recomputed in fp32 (h_r . W_v): the
    rows whose NLL is beyond the scaled form's range. Work items (row, vocabulary block) stride over NUM_PROGS
    programs; with no row listed the launch returns at once."""
    n_vb = tl.cdiv(V, BLOCK_V)
    total = tl.load(count_ptr) * n_vb
    for item in range(tl.program_id(0), total, NUM_PROGS):
        row = tl.load(list_ptr + item // n_vb).to(tl.int64)
        offs_v = (item % n_vb) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        acc = tl.zeros([BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            offs_h = k0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            hv = tl.load(h_ptr + row * stride_h + offs_h, mask=h_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_w + offs_h[None, :],
                         mask=v_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
            acc += tl.sum(wv * hv[None, :], axis=1)
        p = tl.exp2(acc * scale_log2 - tl.load(lse_ptr + row) * LOG2E_C)
        p = tl.where(offs_v == tl.load(tgt_ptr + row), 0.0, p)
        tl.store(p_ptr + row * stride_p + offs_v, p.to(p_ptr.dtype.element_ty), mask=v_ok)


@triton.jit
def scale_rows_kernel(x_ptr, alpha_ptr, out_ptr, beta_ptr, w_ptr, y_ptr, H, stride_x, stride_o, stride_w,
                      HAS_TARGET: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """out[r] = x[r] alpha[r] (+ beta[r] W[y_r] where HAS_TARGET and y_r >= 0), in fp32, rounded once to out's
    dtype: one program per (row, block of H)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    out = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(alpha_ptr + row)
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        wv = tl.load(w_ptr + tl.maximum(y, 0).to(tl.int64) * stride_w + offs, mask=ok & (y >= 0), other=0.0)
        out += tl.load(beta_ptr + row) * wv.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["C"])  # the token count: one compile for all (tests/test_linear_logprob.py)
def add_target_rows_kernel(dw_ptr, h_ptr, beta_ptr, key_ptr, order_ptr, C, H, stride_dw, stride_h,
                           BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """dw[d] += sum of beta_r h_r over the rows r whose target is d, summed in fp32 and rounded to dw's dtype once
    per destination d. key: the rows' targets sorted (-1: none), order: the rows in that order. One program per
    sorted position: the first position of each target's run measures the run (its keys, BLOCK_R at a time), then
    sums it row by row over each block of H; the others return at once. A row at a time keeps the registers to one
    [BLOCK_H] vector: almost every run is one row long."""
    i = tl.program_id(0)
    d = tl.load(key_ptr + i)
    prev = tl.load(key_ptr + i - 1, mask=i > 0, other=-1)
    if (d >= 0) & (d != prev):
        n = tl.zeros([], tl.int32)
        n_same = tl.full([], BLOCK_R, tl.int32)
        while n_same == BLOCK_R:  # the run is sorted together: a prefix of each block, until one ends inside
            offs_r = i + n + tl.arange(0, BLOCK_R)
            n_same = tl.sum((tl.load(key_ptr + offs_r, mask=offs_r < C, other=-1) == d).to(tl.int32), axis=0)
            n += n_same
        dst_row = dw_ptr + d.to(tl.int64) * stride_dw
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            acc = tl.zeros([BLOCK_H], tl.float32)
            for k in range(0, n):
                row = tl.load(order_ptr + i + k)
                hv = tl.load(h_ptr + row * stride_h + offs_h, mask=h_ok, other=0.0)
                acc += tl.load(beta_ptr + row) * hv.to(tl.float32)
            old = tl.load(dst_row + offs_h, mask=h_ok, other=0.0).to(tl.float32)
            tl.store(dst_row + offs_h, (old + acc).to(dw_ptr.dtype.element_ty), mask=h_ok)


def scale_rows(x: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor | None = None, target=None) -> torch.Tensor:
    """out [C, H] = x alpha[:, None] (+ beta[:, None] W[y] with target = (beta, weight, y), y < 0: no term), in fp32,
    rounded once to out's dtype (default: x's). The scaled path's dW operand alpha h and its dh = alpha (P W) + beta
    W_y from P W in fp32."""
    c, h = x.shape
    out = torch.empty_like(x) if out is None else out
    assert x.stride(1) == 1 and out.stride(1) == 1 and out.shape == x.shape
    beta, weight, y = target if target is not None else (alpha, x, alpha)
    block = 64 if INTERPRET else 1024
    scale_rows_kernel[(c, triton.cdiv(h, block))](x, alpha, out, beta, weight, y, h, x.stride(0), out.stride(0),
                                                 weight.stride(0), HAS_TARGET=target is not None, BLOCK_H=block,
                                                 num_warps=1 if INTERPRET else 4)  # fmt: skip
    return out


def add_target_rows(dw: torch.Tensor, y: torch.Tensor, hidden: torch.Tensor, beta: torch.Tensor) -> None:
    """dw[y_r] += beta_r h_r for every row r with y_r >= 0, in place (the scaled path's target term of dW): each
    destination row is summed in fp32 and rounded to dw's dtype once, however often y repeats it; the same sums in the
    same order every call (no atomics)."""
    c, h = hidden.shape
    assert hidden.stride(1) == 1 and dw.stride(1) == 1 and dw.shape[1] == h and y.shape == beta.shape == (c,)
    key, order = torch.sort(y, stable=True)
    block_r, block_h = (4, 64) if INTERPRET else (32, 1024)
    add_target_rows_kernel[(c,)](dw, hidden, beta, key, order, c, h, dw.stride(0), hidden.stride(0), BLOCK_R=block_r,
                                 BLOCK_H=block_h, num_warps=1 if INTERPRET else 4)  # fmt: skip


def target_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                  ignore_index: int) -> torch.Tensor:  # fmt: skip
    """mref [C] fp32 of the scaled path: each row's target logit (base 2, / temperature) + SCALE_REF_LOG2."""
    c, h = hidden.shape
    out = torch.empty(c, device=hidden.device, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(h))
    target_logit_kernel[(c,)](hidden, weight, targets, out, h, hidden.stride(0), weight.stride(0),
                              LOG2E / temperature, SCALE_REF_LOG2, ignore_index, BLOCK_H=block,
                              num_warps=1 if INTERPRET else 4)  # fmt: skip
    return out


def lmhead_row_scale(p: torch.Tensor, targets: torch.Tensor, mref: torch.Tensor, partials: torch.Tensor,
                     g_logp: torch.Tensor | None, temperature: float, ignore_index: int, loss: int,
                     want_entropy: bool, phase: int = PHASE_FULL, stats=None, refill=None):  # fmt: skip
    """Host launcher of the scaled path's row epilogue on P [C, V] (from `triton_gemm.head_gemm_stats` with mref).

    Returns (logp [C], entropy [C] or None, lse [C], alpha [C] or None, beta [C] or None), fp32. PHASE_STATS:
    statistics only (alpha, beta None); PHASE_GRAD: alpha, beta and P's target entries from `stats` = (logp, entropy
    or None, lse) of a PHASE_STATS launch. Not PHASE_STATS, `refill` = (hidden [C, H], weight [V, H]) of the chunk:
    the rows beyond the scaled form's range are rewritten from them (no launch does anything when there are none, the
    usual case).
    """
    c, v = p.shape
    assert partials.is_contiguous() and partials.shape[1] == c
    logp, ent, lse = _row_outputs(c, p.device, want_entropy, phase, stats)
    alpha = beta = None
    listed = count = logp  # (read only outside PHASE_STATS)
    if phase != PHASE_STATS:
        alpha, beta = row_vectors(2, c, p.device)
        listed = torch.empty(c, device=p.device, dtype=torch.int32)
        count = torch.zeros(1, device=p.device, dtype=torch.int32)
    dummy = logp
    lmhead_row_scale_kernel[(c,)](
        p, targets, mref, g_logp if g_logp is not None else dummy, logp, ent if ent is not None else dummy, lse,
        alpha if alpha is not None else dummy, beta if beta is not None else dummy, listed, count, partials,
        partials.stride(0), partials.shape[2], p.stride(0), 1.0 / temperature, ignore_index, LOSS=loss, PHASE=phase,
        WANT_ENTROPY=want_entropy and phase != PHASE_GRAD, REF_LOG2=SCALE_REF_LOG2, MAX_LOG2=P_MAX_LOG2,
        num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    if alpha is not None:
        hidden, weight = refill
        progs = 4 if INTERPRET else 2 * num_sms(p.device)
        lmhead_row_refill_kernel[(progs,)](
            p, hidden, weight, targets, lse, listed, count, v, hidden.shape[1], p.stride(0), hidden.stride(0),
            weight.stride(0), LOG2E / temperature, NUM_PROGS=progs, BLOCK_V=16 if INTERPRET else 64,
            BLOCK_H=32 if INTERPRET else 256, num_warps=1 if INTERPRET else 4,
        )  # fmt: skip
    return logp, (ent if want_entropy else None), lse, alpha, beta

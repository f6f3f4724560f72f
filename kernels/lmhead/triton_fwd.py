"""Fused LM-head scoring forward: log-prob / NLL / entropy without [N, V] logits in memory.

Each program owns BLOCK_N tokens and one of SPLITS slices of the vocabulary. It walks its slice in BLOCK_V tiles;
every tile is a [BLOCK_N, BLOCK_V] GEMM over H whose result never leaves registers: an online max / sum-exp
(base 2, the running max starts at -inf), the target's logit and, when asked, sum p*z are folded in and the tile
is dropped. A few torch ops then merge the SPLITS partial states per token. Programs are ordered so that the
ones resident together share both their hidden blocks and their weight tiles in L2.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2_F = 0.6931471805599453
LN2 = tl.constexpr(LN2_F)  # for kernels; host code uses LN2_F
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached; 4 elsewhere, e.g. under the interpreter): the size of a
    persistent launch."""
    key = device.index if device.type == "cuda" else -1
    if key not in _NUM_SMS:
        _NUM_SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _NUM_SMS[key]


@triton.jit
def online_softmax_rows(m, s, t, z, valid, WANT_T: tl.constexpr):
    """Fold a [R, B] tile of base-2 logits (invalid lanes -inf) into per-row state: running max m (from -inf),
    s = sum 2^(z - m) and t = sum 2^(z - m) (z - m). t is kept relative to the running max, so the entropy
    log2(s) - t/s carries no cancellation when the logits are large."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp2(m - m_new)
    zc = z - m_new[:, None]
    p = tl.exp2(zc)
    if WANT_T:
        t = alpha * (t + s * tl.where(s > 0, m - m_new, 0.0)) + tl.sum(p * tl.where(valid, zc, 0.0), axis=1)
    s = s * alpha + tl.sum(p, axis=1)
    return m_new, s, t


@triton.jit
def online_softmax_vec(m, s, t, z, valid, WANT_T: tl.constexpr):
    """`online_softmax_rows` for one row held as a [B] vector (scalar state)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    alpha = tl.exp2(m - m_new)
    zc = z - m_new
    p = tl.exp2(zc)
    if WANT_T:
        t = alpha * (t + s * tl.where(s > 0, m - m_new, 0.0)) + tl.sum(p * tl.where(valid, zc, 0.0), axis=0)
    s = s * alpha + tl.sum(p, axis=0)
    return m_new, s, t


@triton.jit
def row_softmax_state(z_row, b_ptr, V, scale_log2, HAS_BIAS: tl.constexpr, WANT_T: tl.constexpr,
                      BLOCK_V: tl.constexpr):  # fmt: skip
    """Stream one row of raw logits (plus bias) in BLOCK_V pieces into its online-softmax state (m, s, t), base 2."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m, s, t = online_softmax_vec(m, s, t, z * scale_log2, mask, WANT_T)
    return m, s, t


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w, num_stages=s)
        for bn, bv, bh, w, s in [
            (128, 256, 64, 8, 3),
            (128, 256, 64, 8, 4),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (256, 128, 64, 8, 3),
            (128, 256, 32, 8, 5),
            (128, 128, 64, 4, 3),
            (128, 128, 64, 8, 3),
            (64, 256, 64, 4, 3),
        ]
    ]


@triton.autotune(configs=_fwd_configs(), key=["V", "H", "WANT_ENTROPY", "HAS_BIAS"])
@triton.jit(do_not_specialize=["N", "ignore_index"])
def linear_logprob_fwd_kernel(
    h_ptr,  # [N, H]
    w_ptr,  # [V, H]
    b_ptr,  # [V] or dummy
    tgt_ptr,  # [N] int64
    m_ptr,  # [SPLITS, N] fp32: running max (base-2 logits)
    s_ptr,  # [SPLITS, N] fp32: sum of 2^(z - m)
    t_ptr,  # [SPLITS, N] fp32: sum of 2^(z - m) * (z - m)
    tz_ptr,  # [SPLITS, N] fp32: target logit (base 2), 0 in the slices that do not hold it
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    scale_log2,  # log2(e) / temperature
    ignore_index,
    v_per_split,
    SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid // SPLITS
    pid_s = pid % SPLITS
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=ignore_index)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    tz = tl.zeros([BLOCK_N], tl.float32)
    offs_k = tl.arange(0, BLOCK_H)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        v_mask = offs_v < v_end
        a_ptrs = h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :]  # [BLOCK_N, BLOCK_H]
        b_ptrs = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_k[:, None]  # [BLOCK_H, BLOCK_V]
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            k_mask = (k0 + offs_k) < H
            a = tl.load(a_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & v_mask[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_H
            b_ptrs += BLOCK_H
        z = acc
        if HAS_BIAS:
            z += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        z = tl.where(v_mask[None, :], z * scale_log2, float("-inf"))  # [BLOCK_N, BLOCK_V], base-2 logits
        tz += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        m, s, t = online_softmax_rows(m, s, t, z, v_mask[None, :], WANT_ENTROPY)

    out = pid_s * N + offs_n
    tl.store(m_ptr + out, m, mask=n_mask)
    tl.store(s_ptr + out, s, mask=n_mask)
    tl.store(t_ptr + out, t, mask=n_mask)
    tl.store(tz_ptr + out, tz, mask=n_mask)


def default_splits(n_tokens: int, vocab: int) -> int:
    """Vocabulary slices per token block: enough programs to fill the GPU, and a group of co-resident programs
    that shares both hidden blocks and weight tiles. Depends on the model dims only (no recompiles per N)."""
    return max(1, min(16, vocab // 4096))


def linear_logprob_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    want_entropy: bool,
    splits: int | None = None,
):
    """Host launcher. Returns (logp [N], lse [N], entropy [N] or None), fp32, natural log."""
    n, h = hidden.shape
    v = weight.shape[0]
    splits = splits or default_splits(n, v)
    v_per_split = triton.cdiv(triton.cdiv(v, splits), 256) * 256
    parts = torch.empty((4, splits, n), device=hidden.device, dtype=torch.float32)
    m, s, t, tz = parts.unbind(0)
    dot_fp32 = INTERPRET or (hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)
    linear_logprob_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        m, s, t, tz,
        n, v, h, hidden.stride(0), weight.stride(0),
        LOG2E / temperature, ignore_index, v_per_split,
        SPLITS=splits, HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, DOT_FP32=dot_fp32,
    )  # fmt: skip
    return combine_partials(m, s, t, tz, targets, ignore_index, want_entropy)


def combine_partials(m, s, t, tz, targets, ignore_index, want_entropy):
    """Merge per-slice online-softmax states [SPLITS, N] (base 2; t relative to each slice's max) into natural-log
    lse, logp and entropy [N]."""
    m_all = m.amax(0)  # [N]
    w = torch.exp2(m - m_all)  # [SPLITS, N]; 0 for an empty slice (m = -inf)
    s_all = (s * w).sum(0)
    lse2 = m_all + torch.log2(s_all)
    valid = targets != ignore_index
    logp = torch.where(valid, (tz.sum(0) - lse2) * LN2_F, 0.0)
    entropy = None
    if want_entropy:
        shift = torch.where(s > 0, m - m_all, 0.0)
        t_all = (w * (t + s * shift)).sum(0)  # sum 2^(z - m_all) (z - m_all)
        entropy = torch.where(valid, (torch.log2(s_all) - t_all / s_all) * LN2_F, 0.0)
    return logp, lse2 * LN2_F, entropy


"""The head GEMM of a chunk with the softmax statistics in its epilogue (Triton, persistent, TMA).

z = h_c W^T is written to the chunk's workspace as the bf16/fp16 GEMM output, as cuBLAS would; while each [BM, BN]
output tile is still in registers the epilogue folds it (as rounded to z's dtype, the values the gradient pass will
read) into per-row partial softmax states of that vocabulary tile: max m, s = sum 2^(z - m), t = sum 2^(z - m)(z - m)
(base 2, z scaled by log2(e) / temperature). The row kernel (`triton_rows.py`, `partials=`) merges a row's
partials into its lse and entropy, so it reads and writes the chunk once instead of reading it twice.

With `mref` (STORE_P: the engine's scaled gradient path, `chunked.py`), the tile is stored as P = 2^(z - mref) per
row instead of z, computed from the fp32 accumulator (as are then the partials), with the exponent capped at
P_MAX_LOG2: for a row whose log-sum-exp is within P_MAX_LOG2 of mref, the gradient dz is a per-row multiple of P
plus the target's term (P's target entry zeroed afterwards, the term added beside the GEMMs), so the dh / dW GEMMs
can read P as it is and no row pass rewrites it (`triton_rows.lmhead_row_scale`).

Without gradients z need not be stored at all: the epilogue also picks the target's logit out of the one tile that
holds it, and `linear_logprob_epilogue_fwd` (the "epilogue" forward schedule) merges the partials of each chunk of
rows with a small kernel. Its only memory is the partials: 12 bytes per row and vocabulary tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings
from .triton_fwd import INTERPRET, LOG2E, combine_partials, num_sms
from .triton_rows import P_MAX_LOG2, merge_partial_states, row_vectors

try:  # Triton >= 3.3 host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the fused GEMM is simply never eligible
    TensorDescriptor = None


STORE_NONE, STORE_Z, STORE_P = 0, 1, 2  # what the head GEMM writes besides the partials (see head_gemm_stats)
P_MAX_LOG2_C = tl.constexpr(P_MAX_LOG2)  # STORE_P caps P at 2^P_MAX_LOG2 (triton_rows.py)


def interpreter_config(epi_split: int) -> triton.Config:
    """The config of CPU runs: small tiles, the epilogue in `epi_split` pieces."""
    return triton.Config({"BM": 16, "BN": 32, "BK": 16, "GROUP_M": 2, "EPI_SPLIT": epi_split}, num_warps=4,
                         num_stages=1)  # fmt: skip


# The tile configs `python -m vibeperf.bench.lmhead_passes --configs` times, alone and in both uses (P stored for
# training, statistics only for scoring). The first is the one every call runs (CONFIG): on an H200 it was the fastest
# or within 0.1% of it at both heads (Qwen2.5, Llama-3), at 8K and 64K tokens, in both uses. No autotuning: Triton's
# autotuner times each config once, on a GPU whose clock follows its power draw, and in the same run it picked configs
# 2-4% slower at the Llama-3 head, and could pick another in the next run (benchmarks/NOTES.md).
CANDIDATES = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "EPI_SPLIT": e}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s, e in [
        (128, 256, 64, 8, 3, 2),
        (128, 256, 64, 8, 3, 1),
        (128, 256, 64, 8, 4, 2),
        (128, 128, 64, 8, 4, 1),
        (128, 128, 64, 4, 4, 1),
        (128, 128, 64, 4, 5, 2),
        (256, 128, 64, 8, 3, 2),
    ]
]
CONFIG = interpreter_config(2) if INTERPRET else CANDIDATES[0]


@triton.jit(do_not_specialize=["C"])
def head_gemm_stats_kernel(
    h_desc,  # [C, H] block [BM, BK]
    w_desc,  # [V, H] block [BN, BK]
    z_desc,  # [C, V] z written (STORE_Z, block [BM, BN / EPI_SPLIT]); else a dummy
    part_ptr,  # [3, C, n_tiles] fp32 out: m, s, t per row and vocabulary tile
    tgt_ptr,  # [C] int64 (not STORE_Z)
    tz_ptr,  # [C] fp32 out (STORE_NONE): the target's logit, base 2, written by the tile that holds it
    mref_ptr,  # [C] fp32 (STORE_P): the rows' reference, base 2; P = 2^(z - mref), exponent capped at P_MAX_LOG2
    C,
    V,
    H,
    scale_log2,
    NUM_PROGS: tl.constexpr,
    WANT_T: tl.constexpr,
    STORE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):
    num_m = tl.cdiv(C, BM)
    num_n = tl.cdiv(V, BN)
    num_tiles = num_m * num_n
    k_tiles = tl.cdiv(H, BK)
    per_group = GROUP_M * num_n
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=True):
        group = tile // per_group
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = (tile % per_group) // size_m
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = h_desc.load([off_m, ki * BK])
            b = w_desc.load([off_n, ki * BK])
            acc = tl.dot(a, b.T, acc)
        # Epilogue: the tile's partial softmax state per row, from the values as stored, in EPI_SPLIT column pieces
        # (fewer live registers), merged into one state per row and tile.
        rows = off_m + tl.arange(0, BM)
        row_ok = rows < C
        tgt = rows  # (read only by STORE_NONE)
        if STORE == 0:
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        mref = tl.zeros((BM,), tl.float32)  # (read only by STORE_P)
        if STORE == 2:
            mref = tl.load(mref_ptr + rows, mask=row_ok, other=0.0)
        if EPI_SPLIT == 1:
            m, s, t = _store_piece(z_desc, acc, off_m, off_n, V, scale_log2, WANT_T, STORE, tgt, tz_ptr + rows,
                                   row_ok, mref)  # fmt: skip
        else:
            a0, a1 = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)).split()
            m0, s0, t0 = _store_piece(z_desc, a0, off_m, off_n, V, scale_log2, WANT_T, STORE, tgt, tz_ptr + rows,
                                      row_ok, mref)  # fmt: skip
            m1, s1, t1 = _store_piece(z_desc, a1, off_m, off_n + BN // 2, V, scale_log2, WANT_T, STORE, tgt,
                                      tz_ptr + rows, row_ok, mref)  # fmt: skip
            m = tl.maximum(m0, m1)
            w0 = tl.exp2(m0 - m)
            w1 = tl.exp2(m1 - m)
            s = s0 * w0 + s1 * w1
            t = w0 * (t0 + s0 * (m0 - m)) + tl.where(s1 > 0, w1 * (t1 + s1 * (m1 - m)), 0.0)  # piece 1 may be empty
        base = rows.to(tl.int64) * num_n + pid_n
        tl.store(part_ptr + base, m, mask=row_ok)
        tl.store(part_ptr + C * num_n + base, s, mask=row_ok)
        if WANT_T:
            tl.store(part_ptr + 2 * C * num_n + base, t, mask=row_ok)


@triton.jit
def _store_piece(z_desc, acc, off_m, off_n, V, scale_log2, WANT_T: tl.constexpr, STORE: tl.constexpr, tgt,
                 tz_ptrs, row_ok, mref):  # fmt: skip
    """Store a [BM, B] piece at (off_m, off_n) in z's dtype (STORE_Z), or P = 2^(z - mref) (STORE_P), or else write
    the logit of each row whose target falls in the piece to tz_ptrs.
    Returns its rows' softmax state (m, s, t), base 2, over the columns < V (m = -inf, s = 0 for a piece wholly past
    V), from the values rounded to z's dtype (from the fp32 values for STORE_P, whose P is formed from them)."""
    cols = off_n + tl.arange(0, acc.shape[1])
    if STORE == 2:
        zs = tl.where(cols[None, :] < V, acc * scale_log2, float("-inf"))
    else:
        zq = acc.to(z_desc.dtype)
        zs = tl.where(cols[None, :] < V, zq.to(tl.float32) * scale_log2, float("-inf"))
        if STORE == 1:
            z_desc.store([off_m, off_n], zq)
        else:
            hit = row_ok & (tgt >= off_n) & (tgt < off_n + acc.shape[1])
            tl.store(tz_ptrs, tl.sum(tl.where(cols[None, :] == tgt[:, None], zs, 0.0), axis=1), mask=hit)
    m = tl.max(zs, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a second piece wholly past V
    zc = zs - m_safe[:, None]
    p = tl.exp2(zc)
    s = tl.sum(p, axis=1)
    t = s
    if WANT_T:
        t = tl.sum(p * tl.where(cols[None, :] < V, zc, 0.0), axis=1)
    if STORE == 2:  # 2^(z - mref) = p 2^(m - mref), the exponent capped (only rows the gradient pass refills reach it)
        up = tl.exp2(tl.minimum(m_safe - mref, P_MAX_LOG2_C))
        z_desc.store([off_m, off_n], (p * up[:, None]).to(z_desc.dtype))
    return m, s, t


def eligible(bias, hidden: torch.Tensor, *more: torch.Tensor) -> bool:
    """Whether the fused GEMM can run on these [rows, cols] operands (hidden, weight, the z workspace): CUDA (or the
    interpreter), bf16/fp16 (fp32 would run TF32, not the exact product the engine promises; the interpreter runs
    fp32 and fp16 but no bf16 dot), no bias, TMA-aligned strides."""
    if TensorDescriptor is None or bias is not None:
        return False
    if not (hidden.is_cuda or INTERPRET):
        return False
    if hidden.dtype not in ((torch.float32, torch.float16) if INTERPRET else (torch.bfloat16, torch.float16)):
        return False
    es = hidden.element_size()
    return all(t.stride(-1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (hidden, *more))  # fmt: skip


def head_gemm_stats(h_c: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, temperature: float,
                    want_t: bool, targets: torch.Tensor | None = None, tz: torch.Tensor | None = None,
                    mref: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:  # fmt: skip
    """z[:] = h_c @ weight.T (in z's dtype); returns the rows' partial softmax states [3, C, tiles] (m, s and, when
    want_t (entropy), t; base 2, logits / temperature). z None: nothing stored; the targets' logits (base 2) go to
    tz [C] fp32 instead (rows whose target is not in [0, V) keep what tz held). mref [C] fp32 (base 2): z[:] =
    2^(logits - mref) instead of the logits, capped at 2^P_MAX_LOG2 (STORE_P). config: the tiles (None: CONFIG)."""
    cfg = config or CONFIG
    bm, bn, bk, split = (cfg.kwargs[k] for k in ("BM", "BN", "BK", "EPI_SPLIT"))
    c, h = h_c.shape
    v = weight.shape[0]
    dev = h_c.device
    h_desc = TensorDescriptor(h_c, h_c.shape, h_c.stride(), [bm, bk])
    w_desc = TensorDescriptor(weight, weight.shape, weight.stride(), [bn, bk])
    if z is None:  # an unused descriptor, for the signature
        z = torch.empty((1, 16), device=dev, dtype=h_c.dtype)
        store = STORE_NONE
    else:
        store = STORE_Z if mref is None else STORE_P
        targets = tz = h_c  # unused
    if mref is None:
        mref = h_c  # unused
    z_desc = TensorDescriptor(z, z.shape, z.stride(), [bm, bn // split])
    n_tiles = triton.cdiv(v, bn)
    part = torch.empty((3, c, n_tiles), device=dev, dtype=torch.float32)
    progs = num_sms(dev)  # the tile loop's stride, a constant; the grid is smaller when there are fewer tiles
    head_gemm_stats_kernel[(min(progs, triton.cdiv(c, bm) * n_tiles),)](
        h_desc, w_desc, z_desc, part, targets, tz, mref, c, v, h, LOG2E / temperature, NUM_PROGS=progs,
        WANT_T=want_t, STORE=store, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return part


@triton.jit(do_not_specialize=["part_plane", "n_part"])  # sizes that follow the token count: one compile for all
def merge_rows_kernel(part_ptr, part_plane, n_part, m_ptr, s_ptr, t_ptr, WANT_T: tl.constexpr):
    """One program per row: its per-tile partial states merged into one (m, s, t), base 2."""
    row = tl.program_id(0).to(tl.int64)
    m, s, t = merge_partial_states(part_ptr, row, part_plane, n_part, WANT_T)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    if WANT_T:
        tl.store(t_ptr + row, t)


def row_statistics(part: torch.Tensor, tz: torch.Tensor, targets: torch.Tensor, ignore_index: int, want_t: bool):
    """(logp, lse, entropy or None) [C] fp32, natural log, of rows from their partial states [3, C, tiles] and
    their targets' logits tz [C] (base 2): one merge launch, then `combine_partials` on [C] vectors."""
    m, s, t = (x[None] for x in row_vectors(3, part.shape[1], part.device))
    merge_rows_kernel[(part.shape[1],)](part, part.stride(0), part.shape[2], m, s, t, WANT_T=want_t,
                                        num_warps=1 if INTERPRET else 4)  # fmt: skip
    return combine_partials(m, s, t, tz[None], targets, ignore_index, want_t)


def epilogue_chunk_rows(n: int, vocab: int, budget_bytes: int | None = None) -> int:
    """Rows per chunk of the "epilogue" forward: their partials (12 bytes per row and tile, tiles of at least 128
    columns) fit `budget_bytes` (None: $VIBEPERF_LMHEAD_EPILOGUE_MB, 64 MiB); a multiple of 128, at least 128."""
    budget = settings.workspace(budget_bytes, settings.EPILOGUE_ENV)
    rows = max(128, budget // (12 * triton.cdiv(vocab, 128)) // 128 * 128)
    return max(1, min(rows, n))


def linear_logprob_epilogue_fwd(hidden, weight, targets, bias, temperature, ignore_index, want_entropy,
                                workspace_bytes: int | None = None):  # fmt: skip
    """The "epilogue" forward schedule (bias-free, `eligible` inputs): per chunk of rows, the head GEMM folds its
    tiles into partial softmax states and the targets' logits, never storing a logit; then one small merge launch.
    Returns (logp [N], lse [N], entropy [N] or None), fp32."""
    assert bias is None
    n = hidden.shape[0]
    logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else None
    chunk = epilogue_chunk_rows(n, weight.shape[0], workspace_bytes)
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        tz = torch.zeros(n1 - n0, device=hidden.device, dtype=torch.float32)
        part = head_gemm_stats(hidden[n0:n1], weight, None, temperature, want_entropy, targets[n0:n1], tz)
        logp[n0:n1], lse[n0:n1], en = row_statistics(part, tz, targets[n0:n1], ignore_index, want_entropy)
        if want_entropy:
            ent[n0:n1] = en
        part = None  # freed before the next chunk's partials are allocated: one chunk's worth alive at a time
    return logp, lse, ent

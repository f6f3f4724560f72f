"""The dh and dW GEMMs of a chunk that form dz as they load it: no row pass over the chunk (experimental).

The head GEMM (`triton_gemm.head_gemm_stats(..., store_p=True)`) writes P[r, v] = 2^(z[r, v] - m[r, j]), each row
relative to its max over its tile j of TW columns, and the tiles' partial states. With g_r = dLoss/dlogp of row r,
its log-sum-exp lse_r (base 2) and 1/temperature folded into g_r:

    dz[r, v] = g_r onehot(v = y_r) + S[r, j(v)] P[r, v],      S[r, j] = -g_r 2^(m[r, j] - lse_r)

so dz is P scaled per (row, tile) plus a one-hot. These kernels scale each P tile in registers as it is loaded
(one multiply per element, no exp) and feed it to the MMA:
- `dz_dh_kernel`: dh = (S . P) W, split over the vocabulary (K) with fp32 atomic adds;
- `dz_dw_kernel`: dW (+)= (S . P)^T h, fp32, read-modify-write of the accumulator in the epilogue;
and the one-hot part is added by `dz_grads` as a gather (dh += g W[y]) and a scatter-add (dW[y] += g h). The
atomic adds and the scatter-add make dh and dW reproducible only to rounding (the default engine is deterministic).
Used by the chunked engine when `chunked.BWD_GEMM == "triton"` (bias-free, no entropy gradient); the default is
cuBLAS after the row pass until a GPU run shows this one faster (`vibeperf.bench.lmhead_passes --train-only`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import INTERPRET
from .triton_gemm import TensorDescriptor


def _dh_boxes(nargs):
    """Config pre-hooks: the TMA boxes are the config's tiles (P [BM, BK] and W [BK, BN]; P [BK, BM] and h [BK, BN])."""
    nargs["p_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["w_desc"].block_shape = [nargs["BK"], nargs["BN"]]


def _dw_boxes(nargs):
    nargs["p_desc"].block_shape = [nargs["BK"], nargs["BM"]]
    nargs["h_desc"].block_shape = [nargs["BK"], nargs["BN"]]


def _dh_configs():
    """Tiles of the dh GEMM; BK divides every P tile width (128 or 256; 32 in the interpreter)."""
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 32, "BK": 16, "SPLIT_K": 3}, num_warps=4, num_stages=1,
                              pre_hook=_dh_boxes)]  # fmt: skip
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": sk}, num_warps=w, num_stages=st, pre_hook=_dh_boxes)
        for bm, bn, bk, sk, w, st in [
            (128, 128, 64, 4, 8, 3),
            (128, 256, 64, 4, 8, 3),
            (128, 128, 64, 2, 8, 4),
            (128, 128, 64, 8, 8, 3),
            (64, 128, 64, 4, 4, 4),
            (128, 256, 64, 2, 8, 3),
        ]
    ]


def _dw_configs():
    """Tiles of the dW GEMM; BM divides every P tile width."""
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 32, "BK": 16}, num_warps=4, num_stages=1, pre_hook=_dw_boxes)]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st, pre_hook=_dw_boxes)
        for bm, bn, bk, w, st in [
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (128, 128, 64, 4, 4),
            (64, 256, 64, 4, 4),
            (128, 128, 128, 8, 3),
        ]
    ]


# Autotuning reruns a launch: the atomically added dh starts from zero for each, the accumulated dW is restored.
@triton.autotune(configs=_dh_configs(), key=["V", "H", "TW"], reset_to_zero=["dh_ptr"])
@triton.jit(do_not_specialize=["C", "V", "H", "n_tiles"])
def dz_dh_kernel(
    p_desc,  # [C, V] P, block [BM, BK]
    w_desc,  # [V, H] weight, block [BK, BN]
    s_ptr,  # [C, n_tiles] fp32 scales S
    dh_ptr,  # [C, H] fp32, atomically added to
    C,
    V,
    H,
    n_tiles,
    TW: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    off_m = tl.program_id(0) * BM
    off_n = tl.program_id(1) * BN
    k_steps = tl.cdiv(V, BK)
    per_split = tl.cdiv(k_steps, SPLIT_K)
    k_lo = tl.program_id(2) * per_split
    k_hi = min(k_lo + per_split, k_steps)
    rows = off_m + tl.arange(0, BM)
    row_ok = rows < C
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for ks in range(k_lo, k_hi):
        k0 = ks * BK
        sc = tl.load(s_ptr + rows.to(tl.int64) * n_tiles + k0 // TW, mask=row_ok, other=0.0)
        a = p_desc.load([off_m, k0])
        a = (a.to(tl.float32) * sc[:, None]).to(a.dtype)
        acc = tl.dot(a, w_desc.load([k0, off_n]), acc)
    cols = off_n + tl.arange(0, BN)
    mask = row_ok[:, None] & (cols < H)[None, :]
    tl.atomic_add(dh_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], acc, mask=mask, sem="relaxed")


@triton.autotune(configs=_dw_configs(), key=["V", "H", "TW", "ACCUMULATE"], restore_value=["dw_ptr"])
@triton.jit(do_not_specialize=["C", "V", "H", "n_tiles"])
def dz_dw_kernel(
    p_desc,  # [C, V] P, block [BK, BM]
    h_desc,  # [C, H] hidden states of the chunk, block [BK, BN]
    s_ptr,  # [C, n_tiles] fp32 scales S
    dw_ptr,  # [V, H] fp32 accumulator
    C,
    V,
    H,
    n_tiles,
    TW: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    off_m = tl.program_id(0) * BM  # vocabulary rows of dW: inside one tile of P (BM divides TW)
    off_n = tl.program_id(1) * BN
    j = off_m // TW
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, C, BK):  # tokens
        r = k0 + tl.arange(0, BK)
        sc = tl.load(s_ptr + r.to(tl.int64) * n_tiles + j, mask=r < C, other=0.0)
        a = p_desc.load([k0, off_m])  # [BK, BM]
        a = (a.to(tl.float32) * sc[:, None]).to(a.dtype)
        acc = tl.dot(tl.trans(a), h_desc.load([k0, off_n]), acc)
    vs = off_m + tl.arange(0, BM)
    cols = off_n + tl.arange(0, BN)
    mask = (vs < V)[:, None] & (cols < H)[None, :]
    ptrs = dw_ptr + vs.to(tl.int64)[:, None] * H + cols[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


def dz_grads(p: torch.Tensor, scales: torch.Tensor, tile_width: int, weight: torch.Tensor, h_c: torch.Tensor,
             targets: torch.Tensor, g: torch.Tensor, dw32: torch.Tensor | None, accumulate: bool,
             need_dh: bool) -> torch.Tensor | None:  # fmt: skip
    """dh [C, H] (hidden's dtype; None unless need_dh) and, when dw32 is given, dW added to (accumulate) or written
    into the fp32 [V, H] dw32, from P [C, V], the scales S [C, n_tiles] and g [C] fp32 (dLoss/dlogp / temperature,
    0 on ignored rows; targets of those rows may be anything)."""
    c, v = p.shape
    h = h_c.shape[1]
    n_tiles = scales.shape[1]
    safe = torch.where(g != 0, targets, 0).clamp_(0, v - 1)
    box = [16, 16]  # replaced by each config's tiles
    dh = None
    if need_dh:
        dh32 = torch.zeros((c, h), device=p.device, dtype=torch.float32)
        p_desc = TensorDescriptor(p, p.shape, p.stride(), box)
        w_desc = TensorDescriptor(weight, weight.shape, weight.stride(), box)
        dz_dh_kernel[lambda m: (triton.cdiv(c, m["BM"]), triton.cdiv(h, m["BN"]), m["SPLIT_K"])](
            p_desc, w_desc, scales, dh32, c, v, h, n_tiles, TW=tile_width,
        )  # fmt: skip
        dh = dh32.addcmul_(g[:, None], weight[safe].float()).to(h_c.dtype)  # + the one-hot part: g W[y]
    if dw32 is not None:
        p_desc = TensorDescriptor(p, p.shape, p.stride(), box)
        h_desc = TensorDescriptor(h_c, h_c.shape, h_c.stride(), box)
        dz_dw_kernel[lambda m: (triton.cdiv(v, m["BM"]), triton.cdiv(h, m["BN"]))](
            p_desc, h_desc, scales, dw32, c, v, h, n_tiles, TW=tile_width, ACCUMULATE=accumulate,
        )  # fmt: skip
        dw32.index_add_(0, safe, g[:, None] * h_c.float())  # the one-hot part: dW[y] += g h
    return dh

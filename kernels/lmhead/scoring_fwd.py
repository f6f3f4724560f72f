"""LM-head scoring forward (no grad) from cuBLAS GEMM tiles and Triton online-softmax kernels.

Two schedules, both exact (fp32 softmax state, running max from -inf), chosen by the memory the caller allows (the
default "epilogue" schedule, `triton_gemm.py`, runs neither; it falls back to "chunked" where it cannot run):
- "chunked": whole-row chunks [C, V] (C from a workspace budget, 1 GiB by default: 4096 rows of the
  Qwen2.5 head) through one GEMM each, then one streaming read per row folds it into (max, sum-exp, target logit,
  sum p*z). Measured on an H100 at N = 65,536: 65-68 ms against 57 ms for the bare head GEMM.
- "tiled" (low memory): [TILE_N, TILE_V] tiles (32 MiB, 8192 x 2048 bf16) so the logits of a tile mostly stay in
  L2; a Triton kernel folds each tile into per-token state in four [N] fp32 vectors. Extra memory: the workspace
  plus 16 bytes per token. Measured: 75 ms at N = 65,536 (more, smaller GEMMs and launches).
`vibeperf/bench/lmhead_passes.py` re-measures both and the single-kernel fused variant of `triton_fwd.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings
from .triton_fwd import INTERPRET, LOG2E, combine_partials, online_softmax_rows, row_softmax_state


@triton.jit(do_not_specialize=["n_rows", "v0", "vc", "ignore_index"])
def lmhead_tile_update_kernel(
    z_ptr,  # [n_rows, vc] raw logits of one tile (row stride stride_z)
    b_ptr,  # [V] or dummy
    tgt_ptr,  # [n_rows] int64
    m_ptr,  # [n_rows] fp32 running max (base 2)
    s_ptr,  # [n_rows] fp32 sum of 2^(z - m)
    t_ptr,  # [n_rows] fp32 sum of 2^(z - m) * (z - m)
    tz_ptr,  # [n_rows] fp32 target logit (base 2)
    n_rows,
    v0,
    vc,
    stride_z,
    scale_log2,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    r_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_V)
    c_mask = cols < vc
    mask = r_mask[:, None] & c_mask[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + v0 + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    z = tl.where(c_mask[None, :], z * scale_log2, float("-inf"))  # [BLOCK_R, BLOCK_V]
    tgt = tl.load(tgt_ptr + rows, mask=r_mask, other=ignore_index)
    m = tl.load(m_ptr + rows, mask=r_mask, other=0.0)
    s = tl.load(s_ptr + rows, mask=r_mask, other=0.0)
    t = tl.load(t_ptr + rows, mask=r_mask, other=0.0)
    m, s, t = online_softmax_rows(m, s, t, z, c_mask[None, :], WANT_ENTROPY)
    tl.store(m_ptr + rows, m, mask=r_mask)
    tl.store(s_ptr + rows, s, mask=r_mask)
    if WANT_ENTROPY:
        tl.store(t_ptr + rows, t, mask=r_mask)
    hit = (v0 + cols)[None, :] == tgt[:, None]
    tz = tl.load(tz_ptr + rows, mask=r_mask, other=0.0) + tl.sum(tl.where(hit, z, 0.0), axis=1)
    tl.store(tz_ptr + rows, tz, mask=r_mask)


def tile_shape(n: int, v: int, elem_bytes: int, tile_bytes: int | None = None) -> tuple[int, int]:
    """(TILE_N, TILE_V): TILE_V a power of two <= 2048 (one tile row per program), TILE_N fills the workspace of
    tile_bytes (None: $VIBEPERF_LMHEAD_TILE_MB, 32 MiB)."""
    tile_bytes = settings.workspace(tile_bytes, settings.TILE_ENV)
    tile_v = min(2048, triton.next_power_of_2(v))
    tile_n = max(128, tile_bytes // (tile_v * elem_bytes) // 128 * 128)
    return min(tile_n, n), tile_v


def linear_logprob_tiled_fwd(hidden, weight, targets, bias, temperature, ignore_index, want_entropy,
                             tile: tuple[int, int] | None = None, block_r: int = 2,
                             num_warps: int = 4, workspace_bytes: int | None = None):  # fmt: skip
    """Host launcher of the "tiled" schedule. Returns (logp [N], lse [N], entropy [N] or None), fp32."""
    n, _ = hidden.shape
    v = weight.shape[0]
    tile_n, tile_v = tile or tile_shape(n, v, weight.element_size(), workspace_bytes)
    state = torch.zeros((4, 1, n), device=hidden.device, dtype=torch.float32)
    m, s, t, tz = state.unbind(0)
    m.fill_(float("-inf"))
    workspace = torch.empty(tile_n * tile_v, device=hidden.device, dtype=weight.dtype)
    block_r = 4 if INTERPRET else block_r
    for n0 in range(0, n, tile_n):
        rows = min(tile_n, n - n0)
        h_c = hidden[n0 : n0 + rows]
        for v0 in range(0, v, tile_v):
            cols = min(tile_v, v - v0)
            z = workspace[: rows * cols].view(rows, cols)
            torch.mm(h_c, weight[v0 : v0 + cols].T, out=z)  # [rows, cols]
            lmhead_tile_update_kernel[(triton.cdiv(rows, block_r),)](
                z, bias if bias is not None else z, targets[n0:], m[0, n0:], s[0, n0:], t[0, n0:], tz[0, n0:],
                rows, v0, cols, z.stride(0), LOG2E / temperature, ignore_index,
                HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, BLOCK_R=block_r, BLOCK_V=tile_v,
                num_warps=1 if INTERPRET else num_warps,
            )  # fmt: skip
    return combine_partials(m, s, t, tz, targets, ignore_index, want_entropy)


@triton.jit(do_not_specialize=["ignore_index"])
def lmhead_row_stats_kernel(
    z_ptr,  # [C, V] raw logits of a chunk of whole rows
    b_ptr,  # [V] or dummy
    tgt_ptr,  # [C] int64
    m_ptr,  # [C] fp32 out: max (base 2)
    s_ptr,  # [C] fp32 out: sum 2^(z - m)
    t_ptr,  # [C] fp32 out: sum 2^(z - m) (z - m)
    tz_ptr,  # [C] fp32 out: target logit (base 2)
    V,
    stride_z,
    scale_log2,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m, s, t = row_softmax_state(z_row, b_ptr, V, scale_log2, HAS_BIAS, WANT_ENTROPY, BLOCK_V)
    tgt = tl.load(tgt_ptr + row)
    safe = tl.where(tgt != ignore_index, tgt, 0)
    z_t = tl.load(z_row + safe).to(tl.float32)
    if HAS_BIAS:
        z_t += tl.load(b_ptr + safe).to(tl.float32)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(t_ptr + row, t)
    tl.store(tz_ptr + row, z_t * scale_log2)


def linear_logprob_chunked_fwd(hidden, weight, targets, bias, temperature, ignore_index, want_entropy,
                               chunk: int | None = None, num_warps: int = 4, block_v: int = 2048,
                               workspace_bytes: int | None = None):  # fmt: skip
    """Host launcher of the "chunked" schedule. Returns (logp [N], lse [N], entropy [N] or None), fp32."""
    n = hidden.shape[0]
    v = weight.shape[0]
    if chunk is None:  # the largest power of two of rows whose logits fit the workspace budget
        budget = settings.workspace(workspace_bytes, settings.SCORE_ENV)
        rows = max(128, budget // (v * weight.element_size()))
        chunk = 1 << (rows.bit_length() - 1)
    chunk = max(1, min(chunk, n))  # n = 0: no chunk runs, and range() needs a step
    state = torch.empty((4, 1, n), device=hidden.device, dtype=torch.float32)
    m, s, t, tz = state.unbind(0)
    workspace = torch.empty((chunk, v), device=hidden.device, dtype=weight.dtype)
    for n0 in range(0, n, chunk):
        rows = min(chunk, n - n0)
        z = workspace[:rows]
        torch.mm(hidden[n0 : n0 + rows], weight.T, out=z)
        lmhead_row_stats_kernel[(rows,)](
            z, bias if bias is not None else z, targets[n0:], m[0, n0:], s[0, n0:], t[0, n0:], tz[0, n0:],
            v, z.stride(0), LOG2E / temperature, ignore_index,
            HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, BLOCK_V=128 if INTERPRET else block_v,
            num_warps=1 if INTERPRET else num_warps,
        )  # fmt: skip
    return combine_partials(m, s, t, tz, targets, ignore_index, want_entropy)

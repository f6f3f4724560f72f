"""The head GEMM of a chunk with the softmax statistics in its epilogue (Triton, persistent, TMA).

z = h_c W^T is written to the chunk's workspace as the bf16/fp16 GEMM output, as cuBLAS would; while each [BM, BN]
output tile is still in registers the epilogue folds it (as rounded to z's dtype, the values the gradient pass will
read) into per-row partial softmax states of that vocabulary tile: max m, s = sum 2^(z - m), t = sum 2^(z - m)(z - m)
(base 2, z scaled by log2(e) / temperature), and picks the target's logit out of the one tile that holds it.
`merge_partials` folds the [C, tiles] partials into lse, log-prob and entropy. The row kernel then needs one pass
over the chunk (PHASE_GRAD: read z, write dz) instead of two reads and a write (PHASE_FULL).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import INTERPRET, LN2_F, LOG2E

try:  # Triton >= 3.3 host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the fused GEMM is simply never eligible
    TensorDescriptor = None


def _block_shapes(nargs):
    """Config pre-hook: the TMA descriptors' boxes are the config's tiles."""
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["h_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["z_desc"].block_shape = [bm, bn]


def _configs():
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 32, "BK": 16, "GROUP_M": 2}, num_warps=4, num_stages=1,
                              pre_hook=_block_shapes)]  # fmt: skip
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=_block_shapes)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3),
            (128, 256, 64, 8, 4),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (128, 128, 128, 8, 3),
            (256, 128, 64, 8, 3),
        ]
    ]


@triton.autotune(configs=_configs(), key=["V", "H", "WANT_T"])
@triton.jit(do_not_specialize=["C"])
def head_gemm_stats_kernel(
    h_desc,  # [C, H] block [BM, BK]
    w_desc,  # [V, H] block [BN, BK]
    z_desc,  # [C, V] block [BM, BN], written
    tgt_ptr,  # [C] int64
    part_ptr,  # [3, C, n_tiles] fp32 out: m, s, t per row and vocabulary tile
    zt_ptr,  # [C] fp32 out: the target's scaled logit (base 2)
    C,
    V,
    H,
    scale_log2,
    NUM_PROGS: tl.constexpr,
    WANT_T: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
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
        zq = acc.to(z_desc.dtype)
        z_desc.store([off_m, off_n], zq)
        # Epilogue: the tile's partial softmax state per row, from the values as stored.
        cols = off_n + tl.arange(0, BN)
        rows = off_m + tl.arange(0, BM)
        zs = zq.to(tl.float32) * scale_log2
        zs = tl.where(cols[None, :] < V, zs, float("-inf"))
        m = tl.max(zs, axis=1)
        zc = zs - m[:, None]
        p = tl.exp2(zc)
        s = tl.sum(p, axis=1)
        row_ok = rows < C
        base = rows.to(tl.int64) * num_n + pid_n
        tl.store(part_ptr + base, m, mask=row_ok)
        tl.store(part_ptr + C * num_n + base, s, mask=row_ok)
        if WANT_T:
            t = tl.sum(p * tl.where(cols[None, :] < V, zc, 0.0), axis=1)
            tl.store(part_ptr + 2 * C * num_n + base, t, mask=row_ok)
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        hit = row_ok & (tgt >= off_n) & (tgt < off_n + BN)
        zt = tl.sum(tl.where(cols[None, :] == tgt[:, None], zs, 0.0), axis=1)
        tl.store(zt_ptr + rows, zt, mask=hit)


_NUM_SMS: dict[int, int] = {}


def eligible(hidden: torch.Tensor, weight: torch.Tensor, workspace: torch.Tensor, bias) -> bool:
    """Whether the fused GEMM can run: CUDA (or the interpreter), bf16/fp16 (fp32 would run TF32, not the exact
    product the engine promises), no bias, TMA-aligned strides."""
    if TensorDescriptor is None or bias is not None:
        return False
    if not (hidden.is_cuda or INTERPRET):
        return False
    if hidden.dtype not in (torch.bfloat16, torch.float16) and not INTERPRET:
        return False
    es = hidden.element_size()
    return all(t.stride(-1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (hidden, weight, workspace))  # fmt: skip


def head_gemm_stats(h_c: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, targets: torch.Tensor,
                    temperature: float, want_entropy: bool):  # fmt: skip
    """z[:] = h_c @ weight.T (in z's dtype); returns the partials [3, C, tiles] (m, s, t) and the target's scaled
    logit [C] (base 2; rows whose target is outside [0, V) keep garbage, masked by `merge_partials`)."""
    c, h = h_c.shape
    v = weight.shape[0]
    dev = h_c.device
    key = dev.index if dev.type == "cuda" else -1
    if key not in _NUM_SMS:
        _NUM_SMS[key] = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    progs = _NUM_SMS[key]
    dummy = [16, 16]  # replaced by each config's tiles (`_block_shapes`)
    h_desc = TensorDescriptor(h_c, h_c.shape, h_c.stride(), dummy)
    w_desc = TensorDescriptor(weight, weight.shape, weight.stride(), dummy)
    z_desc = TensorDescriptor(z, z.shape, z.stride(), dummy)

    def grid(meta):
        return (min(progs, triton.cdiv(c, meta["BM"]) * triton.cdiv(v, meta["BN"])),)

    zt = torch.zeros(c, device=dev, dtype=torch.float32)
    # The partials' layout depends on the config's BN: sized for the smallest, viewed as the chosen one wrote it.
    min_bn = min(cfg.kwargs["BN"] for cfg in head_gemm_stats_kernel.configs)
    part_store = torch.empty(3 * c * triton.cdiv(v, min_bn), device=dev, dtype=torch.float32)
    head_gemm_stats_kernel[grid](
        h_desc, w_desc, z_desc, targets, part_store, zt, c, v, h, LOG2E / temperature,
        NUM_PROGS=progs, WANT_T=want_entropy,
    )  # fmt: skip
    n_tiles = triton.cdiv(v, head_gemm_stats_kernel.best_config.kwargs["BN"])  # the layout the launch wrote
    return part_store[: 3 * c * n_tiles].view(3, c, n_tiles), zt


def merge_partials(part: torch.Tensor, zt: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                   want_entropy: bool):  # fmt: skip
    """(logp, entropy or None, lse) [C] fp32 from the per-tile partial states (natural log)."""
    m, s, t = part[0], part[1], part[2]
    mx = m.amax(dim=1, keepdim=True)
    w = torch.exp2(m - mx)
    ss = (s * w).sum(1)
    lse2 = mx.squeeze(1) + torch.log2(ss)
    valid = targets != ignore_index
    logp = torch.where(valid, (zt - lse2) * LN2_F, 0.0)
    ent = None
    if want_entropy:
        tt = (w * (t + s * (m - mx))).sum(1)
        ent = torch.where(valid, (torch.log2(ss) - tt / ss) * LN2_F, 0.0)
    return logp, ent, lse2 * LN2_F

"""backend="cuda": the LM-head ops through vibeperf._C (csrc/cuda/lmhead.cu, csrc/cuda/lmhead_api.cpp).

The same chunked three-pass schedule as `chunked.lmhead_chunked`, in C++: per chunk of C tokens a cuBLASLt GEMM
writes the [C, V] logits (input dtype), one CUDA block per row computes lse / logp / entropy and the gradient
coefficient and overwrites the row with dLoss/dz, then cuBLASLt forms dh (input dtype) and accumulates dW in fp32 in
place (beta = 1). Scoring without grad runs the first two steps only.

Extra device memory besides the outputs: the [C, V'] logits workspace in weight's dtype (V' = V rounded up to 16 bytes,
so every row is 16-byte aligned for the row kernel's vector loads; C = `chunked.chunk_rows`: <= workspace_bytes,
1280 MiB by default (settings.py), but at least 128 rows), one 32 MiB cuBLASLt workspace per (device, stream) kept
for the process' life, an fp32 [V, H] dW accumulator when weight is not fp32 (as the Triton path), and O(N + V) vectors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import chunked, triton_rows

LOSS_MGPO = 2  # csrc/cuda/lmhead.cuh kLossMgpo: the PPO-clip policy objective formed inside the CUDA row kernel
MGPO_OUTPUTS = ("objective", "ratio", "kl", "clip_low", "clip_high", "tis_capped")


class MGPOTokens(NamedTuple):
    """Per-token inputs and outputs of LOSS_MGPO (the CUDA row kernel's own closed form of the PPO-clip objective with
    token-level truncated IS and the k3 KL: the subset of `policy_loss` that backend="cuda" runs, see
    kernels/policy/ops.py). Every tensor is fp32 and contiguous.

    adv: [N] A' of the token's sequence; old_logp: [N]; rollout_logp: [N] or None (no truncated importance
    sampling); ref_logp: [N] or None (no KL term); out: [N, len(MGPO_OUTPUTS)], written for every row, 0 on ignored
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


def require_cuda_ext() -> None:
    """Raises a RuntimeError that says why backend="cuda" is unavailable (vibeperf._C is loaded here, on first use)."""
    from vibeperf import _ext

    if not _ext.HAS_CUDA_EXT:
        why = _ext.EXT_ERROR or "it was built without its CUDA part (no nvcc, or a CPU build of torch)"
        raise RuntimeError(
            f"backend='cuda' needs vibeperf._C built with CUDA ({why}); rebuild on a machine with nvcc and a CUDA "
            "build of torch (`pip install --no-build-isolation -e .`, VIBEPERF_BUILD_CUDA=1), or use backend='triton'"
        )


def _chunk(n: int, weight: torch.Tensor, chunk: int | None, workspace_bytes: int | None = None) -> int:
    c = chunked.chunk_rows(n, weight.shape[0], weight.element_size(), workspace_bytes) if chunk is None else chunk
    if c < 1:
        raise ValueError(f"chunk must be >= 1 token rows, got {c}")
    return c


def linear_logprob_fwd(hidden, weight, targets, bias, temperature, ignore_index, want_entropy, chunk=None,
                       workspace_bytes=None):  # fmt: skip
    """Scoring forward. Returns (logp [N], lse [N], entropy [N] or [0]), fp32."""
    require_cuda_ext()
    from vibeperf._ext import C

    c = _chunk(hidden.shape[0], weight, chunk, workspace_bytes)
    return C.lmhead_logprob_fwd_cuda(hidden, weight, targets, bias, float(temperature), int(ignore_index),
                                     bool(want_entropy), c)  # fmt: skip


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
    chunk: int | None = None,
    step: chunked.TokenStep | None = None,
    mgpo: MGPOTokens | None = None,
    workspace_bytes: int | None = None,
):
    """Same contract as `chunked.lmhead_chunked` for LOSS_GIVEN and LOSS_NLL, plus LOSS_MGPO with `mgpo` (whose `out`
    is written); a per-token `step` cannot run between the C++ loop's kernels and is refused. Returns (logp [N],
    entropy [N] or None, lse [N], dh [N, H] or None, dW [V, H] or None,
    db [V] or None)."""
    if step is not None:
        raise NotImplementedError("backend='cuda' runs no per-token step (TokenStep); use backend='triton'")
    require_cuda_ext()
    from vibeperf._ext import C

    f32 = lambda t: None if t is None else t.float().contiguous()
    c = _chunk(hidden.shape[0], weight, chunk, workspace_bytes)
    if loss == LOSS_MGPO:
        m = mgpo
        logp, lse, ent, dh, dw, db = C.lmhead_mgpo_cuda(
            hidden, weight, targets, bias, f32(g_logp), f32(m.adv), f32(m.old_logp), f32(m.rollout_logp),
            f32(m.ref_logp), m.out, float(m.clip_low), float(m.clip_high), float(m.tis_cap), float(m.beta),
            float(temperature), int(ignore_index), bool(need_dh), bool(need_dw), c,
        )  # fmt: skip
        want_entropy = True  # the MGPO entry point always returns it (the loss's metrics need it)
    elif loss in (triton_rows.LOSS_GIVEN, triton_rows.LOSS_NLL):
        logp, lse, ent, dh, dw, db = C.lmhead_chunked_cuda(
            hidden, weight, targets, bias, f32(g_logp), f32(g_ent), float(temperature), int(ignore_index), int(loss),
            bool(want_entropy), bool(need_dh), bool(need_dw), c,
        )  # fmt: skip
    else:
        raise NotImplementedError(f"backend='cuda' has no row-kernel loss {loss}")
    return (logp, ent if want_entropy else None, lse, dh if need_dh else None, dw if need_dw else None,
            db if (need_dw and bias is not None) else None)  # fmt: skip

"""The chunked LM-head engine: forward and backward in three GEMM-sized passes, never an [N, V] tensor.

For each chunk of C tokens (C chosen so the chunk's logits fit a bounded workspace, see `chunk_rows`):
  1. z = h_c W^T                 head GEMM into the reusable [C, V] workspace (weight dtype); backend "triton" runs
                                 its own GEMM (`triton_gemm.py`) whose epilogue also writes the rows' partial softmax
                                 states, so that step 2 reads the chunk once instead of twice
  2. row epilogue                lse, log-prob, entropy, the gradient coefficient g = dLoss/dlogp, and dz in place
  3. dh_c = dz W ; dW += dz^T h_c   (dW accumulated in fp32; one chunk, when that takes no more memory, writes
                                    dW in the weight's dtype directly: see `chunk_rows`; or, by
                                    $VIBEPERF_LMHEAD_DW_ACC=weight, accumulated in the weight's dtype: settings.py)
The row epilogue is the Triton kernel of `triton_rows.py`, or the same math in plain torch (backend "torch").
On the fused head GEMM with a bf16 workspace and no entropy gradient, the "scaled" form (the default;
$VIBEPERF_LMHEAD_GRAD=rows turns it off, settings.py) skips step 2's pass over the chunk: the GEMM stores
P = 2^(z - mref) per row, mref from the target's logit, known before it, and dz = alpha P + beta onehot(y) row by row
(P's target entry zeroed, `triton_rows.lmhead_row_scale`), so step 3 runs on P as stored, the target's term added in
fp32 beside it:
dh_c = alpha (P W) + beta W_y, dW += P^T (alpha h_c) and dW_y += beta h_c (`triton_rows.scale_rows`,
`triton_rows.add_target_rows`).
The same loop serves a loss whose per-token gradient is known before the pass (NLL with token weights, the
recompute backward for arbitrary upstream gradients) and a loss whose gradient is a closed form of the token's
log-prob (`TokenStep`: the policy losses), formed per chunk between the row statistics and the dz write.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

from . import settings, triton_gemm, triton_rows

# The head GEMM of backend "triton": "triton" (the statistics in the GEMM's epilogue, triton_gemm.py, where its
# inputs allow: `triton_gemm.eligible`) or "cublas" (torch.mm, then the row kernel's statistics pass);
# vibeperf.bench.lmhead_passes measures both (H200: "triton" 1-4% faster over the whole op at every shape measured).
HEAD_GEMM = "triton"
# A chunk of at least CHUNK_ALIGN rows is cut to a multiple of it: cuBLAS's dh / dW GEMMs of a chunk run markedly
# faster there (H200, bf16, whole CE forward + backward against three bare GEMMs: Qwen2.5 head at 64K tokens 1.10x
# with 2,048-row chunks, 1.17x with 1,664 and 1.11x with 2,304 or 3,456; Llama-3 head at 16K tokens 1.06x against
# 1.13x / 1.08x; benchmarks/NOTES.md).
CHUNK_ALIGN = 2048


def chunk_rows(n_tokens: int, vocab: int, elem_bytes: int, workspace_bytes: int | None = None,
               dw_hidden: int = 0) -> int:  # fmt: skip
    """Tokens per chunk: the [C, V] logits workspace stays within `workspace_bytes` (None:
    $VIBEPERF_LMHEAD_WORKSPACE_MB, 1,280 MiB, read now); C is a multiple of CHUNK_ALIGN when the workspace holds
    that many rows, else of 128 (at least 128).

    `dw_hidden` = H when the caller needs dW in a dtype below fp32: several chunks then hold an fp32 [V, H]
    accumulator besides the workspace and read and write it once per chunk, while one chunk writes dW directly
    (fp32 accumulation inside its GEMM). So all `n_tokens` go in one chunk whenever their logits take no more memory
    than the workspace plus that accumulator: faster (H200, Qwen2.5 head at 8K tokens: 1.08x three bare GEMMs against
    1.10x in two chunks), with a peak higher by dW's own size (several chunks cast their accumulator into the memory
    the freed workspace leaves)."""
    workspace_bytes = settings.workspace(workspace_bytes, settings.WORKSPACE_ENV)
    c = max(128, workspace_bytes // (vocab * elem_bytes) // 128 * 128)
    if c >= CHUNK_ALIGN:
        c = c // CHUNK_ALIGN * CHUNK_ALIGN
    if n_tokens <= 0:
        return 1
    if dw_hidden and n_tokens * vocab * elem_bytes <= min(c, n_tokens) * vocab * elem_bytes + vocab * dw_hidden * 4:
        return n_tokens
    return min(c, n_tokens)


def scores_torch(hidden, weight, targets, bias, temperature, ignore_index, want_entropy,
                 workspace_bytes: int | None = None):  # fmt: skip
    """Chunked plain-torch forward (the CPU path and the twin of the Triton kernel)."""
    n = hidden.shape[0]
    c = chunk_rows(n, weight.shape[0], 4, workspace_bytes)
    logp = hidden.new_empty(n, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else logp.new_empty(0)
    valid = targets != ignore_index
    for i0 in range(0, n, c):
        sl = slice(i0, min(n, i0 + c))
        z = (hidden[sl] @ weight.T).float()  # [C, V]
        if bias is not None:
            z += bias.float()
        z /= temperature
        lse[sl] = torch.logsumexp(z, dim=-1)
        safe = torch.where(valid[sl], targets[sl], 0)
        logp[sl] = torch.where(valid[sl], z.gather(1, safe[:, None]).squeeze(1) - lse[sl], 0.0)
        if want_entropy:
            logq = z - lse[sl, None]
            ent[sl] = torch.where(valid[sl], -(logq.exp() * logq).sum(-1), 0.0)
    return logp, lse, ent


class TokenStep(Protocol):
    """A loss's per-token step, run on each chunk between the row statistics and the dz write.

    Called with the chunk's row range [i0, i1) and its fp32 [i1 - i0] log-probs and entropies (0 on ignored rows); it
    returns g = dLoss/dlogp of those rows ([i1 - i0] fp32; ignored rows are zeroed by the row kernel). It may write
    per-token terms of its own (the loss value, metrics) for the same rows.
    """

    def __call__(self, i0: int, i1: int, logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor: ...


def _dlogp(g_logp: torch.Tensor, loss: int) -> torch.Tensor:
    """dLoss/dlogp from the coefficient the caller gave for `loss` (triton_rows.LOSS_*; the row kernel's rule)."""
    return g_logp if loss == triton_rows.LOSS_GIVEN else -g_logp


def row_grad_torch(z, targets, bias, g_logp, g_ent, temperature, ignore_index, loss, want_entropy, step=None):
    """Plain-torch twin of the Triton row epilogue, in place on z [C, V]: statistics, then dz.

    g_logp holds the coefficient of `loss` (triton_rows.LOSS_*), or is None when `step` (a callable of the chunk's
    (logp, entropy) returning dLoss/dlogp) forms it from the statistics. Returns (logp, entropy or None, lse).
    """
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
    ent = torch.where(valid, -neg_ent, 0.0) if want_entropy or step is not None else None
    if step is not None:
        g = step(logp, ent)
    else:
        g = _dlogp(g_logp, loss)
    g = torch.where(valid, g, 0.0)
    dz = -g[:, None] * p
    dz.scatter_add_(1, safe[:, None], g[:, None])
    if g_ent is not None:
        dz += torch.where(valid, g_ent, 0.0)[:, None] * p * (neg_ent[:, None] - logq)
    z.copy_(dz / temperature)
    return logp, ent, lse


def _row_grad_triton(z, targets, bias, g_logp, g_ent, temperature, ignore_index, loss, want_entropy, step=None,
                     partials=None):  # fmt: skip
    """The Triton row epilogue with the contract of `row_grad_torch`: one launch, or two around `step`; partials:
    the rows' softmax states from the head GEMM's epilogue (`triton_gemm.head_gemm_stats`), if it ran."""
    if step is None:
        return triton_rows.lmhead_row_grad(z, targets, bias, g_logp, g_ent, temperature, ignore_index, loss,
                                           want_entropy, partials=partials)  # fmt: skip
    stats = triton_rows.lmhead_row_grad(z, targets, bias, None, None, temperature, ignore_index, loss, True,
                                        phase=triton_rows.PHASE_STATS, partials=partials)  # fmt: skip
    g = step(stats[0], stats[1]).float().contiguous()
    return triton_rows.lmhead_row_grad(z, targets, bias, g, g_ent, temperature, ignore_index, triton_rows.LOSS_GIVEN,
                                       True, phase=triton_rows.PHASE_GRAD, stats=stats)  # fmt: skip


def _row_scale_triton(p, targets, mref, partials, g_logp, temperature, ignore_index, loss, want_entropy, step,
                      refill):  # fmt: skip
    """The scaled form's row epilogue (`triton_rows.lmhead_row_scale`): one launch, or two around `step`.
    Returns (logp, entropy or None, lse, alpha, beta)."""
    if step is None:
        return triton_rows.lmhead_row_scale(p, targets, mref, partials, g_logp, temperature, ignore_index, loss,
                                            want_entropy, refill=refill)  # fmt: skip
    stats = triton_rows.lmhead_row_scale(p, targets, mref, partials, None, temperature, ignore_index, loss, True,
                                         phase=triton_rows.PHASE_STATS)[:3]  # fmt: skip
    g = step(stats[0], stats[1]).float().contiguous()
    return triton_rows.lmhead_row_scale(p, targets, mref, partials, g, temperature, ignore_index,
                                        triton_rows.LOSS_GIVEN, True, phase=triton_rows.PHASE_GRAD, stats=stats,
                                        refill=refill)  # fmt: skip


_DTYPE_OUT_ADDMM: bool | None = None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as a new fp32 tensor, accumulated in fp32 (inputs of a lower precision are not upcast on CUDA; where
    this torch has no fp32-output mm for them, a zeroed accumulator and `_accumulate_fp32`)."""
    if a.dtype == torch.float32:
        return a @ b
    if not a.is_cuda:
        return a.float() @ b.float()
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        acc = torch.zeros((a.shape[0], b.shape[1]), device=a.device, dtype=torch.float32)
        _accumulate_fp32(acc, a, b)
        return acc


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
            warnings.warn(
                f"in-place fp32 addmm of {a.dtype} inputs is unavailable ({exc}); using mm + add_",
                RuntimeWarning,
                stacklevel=2,
            )
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
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None = None,
    want_entropy: bool = False,
    need_dh: bool = True,
    need_dw: bool = True,
    backend: str = "triton",
    chunk: int | None = None,
    step: TokenStep | None = None,
    workspace_bytes: int | None = None,
):
    """Runs the three passes over all chunks.

    hidden: [N, H], weight: [V, H] (hidden's dtype, or fp32: a master copy, cast once for the GEMMs), targets: [N]
    int64, g_logp / g_ent: [N] fp32 (see LOSS_* in triton_rows); step: a `TokenStep` forming dLoss/dlogp per chunk
    instead of g_logp (which is then None); the entropy is then always computed.
    Returns (logp [N], entropy [N] or None, lse [N], dh [N, H] or None, dW [V, H] or None, db [V] or None); dh in
    hidden's dtype, dW / db in weight's dtype (accumulated in fp32; dW in its own dtype by $VIBEPERF_LMHEAD_DW_ACC).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    w_in = weight  # dW comes back in its dtype; the GEMMs run in hidden's (an fp32 master weight is cast once)
    weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    low_dw = need_dw and w_in.dtype != torch.float32
    acc_low = need_dw and settings.dw_accumulate() == "weight" and low_dw  # dW summed in its dtype: no fp32 buffer
    form = settings.grad_form()  # dz by a row pass, or alpha P (the fused head GEMM only)
    c = chunk or chunk_rows(n, v, weight.element_size(), workspace_bytes, dw_hidden=h if low_dw and not acc_low else 0)
    dev = hidden.device
    logp = torch.empty(n, device=dev, dtype=torch.float32)
    lse = torch.empty_like(logp)
    want_entropy = want_entropy or step is not None
    ent = torch.empty_like(logp) if want_entropy else None
    dh = torch.empty_like(hidden) if need_dh else None
    dw_acc = db32 = None  # dW (fp32, or the weight's dtype: acc_low) / db (fp32): the first chunk's, then the sums
    workspace = torch.empty((min(c, n), v), device=dev, dtype=weight.dtype)
    row_grad = _row_grad_triton if backend == "triton" else row_grad_torch
    fused = backend == "triton" and HEAD_GEMM == "triton" and triton_gemm.eligible(bias, hidden, weight, workspace)
    scaled = form == "scaled" and fused and g_ent is None and workspace.dtype in (torch.bfloat16, torch.float32)
    want_t = want_entropy or step is not None or g_ent is not None
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        h_c, t_c, z = hidden[i0:i1], targets[i0:i1], workspace[: i1 - i0]
        g_c = None if g_logp is None else g_logp[i0:i1]
        step_c = None if step is None else (lambda lp_c, en_c, i0=i0, i1=i1: step(i0, i1, lp_c, en_c))
        b_c = h_c  # dW's right operand: dW += z^T b_c
        if scaled:  # z = P, dz = alpha P + beta onehot(y)
            mref = triton_rows.target_logits(h_c, weight, t_c, temperature, ignore_index)
            part = triton_gemm.head_gemm_stats(h_c, weight, z, temperature, want_t, mref=mref)
            lp, en, ls, alpha, beta = _row_scale_triton(z, t_c, mref, part, g_c, temperature, ignore_index, loss,
                                                        want_entropy, step_c, (h_c, weight))  # fmt: skip
            y_c = torch.where(t_c != ignore_index, t_c, -1)  # -1: no target term (beta is 0 there too)
            if need_dw:
                b_c = triton_rows.scale_rows(h_c, alpha)  # alpha h_c, rounded once
        else:
            extra = {}
            if fused:
                extra["partials"] = triton_gemm.head_gemm_stats(h_c, weight, z, temperature, want_t)  # z = h_c W^T
            else:
                torch.mm(h_c, weight.T, out=z)  # [C, V]
            lp, en, ls = row_grad(z, t_c, bias, g_c, None if g_ent is None else g_ent[i0:i1], temperature,
                                  ignore_index, loss, want_entropy, step_c, **extra)  # fmt: skip
        if need_dh:
            if scaled:  # one rounding, after the scale and the target's term
                triton_rows.scale_rows(_mm_fp32(z, weight), alpha, out=dh[i0:i1], target=(beta, weight, y_c))
            else:
                torch.mm(z, weight, out=dh[i0:i1])  # [C, H]
        if need_dw:
            if i0 == 0 and (i1 == n and low_dw or acc_low):
                dw_acc = z.T @ b_c  # dW in the weight's dtype straight from the GEMM (fp32 inside)
            elif acc_low:
                dw_acc.addmm_(z.T, b_c)  # the GEMM adds in fp32, the sum is rounded to the weight's dtype per chunk
            elif i0 == 0:
                dw_acc = _mm_fp32(z.T, b_c)  # [V, H]
            else:
                _accumulate_fp32(dw_acc, z.T, b_c)
            if scaled:
                triton_rows.add_target_rows(dw_acc, y_c, h_c, beta)
            if bias is not None:
                db_c = z.sum(0, dtype=torch.float32)
                db32 = db_c if db32 is None else db32.add_(db_c)
        logp[i0:i1] = lp
        lse[i0:i1] = ls
        if want_entropy:
            ent[i0:i1] = en
    workspace = z = None  # freed before dW's cast: the cast's output may reuse its memory (a lower peak)
    dw = None if dw_acc is None else dw_acc.to(w_in.dtype)
    db = None if db32 is None else db32.to(bias.dtype)
    return logp, ent, lse, dh, dw, db

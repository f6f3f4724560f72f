"""The LM-head engine: every op that reads the logits of h W^T (+ bias) / temperature without an [N, V] tensor.

- `scores`: the forward without gradients (logp, lse, entropy), by backend: Triton schedules (`scoring_fwd.py`,
  `triton_fwd.py`), the CUDA extension (`cuda_backend.py`), or chunked plain torch.
- `chunked_engine`: the three-pass forward + backward (`chunked.py`; `cuda_backend.lmhead_chunked` for "cuda"):
  head GEMM per chunk, the row kernel (`triton_rows.py`) with its per-token loss epilogue, then the dh / dW GEMMs.
  A loss plugs in either a gradient coefficient known before the pass (LOSS_GIVEN, LOSS_NLL) or a per-token step
  (`chunked.TokenStep`) that turns the row's log-prob into dLoss/dlogp between the row statistics and the dz write.
- `upstream.scale_by_upstream`: the backward of the ops whose gradients the forward formed (times the loss's incoming
  gradient, in place; untouched on the device when that is 1, with no host sync).
- `resolve_backend` and `autoselect`: "auto" | "triton" | "cuda" | "torch", and the measured rule behind "auto".
- `settings`: the callers' `schedule=` / `workspace_bytes=` and their environment defaults, read at call time, and
  the environment's precision modes (dW accumulation, gradient form).
The losses built on it live beside this folder: `ce/` (log-prob, cross-entropy), `policy/` (the RL policy losses),
`mgpo/` (the MGPO preset of policy_loss).
"""

from __future__ import annotations

import functools
import os

import torch

from . import autoselect, chunked, cuda_backend, scoring_fwd, settings, triton_fwd, triton_gemm, upstream

__all__ = ["autoselect", "settings", "upstream", "BACKENDS", "resolve_backend", "check_head_inputs",
           "prepare_head_inputs", "scores", "chunked_engine"]  # fmt: skip

BACKENDS = ("auto", "triton", "torch", "cuda")

# Forward (no grad) of backend "triton" by `schedule` (settings.py says what each costs).
FORWARD_SCHEDULES = {
    "epilogue": triton_gemm.linear_logprob_epilogue_fwd,
    "chunked": scoring_fwd.linear_logprob_chunked_fwd,
    "tiled": scoring_fwd.linear_logprob_tiled_fwd,
    "fused": triton_fwd.linear_logprob_fwd,
}


def resolve_backend(backend: str, device: torch.device, auto=None) -> str:
    """The backend that runs. auto: a zero-argument callable giving "auto"'s choice on CUDA tensors
    (`autoselect.auto_backend` of the call), or None where the call has no "cuda" path ("auto" is then "triton");
    an op refuses an explicit "cuda" it cannot run before it gets here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        cuda_backend.require_cuda_ext()
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got {device}")
        return backend
    if backend == "auto":
        if device.type == "cuda":
            return auto() if auto is not None else "triton"
        return "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    return backend


def check_head_inputs(hidden, weight, targets, bias, temperature):
    """Shapes, dtypes and devices of an LM-head op; raises ValueError naming the argument."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got shape {tuple(targets.shape)}")
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32) or (
        weight.dtype != hidden.dtype and weight.dtype != torch.float32
    ):
        raise ValueError(
            f"hidden and weight must share a float dtype (bf16/fp16/fp32), or weight be fp32 (a master copy: the op "
            f"computes in hidden's dtype), got {hidden.dtype}, {weight.dtype}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got shape {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def prepare_head_inputs(hidden, weight, targets, bias):
    """The inputs as the engine takes them: contiguous, targets int64."""
    return (hidden.contiguous(), weight.contiguous(), targets.to(torch.int64).contiguous(),
            None if bias is None else bias.contiguous())  # fmt: skip


def scores(hidden, weight, targets, bias, temperature: float, ignore_index: int, want_entropy: bool, backend: str,
           schedule: str | None = None, workspace_bytes: int | None = None):  # fmt: skip
    """Forward without gradients: (logp [N], lse [N], entropy [N], or [0] when not wanted), fp32. schedule (backend
    "triton" only) and workspace_bytes: see settings.py (None: the environment's default, read now). An fp32 weight
    with lower-precision hidden states is used in hidden's dtype."""
    with _own_precision(hidden):
        return _scores(hidden, weight, targets, bias, temperature, ignore_index, want_entropy, backend, schedule,
                       workspace_bytes)  # fmt: skip


def _own_precision(t: torch.Tensor):
    """The engine picks every GEMM's dtype itself (inputs in hidden's dtype, fp32 accumulators and outputs where it
    asks for them): an autocast region around the op (the trainer's) would recast them, e.g. an fp32 dW GEMM to bf16."""
    return torch.autocast(t.device.type, enabled=False)


def _scores(hidden, weight, targets, bias, temperature, ignore_index, want_entropy, backend, schedule,
            workspace_bytes):  # fmt: skip
    args = (hidden, weight.to(hidden.dtype), targets, bias, temperature, ignore_index, want_entropy)
    if backend == "cuda":
        return cuda_backend.linear_logprob_fwd(*args, workspace_bytes=workspace_bytes)
    if backend == "triton":
        name = settings.forward_schedule(schedule)
        if name == "epilogue" and not triton_gemm.eligible(bias, hidden, args[1]):
            name = "chunked"
        kw = {} if name == "fused" else {"workspace_bytes": workspace_bytes}  # the fused kernel has no workspace
        logp, lse, ent = FORWARD_SCHEDULES[name](*args, **kw)
        return logp, lse, ent if want_entropy else logp.new_empty(0)
    return chunked.scores_torch(*args, workspace_bytes=workspace_bytes)


def chunked_engine(backend: str, workspace_bytes: int | None = None):
    """The three-pass engine of a backend: vibeperf._C for "cuda", else chunked.py's (Triton or torch row epilogue);
    workspace_bytes bounds its logits workspace (None: $VIBEPERF_LMHEAD_WORKSPACE_MB, read at the call).

    An fp32 weight with lower-precision hidden states (a master copy: fp32 weights under autocast) computes in
    hidden's dtype and returns dW in fp32: chunked.py's engine hands over its fp32 accumulator as it is (no rounding
    to bf16 and back, no bf16 dW); the CUDA engine runs on a cast copy and its dW is cast up."""
    if backend == "cuda":
        return functools.partial(_engine, _cuda_in_compute_dtype, workspace_bytes=workspace_bytes)
    return functools.partial(_engine, chunked.lmhead_chunked, backend=backend, workspace_bytes=workspace_bytes)


def _engine(run, hidden, weight, *args, **kwargs):
    with _own_precision(hidden):
        return run(hidden, weight, *args, **kwargs)


def _cuda_in_compute_dtype(hidden, weight, *args, **kwargs):
    if weight.dtype == hidden.dtype and kwargs.get("need_dw", True) and (mode := settings.dw_accumulate()) != "fp32":
        raise ValueError(f"{settings.DW_ACC_ENV}={mode}: backend='cuda' accumulates dW in fp32 only; use "
                         "backend='triton' or 'auto'")  # fmt: skip
    if weight.dtype == hidden.dtype:
        return cuda_backend.lmhead_chunked(hidden, weight, *args, **kwargs)
    logp, ent, lse, dh, dw, db = cuda_backend.lmhead_chunked(hidden, weight.to(hidden.dtype), *args, **kwargs)
    return logp, ent, lse, dh, None if dw is None else dw.to(weight.dtype), db

"""The LM-head engine's two caller settings and their environment defaults, read at call time (never at import).

Every public op of `ce/`, `policy/` and `mgpo/` takes them as keyword arguments:
- `schedule`: the no-grad forward of backend "triton": "epilogue" (default; the head GEMM folds each output tile
  into softmax statistics and stores no logit: `triton_gemm.py`, 64 MiB of partials; bias-free bf16/fp16 inputs
  with 16-byte aligned rows, others run "chunked"), "chunked" (cuBLAS GEMM into a 1 GiB logits workspace, then a
  pass over it), "tiled" (<= 64 MiB extra memory) or "fused" (one Triton kernel, no workspace, slowest); see
  `scoring_fwd.py` and benchmarks/NOTES.md. None: $VIBEPERF_LMHEAD_FWD, else "epilogue".
- `workspace_bytes`: the most bytes the [C, V] logits workspace of the call may take (C tokens per chunk or tile; at
  least 128 rows of the three-pass engine whatever the budget). None: the default of the pass that runs, each with its
  own variable in MiB: the three-pass engine and the "cuda" / "torch" scoring forward $VIBEPERF_LMHEAD_WORKSPACE_MB
  (1280: 4,096 rows of the Qwen2.5 or Llama-3 vocabulary in bf16, see `chunked.chunk_rows`), the "chunked" schedule
  $VIBEPERF_LMHEAD_SCORE_MB (1024), the "tiled" schedule $VIBEPERF_LMHEAD_TILE_MB (32), the "epilogue" schedule's
  partials $VIBEPERF_LMHEAD_EPILOGUE_MB (64).
Two settings are the environment's alone, like torch's own switches of reduced-precision reductions: they are
precision modes of the whole run, not of a call.
- $VIBEPERF_LMHEAD_DW_ACC: how the three-pass engine sums dW over its chunks when dW is wanted in a dtype below fp32.
  "fp32" (default): in an fp32 [V, H] accumulator, cast once at the end. "weight": in the weight's dtype, into dW
  itself, as Liger-Kernel does: no accumulator (the Qwen2.5 head's 1.16 GiB, the Llama-3 head's 1.96 GiB) and no
  fp32 read and write per chunk, for one rounding per chunk (benchmarks/NOTES.md gives the error measured). Backend
  "cuda" has the fp32 accumulator only: "auto" then takes "triton" for gradients, and an explicit "cuda" refuses.
- $VIBEPERF_LMHEAD_GRAD: how backend "triton" forms dz on its fused head GEMM (bias-free bf16 inputs, no entropy
  gradient; elsewhere "rows" always). "scaled" (default): the head GEMM stores P = 2^(z - mref) per row (mref from
  the target's logit, known before it) and dz = alpha P + beta onehot(y) row by row, so no pass touches the chunk
  between the GEMMs; the target's term, each row's largest, goes beside the GEMMs in fp32 and is rounded once.
  "rows": a row pass reads each chunk's logits and writes dz in their place. benchmarks/NOTES.md has the H200 runs
  of both (time, and dh / dW errors: the scaled form's are the smaller).
A variable set after import takes effect at the next call; a bad value is a one-line ValueError naming it.
"""

from __future__ import annotations

import os

SCHEDULES = ("epilogue", "chunked", "tiled", "fused")
SCHEDULE_ENV = "VIBEPERF_LMHEAD_FWD"
WORKSPACE_ENV = ("VIBEPERF_LMHEAD_WORKSPACE_MB", 1280)
SCORE_ENV = ("VIBEPERF_LMHEAD_SCORE_MB", 1024)
TILE_ENV = ("VIBEPERF_LMHEAD_TILE_MB", 32)
EPILOGUE_ENV = ("VIBEPERF_LMHEAD_EPILOGUE_MB", 64)
DW_ACC_ENV = "VIBEPERF_LMHEAD_DW_ACC"
DW_ACCUMULATE = ("fp32", "weight")
GRAD_ENV = "VIBEPERF_LMHEAD_GRAD"
GRAD_FORMS = ("scaled", "rows")


def forward_schedule(schedule: str | None) -> str:
    """The schedule given, else $VIBEPERF_LMHEAD_FWD, else "epilogue"; ValueError naming the argument or variable."""
    if schedule is not None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        return schedule
    return _env_choice(SCHEDULE_ENV, SCHEDULES)


def dw_accumulate() -> str:
    """$VIBEPERF_LMHEAD_DW_ACC read now: "fp32" (unset) or "weight"; ValueError naming the variable otherwise."""
    return _env_choice(DW_ACC_ENV, DW_ACCUMULATE)


def grad_form() -> str:
    """$VIBEPERF_LMHEAD_GRAD read now: "scaled" (unset) or "rows"; ValueError naming the variable otherwise."""
    return _env_choice(GRAD_ENV, GRAD_FORMS)


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The variable `name` read now, one of `choices` (unset or blank: the first); ValueError naming it otherwise."""
    raw = os.environ.get(name, "").strip()
    if raw and raw not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {raw!r}")
    return raw or choices[0]


def check_workspace(workspace_bytes: int | None) -> int | None:
    """workspace_bytes as given (None or a positive int); ValueError naming the argument otherwise."""
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes < 1):  # fmt: skip
        raise ValueError(f"workspace_bytes must be a positive int or None, got {workspace_bytes!r}")
    return workspace_bytes


def workspace(workspace_bytes: int | None, env: tuple[str, int]) -> int:
    """workspace_bytes, or the variable env = (name, default MiB) read now, in bytes."""
    if workspace_bytes is not None:
        return workspace_bytes
    name, default_mb = env
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default_mb * 2**20
    try:
        mb = int(raw)
    except ValueError:
        mb = 0
    if mb < 1:
        raise ValueError(f"{name} must be a positive whole number of MiB, got {raw!r}")
    return mb * 2**20

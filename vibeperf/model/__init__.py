"""The model side every stage shares: loading for training, varlen attention, packed rows, the fused-loss wrapper.

- `load`: `resolve_device`, `resolve_precision`, `model_path`, `load_model` (precision, device, Liger body kernels,
  activation checkpointing, varlen attention), `apply_liger`.
- `attention`: varlen attention over packed rows, registered with transformers on import (`use_varlen_attention`).
- `packing`: `Sample`, `PackedRow`, `make_row`, `pack_rows`, `truncate` (samples back to back, positions restarting).
- `chat`: `tokenize_records`, chat records to `Sample`s with loss on the assistant tokens only.
- `fused`: `FusedLossLM` (body + fused LM-head loss; the FSDP root under torchrun), `head_inputs`, `patch_causal_lm`.
- `flops`: `step_flops`, `matmul_params`, `measure_peak_tflops` (MFU accounting).

The stages (`vibeperf.sft`, `vibeperf.rl`, `vibeperf.distill`, `vibeperf.eval`, `vibeperf.score`) import from here;
nothing here imports a stage.
"""

from vibeperf.model.attention import ATTENTION_CALLS, resolve_attention, use_varlen_attention
from vibeperf.model.chat import tokenize_records
from vibeperf.model.flops import matmul_params, measure_peak_tflops, step_flops
from vibeperf.model.fused import FusedLossLM, head_inputs, patch_causal_lm, unpatch_causal_lm
from vibeperf.model.load import (
    apply_liger,
    compute_dtype,
    load_model,
    model_path,
    resolve_device,
    resolve_precision,
)
from vibeperf.model.packing import IGNORE_INDEX, PackedRow, Sample, make_row, pack_rows, truncate

__all__ = [
    "ATTENTION_CALLS",
    "IGNORE_INDEX",
    "FusedLossLM",
    "PackedRow",
    "Sample",
    "apply_liger",
    "compute_dtype",
    "head_inputs",
    "load_model",
    "make_row",
    "matmul_params",
    "measure_peak_tflops",
    "model_path",
    "pack_rows",
    "patch_causal_lm",
    "resolve_attention",
    "resolve_device",
    "resolve_precision",
    "step_flops",
    "tokenize_records",
    "truncate",
    "unpatch_causal_lm",
    "use_varlen_attention",
]

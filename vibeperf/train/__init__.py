"""The training core every stage shares (torchtitan's `components/`): optimizer, schedule, checkpoints, metrics.

- `optim`: `make_optimizer` (AdamW), `clip_gradients` (foreach; DTensor-aware), `FiniteCheck` (loss / grad norm).
- `master`: `MasterAdamW` (AdamW on fp32 masters of bf16 parameters: precision "bf16-master").
- `schedule`: `Schedule` of `Segment`s (an SFT stage, an RL phase), each a linear warm-up and a cosine.
- `checkpoint`: `Checkpointer` (atomic save, list, resume, keep-last, HF export, DCP shards under torchrun).
- `metrics`: `MetricsWriter` (metrics.jsonl, plots drawn from it, atomic files; a torn last line dropped on resume).
- `preempt`: `Preemption` (SIGTERM / SIGINT: checkpoint at the next step boundary, stop, exit 0).

The stage loops (`vibeperf.sft.trainer`, `vibeperf.rl.trainer`, `vibeperf.distill`) use these; nothing here imports a
stage.
"""

from vibeperf.train.checkpoint import STATE_JSON, STATE_PT, Checkpointer, list_checkpoints, rng_state, set_rng_state
from vibeperf.train.master import MasterAdamW
from vibeperf.train.metrics import MetricsWriter
from vibeperf.train.optim import FiniteCheck, clip_gradients, make_optimizer
from vibeperf.train.preempt import Preemption, stopped_note
from vibeperf.train.schedule import Schedule, Segment

__all__ = [
    "STATE_JSON",
    "STATE_PT",
    "Checkpointer",
    "FiniteCheck",
    "MasterAdamW",
    "MetricsWriter",
    "Preemption",
    "Schedule",
    "Segment",
    "clip_gradients",
    "list_checkpoints",
    "make_optimizer",
    "rng_state",
    "set_rng_state",
    "stopped_note",
]

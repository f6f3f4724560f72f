"""The learning-rate schedule of every trainer: segments (SFT stages, RL phases), each a linear warm-up + cosine.

A `Segment` is a run of `num_steps` optimizer steps starting at global step `first_step`, with a linear warm-up over
its first `warmup` steps to `lr` and a cosine from `lr` to `min_lr` over the rest. `Schedule.build(parts, optim)`
lays named parts (name, steps, lr or None, min_lr or None) end to end with the recipe's defaults; `lr_at(step)` is
the learning rate of a global step and `scheduler(optimizer)` the `LambdaLR` that applies it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vibeperf.config import OptimConfig


@dataclass(frozen=True)
class Segment:
    """A run of steps with its own warm-up and cosine."""

    name: str
    first_step: int
    num_steps: int
    lr: float
    min_lr: float
    warmup: int

    def lr_at(self, offset: int) -> float:
        """Learning rate `offset` steps into the segment (past its end: the last step's)."""
        s = min(offset, self.num_steps - 1)
        if s < self.warmup:
            return self.lr * (s + 1) / self.warmup
        progress = (s - self.warmup) / max(1, self.num_steps - self.warmup - 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """Segments laid end to end over the global step count."""

    segments: tuple[Segment, ...]

    @classmethod
    def build(cls, parts: Sequence[tuple[str, int, float | None, float | None]], optim: OptimConfig) -> Schedule:
        """One segment per (name, steps, lr, min_lr): lr defaults to optim.lr, min_lr to min(optim.min_lr, lr), the
        warm-up is ceil(optim.warmup_frac * steps)."""
        segments, first = [], 0
        for name, steps, lr, min_lr in parts:
            lr = lr if lr is not None else optim.lr
            min_lr = min_lr if min_lr is not None else min(optim.min_lr, lr)
            segments.append(Segment(name, first, steps, lr, min_lr, math.ceil(optim.warmup_frac * steps)))
            first += steps
        return cls(tuple(segments))

    @property
    def total_steps(self) -> int:
        last = self.segments[-1]
        return last.first_step + last.num_steps

    def locate(self, step: int) -> tuple[int, int]:
        """(segment index, steps into it) of global step `step`; past the end, the last segment."""
        i = next((i for i, g in enumerate(self.segments) if step < g.first_step + g.num_steps), len(self.segments) - 1)
        return i, step - self.segments[i].first_step

    def lr_at(self, step: int) -> float:
        """Learning rate of global step `step`."""
        i, offset = self.locate(step)
        return self.segments[i].lr_at(offset)

    def scheduler(self, optimizer: torch.optim.Optimizer, base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR giving `lr_at(step)` to an optimizer built with lr `base_lr`."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.lr_at(s) / base_lr)

"""AdamW as every trainer builds it, gradient clipping, and the finite-loss / grad-norm check of a step.

- `make_optimizer(model, optim, device)`: AdamW with weight decay on matrices only; fused on CUDA, foreach on the CPU.
- `clip_gradients(model, max_norm)`: the global gradient norm (foreach kernels; a DTensor norm under FSDP is made
  full), gradients scaled to `max_norm` when it is > 0.
- `FiniteCheck`: collects "loss or grad norm not finite" on the device step after step (no host sync) and raises
  `FloatingPointError` naming the steps when the caller reads it (at a logging step, which syncs anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from vibeperf.config import OptimConfig
from vibeperf.distributed import to_full


def make_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused on CUDA, foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, **impl)  # fmt: skip


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global grad norm [] (device tensor) over (possibly sharded) parameters; grads scaled to `max_norm` when > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return to_full(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return to_full(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))


class FiniteCheck:
    """A device flag set when a step's loss or grad norm is not finite; `raise_if_bad` reads it (one host sync)."""

    def __init__(self, device: torch.device, first_step: int = 0):
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first = first_step

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)

    def raise_if_bad(self, step: int) -> None:
        """FloatingPointError when a step since the last call (or `first_step`) up to `step` was not finite."""
        if bool(self.bad):
            raise FloatingPointError(f"non-finite loss or gradient norm between steps {self.first + 1} and {step}")
        self.first = step

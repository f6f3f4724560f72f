"""AdamW as every trainer builds it, gradient clipping, and the finite-loss / grad-norm check of a step.

- `make_optimizer(model, optim, device)`: AdamW with weight decay on matrices only; fused on CUDA, foreach on the CPU;
  with `master_weights`, on fp32 copies of bf16 parameters (`vibeperf.train.master`).
- `clip_gradients(model, max_norm)`: the global gradient norm (foreach kernels; a DTensor norm under FSDP is made
  full), gradients scaled to `max_norm` when it is > 0.
- `FiniteCheck`: the `optim.nonfinite` policy of a step whose loss or grad norm is not finite. "stop": collected on
  the device update after update (no host sync) and raised as a `RunError` naming the steps when the caller reads it
  (at a logging step, which syncs anyway). "skip": `allow()` reads it before each optimizer step (one host sync; under
  torchrun the verdict of every process counts) and the update is left out and counted.
"""

from __future__ import annotations

import torch
from torch import nn

from vibeperf import distributed as vdist
from vibeperf.config import OptimConfig
from vibeperf.distributed import to_full
from vibeperf.errors import RunError
from vibeperf.train.master import MasterAdamW


def make_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device, *,
                   master_weights: bool = False) -> torch.optim.AdamW:  # fmt: skip
    """AdamW with weight decay on matrices only; fused on CUDA, foreach elsewhere. `master_weights` (precision
    "bf16-master"): the update runs on fp32 copies of the (bf16) parameters (`vibeperf.train.master.MasterAdamW`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    cls = MasterAdamW if master_weights else torch.optim.AdamW
    return cls([g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, **impl)  # fmt: skip


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global grad norm [] (device tensor) over (possibly sharded) parameters; grads scaled to `max_norm` when > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return to_full(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return to_full(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))


class FiniteCheck:
    """The non-finite policy of a training loop (see the module docstring); `skipped` counts the updates left out
    (starting from `skipped`: a resumed run passes its checkpoint's count)."""

    def __init__(self, device: torch.device, first_step: int = 0, policy: str = "stop", skipped: int = 0):
        if policy not in ("stop", "skip"):
            raise ValueError(f"policy must be 'stop' or 'skip', got {policy!r}")
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first, self.policy, self.skipped = first_step, policy, skipped

    def allow(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether to apply the update of this loss and grad norm: always under "stop" (the flag is collected for
        `raise_if_bad`); under "skip" only when both are finite everywhere (else counted in `skipped`)."""
        bad = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        if self.policy == "stop":
            self.bad |= bad
            return True
        if bool(vdist.all_reduce(bad.to(torch.float32), "max")):
            self.skipped += 1
            return False
        return True

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Collect the flag of updates already applied ("stop"); under "skip" `allow` has decided already."""
        if self.policy == "stop":
            self.bad |= ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)

    def raise_if_bad(self, step: int) -> None:
        """RunError when a step since the last call (or `first_step`) up to `step` was not finite."""
        if bool(self.bad):
            first = self.first + 1
            steps = f"step {step}" if first == step else f"a step between {first} and {step}"
            raise RunError(f"{steps}: non-finite loss or gradient norm; the run stops here, its last checkpoint stays "
                           "the latest (optim.nonfinite=skip leaves such updates out instead)")  # fmt: skip
        self.first = step

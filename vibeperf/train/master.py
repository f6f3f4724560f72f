"""AdamW on fp32 master copies of bf16 parameters (precision "bf16-master").

The model holds bf16 parameters and gradients (half the memory and none of autocast's per-matmul weight casts);
`MasterAdamW` keeps an fp32 copy of every parameter and runs torch's AdamW on those copies, so the update is the
fp32 update: small steps are not rounded away in bf16. A step: bf16 grads -> fp32 master grads, AdamW on the
masters, masters rounded back into the bf16 parameters. Gradient clipping runs on the model's grads before
`step`, as for any optimizer. The masters travel in `state_dict()` (key "master_weights") so a resume restores
them exactly; they are parameters' values, not hyper-parameters, so the schedule sees plain AdamW param groups.
"""

from __future__ import annotations

import torch

MASTER_KEY = "master_weights"


class MasterAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over fp32 copies of `params` (groups or a list); writes the result back into `params`."""

    def __init__(self, params, **adamw_kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._models: list[torch.Tensor] = []
        master_groups = []
        for g in groups:
            masters = []
            for p in g["params"]:
                self._models.append(p)
                masters.append(p.detach().float().clone().requires_grad_(True))
            master_groups.append({**g, "params": masters})
        super().__init__(master_groups, **adamw_kwargs)
        self._masters = [m for g in self.param_groups for m in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("MasterAdamW.step takes no closure")
        for p, m in zip(self._models, self._masters):
            m.grad = None if p.grad is None else p.grad.float()
        super().step()
        pairs = [(p, m) for p, m in zip(self._models, self._masters) if m.grad is not None]
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        for m in self._masters:
            m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._models:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd[MASTER_KEY] = [m.detach().clone() for m in self._masters]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop(MASTER_KEY, None)
        super().load_state_dict(state_dict)
        if masters is None:
            raise KeyError(f"MasterAdamW.load_state_dict: no {MASTER_KEY!r} (a plain AdamW state dict?)")
        with torch.no_grad():
            for p, m, saved in zip(self._models, self._masters, masters, strict=True):
                m.copy_(saved)
                p.copy_(saved)

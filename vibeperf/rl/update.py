"""The policy update of one RL step: old log-probs (skipped when on-policy), the MGPO loss per packed row, AdamW.

`policy_update(root, minibatches, advantages, opts)` runs, for the rows of each minibatch (one optimizer step per
minibatch), the model body and the fused LM-head policy loss (`vibeperf.kernels.policy_loss` with
`LossConfig.policy_options`: the MGPO preset by default) through the
`vibeperf.model.FusedLossLM` root, in one code path for one process and for FSDP (where `root` is the sharded root
and padding rows keep the collectives matched):

1. Old log-probs. With more than one minibatch the later minibatches are off-policy, so a no-grad forward of every
   row before the first optimizer step gives log pi_old (`linear_logprob`, with the entropy). With one minibatch the
   step is on-policy: pi_old is the current policy, so that forward is skipped and the loss's own forward provides
   them, detached, as verl does (`old_logprob = log_prob.detach()`): the row's hidden states feed `linear_logprob`
   under no_grad (an LM-head pass, about a tenth of a 3B model's forward), then the loss with those as old_logp.
   The ratio is then 1 and the loss and gradients are those of the forced pass. `force_old_logp_pass` runs the
   separate forward anyway (to measure the saving). The kernel's own on-policy mode (old_logp=None, no extra head
   pass) is not used: it refuses the truncated IS against the engine's log-probs, and it returns no per-token
   log-probs for the engine gap.
2. Each row's loss times `row_scales` (its share of the minibatch's aggregation, normaliser summed over processes),
   backward, accumulating into `.grad`; then foreach clipping and an optimizer step per minibatch.
3. Metrics (device tensors, summed over processes): token means of the loss's clip fractions, ratio and TIS share,
   the entropy and the gap between the trainer's and the engine's log-probs of the sampled tokens (a weight-sync or
   numerics check), the loss, the grad norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vibeperf import distributed as vdist
from vibeperf.kernels import PolicyLossOptions, linear_logprob, policy_loss
from vibeperf.rl.config import LossConfig
from vibeperf.rl.data import RLRow, row_scales
from vibeperf.train import FiniteCheck, clip_gradients

TOKEN_MEANS = ("clip_frac_low", "clip_frac_high", "ratio_mean", "tis_frac")

# A minibatch: this process's packed rows, each with whether it is real (False: a padding row under FSDP).
Minibatch = Sequence[tuple[RLRow, bool]]


@dataclass
class UpdateOptions:
    """What the update needs besides the rows: the loss settings, clipping and the compute context."""

    loss: LossConfig
    grad_clip: float
    device: torch.device
    autocast: torch.dtype | None = None

    @property
    def policy(self) -> PolicyLossOptions:
        """The kernel options of the loss (`LossConfig.policy_options`)."""
        return self.loss.policy_options()

    def context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def on_policy(minibatches: Sequence[Minibatch], loss: LossConfig) -> bool:
    """Whether the step can use the loss forward's own log-probs as the old ones (one minibatch, not forced)."""
    return len(minibatches) == 1 and not loss.force_old_logp_pass


class _Gap:
    """Entropy and the trainer-vs-engine log-prob gap over the valid tokens of the rows seen (device sums)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, device=device)
        self.max = torch.zeros((), device=device)

    def add(self, r: RLRow, real: bool, logp: torch.Tensor, entropy: torch.Tensor) -> None:
        valid = (r.row.targets != -100) & bool(real)
        gap = (logp - r.rollout_logp).abs()[valid]
        self.sums += torch.stack([entropy[valid].sum(), gap.sum(), valid.sum().to(torch.float32)])
        self.max = torch.maximum(self.max, gap.max() if gap.numel() else gap.new_zeros(()))

    def metrics(self) -> dict[str, torch.Tensor]:
        sums, gap_max = vdist.all_reduce(self.sums), vdist.all_reduce(self.max, "max")
        n = sums[2].clamp_min(1)
        return {"entropy_mean": sums[0] / n, "logp_gap_mean": sums[1] / n, "logp_gap_max": gap_max}


def _logprobs(h, w, b, targets, backend):
    """(logp [T], entropy [T]) of the targets, without gradient."""
    with torch.no_grad():
        return linear_logprob(
            h.detach(),
            w.detach(),
            targets,
            bias=None if b is None else b.detach(),
            return_entropy=True,
            backend=backend,
        )


@torch.no_grad()
def old_logprobs(root, rows: Sequence[tuple[RLRow, bool]], opts: UpdateOptions, gap: _Gap) -> list[torch.Tensor]:
    """log pi_old of every row's targets: a forward of the body and the LM head per row, no gradient."""
    olds = []
    for r, real in rows:
        with opts.context():
            logp, entropy = root(
                r.row.model_inputs(), head_fn=lambda h, w, b, t=r.row.targets: _logprobs(h, w, b, t, opts.loss.backend)
            )
        gap.add(r, real, logp, entropy)
        olds.append(logp)
    return olds


def policy_update(
    root,
    optimizer: torch.optim.Optimizer,
    minibatches: Sequence[Minibatch],
    advantages: torch.Tensor,
    opts: UpdateOptions,
    *,
    finite: FiniteCheck | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step per minibatch of packed rows (see the module docstring); returns the update's metrics as
    device tensors (over every process). `advantages`: [S] A' of the step's sequences (indexed by `RLRow.seq_ids`),
    on the device; `root`: a `FusedLossLM` (the FSDP root under torchrun), whose parameters the optimizer steps.
    `finite`: the run's non-finite policy; under optim.nonfinite="skip" it leaves out a minibatch's optimizer step
    whose loss or grad norm is not finite (`FiniteCheck.allow`)."""
    lc, dev, policy = opts.loss, opts.device, opts.policy
    gap = _Gap(dev)
    skip_old = on_policy(minibatches, lc)
    olds = [] if skip_old else old_logprobs(root, [x for mb in minibatches for x in mb], opts, gap)
    sums = {k: torch.zeros((), device=dev) for k in (*TOKEN_MEANS, "loss", "tokens", "rows")}
    ratio_max, gnorms, k = torch.zeros((), device=dev), [], 0
    for mb in minibatches:
        optimizer.zero_grad(set_to_none=True)
        loss_before = sums["loss"].clone()
        scales = row_scales([r for r, _ in mb], lc.aggregation, real=[ok for _, ok in mb], device=dev)
        for (r, real), scale in zip(mb, scales):

            def head(h, w, b, r=r, old=None if skip_old else olds[k]):
                current = _logprobs(h, w, b, r.row.targets, lc.backend) if old is None else None
                out = policy_loss(h, w, r.row.targets, bias=b, seq_index=r.seq_index,
                                  group_index=torch.zeros(len(r.seq_ids), dtype=torch.int64, device=dev),
                                  advantages=advantages[r.seq_ids], old_logp=old,
                                  rollout_logp=r.rollout_logp if lc.truncated_is else None, options=policy,
                                  num_groups=1, backend=lc.backend)  # fmt: skip
                return out.loss, out.metrics, current

            with opts.context():
                loss, metrics, current = root(r.row.model_inputs(), head_fn=head)
            (loss * scale).backward()
            if current is not None:
                gap.add(r, real, *current)
            valid = sum(r.num_valid) * real
            for key in TOKEN_MEANS:
                sums[key] += metrics[key] * valid
            sums["loss"] += loss.detach() * scale
            sums["tokens"] += valid
            sums["rows"] += real
            if real:
                ratio_max = torch.maximum(ratio_max, metrics["ratio_max"])
            k += 1
        gnorms.append(clip_gradients(root, opts.grad_clip))
        if finite is None or finite.allow(sums["loss"] - loss_before, gnorms[-1]):
            optimizer.step()
    keys = list(sums)
    sums = dict(zip(keys, vdist.all_reduce(torch.stack([sums[key] for key in keys]))))
    tokens = sums["tokens"].clamp_min(1)
    out = {key: sums[key] / tokens for key in TOKEN_MEANS}
    out |= {
        "loss": sums["loss"] / len(minibatches),
        "ratio_max": vdist.all_reduce(ratio_max, "max"),
        "grad_norm": torch.stack(gnorms).max(),
        "rows": sums["rows"],
        **gap.metrics(),
    }
    return out

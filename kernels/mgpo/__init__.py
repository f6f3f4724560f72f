"""MGPO (MaxEnt-Guided Policy Optimization), the VibeThinker recipe's loss: the MGPO preset of `policy_loss`.

`mgpo_loss` keeps the signature the RL trainer calls and maps it onto `policy.policy_loss` with
PolicyLossOptions(loss_type="grpo", aggregation=..., epsilon_low/high, advantage="group" | "no_std",
mgpo_lambda, beta with the k3 KL, rollout_correction="token_tis" with rollout_cap=tis_cap when rollout_logp is
given). New code should call `policy_loss` directly, e.g.

    from vibeperf.kernels import PolicyLossOptions, policy_loss
    out = policy_loss(hidden, weight, targets, seq_index=..., group_index=..., rewards=..., old_logp=...,
                      options=PolicyLossOptions(loss_type="grpo", mgpo_lambda=1.0, epsilon_high=0.28))

which adds every other loss type, GSPO, dual-clip, other KL estimators, rollout corrections and the entropy bonus.
"""

from __future__ import annotations

import torch

from ..policy import PolicyLossOptions, policy_loss
from .reference import ADVANTAGE_SCALES, AGGREGATIONS, MGPOOutput, mgpo_loss_reference

__all__ = ["mgpo_loss", "mgpo_loss_reference", "MGPOOutput", "mgpo_options"]

MGPO_METRICS = ("tis_frac", "kl_mean", "clip_frac_low", "clip_frac_high", "entropy_mean", "ratio_mean", "ratio_max",
                "mgpo_weights", "advantages")  # fmt: skip


def mgpo_options(*, mgpo_lambda=0.0, scale="group", eps_low=0.2, eps_high=0.2, aggregation="seq-mean-token-mean",
                 tis_cap=2.0, beta=0.0, with_rollout=False) -> PolicyLossOptions:  # fmt: skip
    """The PolicyLossOptions of mgpo_loss's arguments; raises ValueError naming the argument."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    for name, ok in [("mgpo_lambda", mgpo_lambda >= 0), ("tis_cap", tis_cap > 0), ("beta", beta >= 0),
                     ("eps_low / eps_high", 0 <= eps_low < 1 and eps_high >= 0)]:  # fmt: skip
        if not ok:
            raise ValueError(f"{name} out of range: mgpo_lambda={mgpo_lambda}, tis_cap={tis_cap}, beta={beta}, "
                             f"eps_low={eps_low}, eps_high={eps_high}")  # fmt: skip
    return PolicyLossOptions(
        loss_type="grpo", aggregation=aggregation, epsilon_low=float(eps_low), epsilon_high=float(eps_high),
        advantage="no_std" if scale == "none" else scale, mgpo_lambda=float(mgpo_lambda), beta=float(beta), kl="k3",
        rollout_correction="token_tis" if with_rollout else None, rollout_cap=float(tis_cap),
    )  # fmt: skip


def mgpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor,
    group_index: torch.Tensor,
    old_logp: torch.Tensor,
    rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    mgpo_lambda: float = 0.0,
    scale: str = "group",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    tis_cap: float = 2.0,
    beta: float = 0.0,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_groups: int | None = None,
    backend: str = "auto",
    schedule: str | None = None,
    workspace_bytes: int | None = None,
) -> MGPOOutput:
    """MGPO clipped policy-gradient loss of an LM head on packed tokens, with its metrics, without a host sync.

    Tensors as `policy_loss` (old_logp required). The math is `reference.mgpo_loss_reference`'s (DESIGN.md
    section 2): A' = w_ME(group) * A from the rewards (group advantages with `scale` "group" | "none", MaxEnt weight
    with `mgpo_lambda`), or `advantages` as given; per valid token ratio = exp(logp - old_logp),
    objective = min(ratio A', clip(ratio, 1 - eps_low, 1 + eps_high) A') * is_w - beta * k3(ref_logp, logp) with
    is_w = min(exp(old_logp - rollout_logp), tis_cap) (detached; 1 without rollout_logp), and
    loss = -aggregation(objective): "seq-mean-token-mean", "token-mean" or "seq-sum-norm".

    Returns MGPOOutput(loss [] fp32, metrics): clip_frac_low, clip_frac_high, entropy_mean, ratio_mean, ratio_max,
    tis_frac (0 without rollout_logp), kl_mean (only when beta > 0), mgpo_weights [num_groups], advantages [S].
    schedule, workspace_bytes: the LM-head engine's settings, as `policy_loss` (`lmhead/settings.py`).
    """
    if old_logp is None:
        raise ValueError("old_logp is required by mgpo_loss (policy_loss takes None for an on-policy step)")
    options = mgpo_options(
        mgpo_lambda=mgpo_lambda,
        scale=scale,
        eps_low=eps_low,
        eps_high=eps_high,
        aggregation=aggregation,
        tis_cap=tis_cap,
        beta=beta,
        with_rollout=rollout_logp is not None,
    )
    out = policy_loss(hidden, weight, targets, seq_index=seq_index, group_index=group_index, old_logp=old_logp,
                      rewards=rewards, advantages=advantages, rollout_logp=rollout_logp, ref_logp=ref_logp,
                      options=options, temperature=temperature, loss_mask=loss_mask, bias=bias,
                      ignore_index=ignore_index, num_groups=num_groups, backend=backend, schedule=schedule,
                      workspace_bytes=workspace_bytes)  # fmt: skip
    return MGPOOutput(out.loss, {k: v for k, v in out.metrics.items() if k in MGPO_METRICS})

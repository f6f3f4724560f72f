"""RL policy losses fused into the LM head: `policy_loss` with its settings in `PolicyLossOptions`.

The family of DESIGN.md section 2b (TRL 1.x / Liger-Kernel 0.8.5 semantics): PPO-clip (grpo, bnpo, dr_grpo, dapo)
with dual-clip and two-sided delta, CISPO, SAPO; token, sequence (GSPO) and sequence_token (GSPO-token) importance
ratios; four aggregations; k1 / k2 / k3 KL with optional bias correction; rollout correction (token / sequence
truncated IS, token / sequence masking, IcePop); an entropy bonus; group / no-std / RLOO advantages with the optional
MGPO weight, computed on the device. Loss, metrics and the gradients of hidden / weight (/ bias) cost three GEMM-sized
passes (four where whole sequences' log-probs are needed first, e.g. an off-policy GSPO ratio: `ops.extra_pass`),
never [N, V] logits, never a host sync.

backend="auto": on CUDA tensors "cuda" (vibeperf._C, whose row kernel has its own closed form of the PPO-clip subset:
token ratio, token TIS, k3 KL, no entropy bonus; `ops.cuda_unsupported`) where the measured table of
`lmhead.autoselect` picks it, else "triton"; on the CPU "torch", or "triton" when TRITON_INTERPRET=1. An explicit
"cuda" with a setting outside that subset raises an error naming the setting. schedule (the scoring forward of
"triton", where a pass needs whole sequences' log-probs first) and workspace_bytes (the logits workspace budget):
`lmhead/settings.py`; None takes the environment's default at the call.
"""

from __future__ import annotations

import torch

from ..lmhead import autoselect, check_head_inputs, prepare_head_inputs, resolve_backend, settings
from . import ops
from .advantages import group_statistics, token_weights
from .options import PolicyLossOptions
from .reference import PolicyLossOutput, policy_loss_reference

__all__ = ["policy_loss", "PolicyLossOptions", "PolicyLossOutput", "policy_loss_reference", "group_statistics",
           "token_weights"]  # fmt: skip


def check_policy_inputs(n, seq_index, group_index, rewards, advantages, old_logp, rollout_logp, ref_logp, loss_mask,
                        options, num_groups):  # fmt: skip
    """Shapes, dtypes and the options' needs; raises ValueError naming the argument. Never reads a tensor's values."""
    if not isinstance(options, PolicyLossOptions):
        raise ValueError(f"options must be a PolicyLossOptions, got {type(options).__name__}")
    if seq_index.shape != (n,) or seq_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seq_index must be an integer [N={n}] tensor, got {seq_index.dtype} {tuple(seq_index.shape)}")
    if group_index.dim() != 1 or group_index.numel() == 0 or group_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"group_index must be a non-empty integer [S] tensor, got {group_index.dtype} "
                         f"{tuple(group_index.shape)}")  # fmt: skip
    s = group_index.numel()
    if (rewards is None) == (advantages is None):
        raise ValueError("give exactly one of rewards and advantages")
    for name, t, size in [("rewards", rewards, s), ("advantages", advantages, s), ("old_logp", old_logp, n),
                          ("rollout_logp", rollout_logp, n), ("ref_logp", ref_logp, n)]:  # fmt: skip
        if t is not None and (t.shape != (size,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float [{size}] tensor, got {t.dtype} {tuple(t.shape)}")
    if loss_mask is not None and (loss_mask.shape != (n,) or loss_mask.dtype != torch.bool):
        raise ValueError(f"loss_mask must be a bool [N={n}] tensor, got {loss_mask.dtype} {tuple(loss_mask.shape)}")
    if options.beta > 0 and ref_logp is None:
        raise ValueError("PolicyLossOptions.beta > 0 needs ref_logp")
    if options.rollout_correction is not None and rollout_logp is None:
        raise ValueError(f"PolicyLossOptions.rollout_correction={options.rollout_correction!r} needs rollout_logp")
    if num_groups is not None and not (isinstance(num_groups, int) and num_groups >= 1):
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")


def policy_metrics(terms, entropy, valid, weights, adv, with_kl) -> dict[str, torch.Tensor]:
    """Token means over the valid tokens of the op's per-token terms [N, 7] (ops.METRIC_TERMS) and entropy [N]."""
    per_token = torch.cat([terms, entropy[:, None]], dim=1)
    ratio, kl, low, high, dual, tis, mis, ent = (per_token.sum(0) / valid.sum().clamp_min(1)).unbind(0)
    metrics = {"kl_mean": kl} if with_kl else {}
    metrics |= {
        "clip_frac_low": low, "clip_frac_high": high, "dual_clip_frac": dual, "tis_frac": tis, "mis_frac": mis,
        "entropy_mean": ent, "ratio_mean": ratio,
        "ratio_max": terms[:, 0].amax() if terms.shape[0] else terms.new_zeros(()),
        "mgpo_weights": weights, "advantages": adv,
    }  # fmt: skip
    return metrics


def policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor,
    group_index: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_groups: int | None = None,
    backend: str = "auto",
    schedule: str | None = None,
    workspace_bytes: int | None = None,
) -> PolicyLossOutput:
    """Policy-gradient loss of an LM head on packed tokens, with its metrics, without a host sync.

    hidden: [N, H], weight: [V, H] (bf16, fp16 or fp32, same dtype), bias: [V] or None; targets: [N] (ignore_index
    rows are not in the loss); seq_index: [N] sequence id of each token in [0, S); group_index: [S] group id of each
    sequence in [0, num_groups); rewards: [S] (advantages computed here by options.advantage and mgpo_lambda) or
    advantages: [S] (used as given), exactly one; old_logp: [N] or None (on-policy: old = this call's log-probs,
    ratio 1); rollout_logp, ref_logp: [N] or None (fp32 is best); loss_mask: [N] bool or None. Sequences may be
    packed in any order and have any lengths; groups any sizes. temperature divides the logits.

    The math is `reference.policy_loss_reference`'s. Only hidden, weight and bias receive gradients; the backward
    can run once (the gradients are computed in the forward and scaled in place). num_groups: the size of
    metrics["mgpo_weights"]; None takes S (ids are never read back to find it).

    Returns PolicyLossOutput(loss [] fp32, metrics): detached fp32 device tensors, means over the valid tokens:
    clip_frac_low / clip_frac_high (ratio below / above its clip bound on the side the advantage's sign makes
    active), dual_clip_frac, tis_frac (rollout ratio truncated), mis_frac (masked by the rollout correction),
    entropy_mean, ratio_mean, ratio_max (0 without valid tokens), kl_mean (only when beta > 0); mgpo_weights
    [num_groups] (1 when advantages are given) and advantages [S] (the A' used).
    """
    check_head_inputs(hidden, weight, targets, bias, temperature)
    schedule, workspace_bytes = settings.forward_schedule(schedule), settings.check_workspace(workspace_bytes)
    n = hidden.shape[0]
    o = PolicyLossOptions() if options is None else options
    check_policy_inputs(n, seq_index, group_index, rewards, advantages, old_logp, rollout_logp, ref_logp, loss_mask,
                        o, num_groups)  # fmt: skip
    on_policy = old_logp is None
    unsupported = ops.cuda_unsupported(o, on_policy)
    if backend == "cuda" and unsupported is not None:
        raise NotImplementedError(f"backend='cuda' does not run {unsupported} (its row kernel has the PPO-clip / "
                                  "token TIS / k3 subset only); use backend='triton' or 'auto'")  # fmt: skip
    auto = (lambda: autoselect.auto_backend("mgpo", hidden, weight)) if unsupported is None else None
    backend = resolve_backend(backend, hidden.device, auto=auto)
    hidden, weight, targets, bias = prepare_head_inputs(hidden, weight, targets, bias)
    seq_index, group_index = seq_index.to(torch.int64), group_index.to(torch.int64)
    num_sequences = group_index.numel()
    num_groups = num_groups or num_sequences

    valid = targets != ignore_index
    if loss_mask is not None:
        valid = valid & loss_mask
        targets = torch.where(valid, targets, ignore_index)
    if rewards is not None:
        adv, weights = group_statistics(rewards.detach(), group_index, num_groups=num_groups,
                                        mgpo_lambda=float(o.mgpo_lambda), scale=o.advantage)  # fmt: skip
    else:
        adv = advantages.detach().float()
        weights = torch.ones(num_groups, device=hidden.device, dtype=torch.float32)
    f32 = lambda t: None if t is None else t.detach().float().contiguous()
    w = token_weights(valid, seq_index, num_sequences, o.resolved_aggregation, o.max_completion_length)

    grad_on = torch.is_grad_enabled()
    loss, terms, entropy, _, _, _ = ops.policy_loss_fused_op(
        hidden, weight, targets, bias, adv[seq_index].contiguous(), f32(old_logp), f32(rollout_logp),
        f32(ref_logp) if o.beta > 0 else None, w, seq_index, num_sequences, ops.encode_options(o),
        float(temperature), int(ignore_index), grad_on and hidden.requires_grad,
        grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad)), backend, schedule,
        workspace_bytes,
    )  # fmt: skip
    return PolicyLossOutput(loss, policy_metrics(terms.detach(), entropy.detach(), valid, weights, adv, o.beta > 0))

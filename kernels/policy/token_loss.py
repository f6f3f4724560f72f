"""The per-token closed forms of the policy-loss family, written once for every backend.

The fused op needs, per token, only g = dLoss/dlogp (and dLoss/dentropy, a constant: -entropy_coef * w_t). g is a
closed form of the token's log-prob and of constants known before the LM-head pass (advantage, old / ref log-probs,
rollout factor, aggregation weight, and for sequence-level ratios the per-sequence sums of `sequence_constants`).
`PolicyStep` evaluates it on each chunk between the row statistics and the dz write of the engine
(`lmhead.chunked.TokenStep`): a few [C]-vector torch ops, no extra logits traffic. The oracle is
`reference.policy_loss_reference` (autograd through TRL's formulas); these are its derivatives by hand.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .options import PolicyLossOptions

# columns PolicyStep writes: the policy term, its weight c, the ratio, the KL (raw, and as it enters the loss), flags
TERMS = ("pg", "c", "ratio", "kl", "kl_loss", "clip_low", "clip_high", "dual_clip", "tis", "mis")


def objective(r: Tensor, a: Tensor, o: PolicyLossOptions) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(l, dl/dr, clipped low, clipped high, dual-clipped) of PPO-clip or SAPO at ratio r and advantage a ([C] each).

    PPO-clip: l = max(-A min(r, delta), -A clip(r, 1 - eps_low, 1 + eps_high)); the clipped side is flat in r, and
    so is min(r, delta) above delta; dual-clip caps l at -c A for A < 0 (flat there). SAPO: l = -A g(r),
    g = sigmoid(tau (r - 1)) 4 / tau, g' = 4 s (1 - s). CISPO has no r-derivative (`PolicyStep` handles it).
    """
    zero = torch.zeros_like(r, dtype=torch.bool)
    if o.loss_type == "sapo":
        tau = torch.where(a > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        s = torch.sigmoid(tau * (r - 1))
        return -a * s * 4 / tau, -a * 4 * s * (1 - s), zero, zero, zero
    lo, hi = 1 - o.epsilon_low, 1 + o.epsilon_high
    r1 = r if o.delta is None else torch.clamp(r, max=o.delta)
    l1, l2 = -a * r1, -a * torch.clamp(r, lo, hi)
    flat1 = zero if o.delta is None else r > o.delta
    dldr = torch.where(l1 >= l2, torch.where(flat1, 0.0, -a), torch.where((r < lo) | (r > hi), 0.0, -a))
    loss = torch.maximum(l1, l2)
    dual = zero
    if o.clip_ratio_c is not None:
        cap = -a * o.clip_ratio_c
        dual = (a < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        dldr = torch.where(dual, 0.0, dldr)
    return loss, dldr, (r < lo) & (a < 0), (r > hi) & (a > 0), dual


def kl_estimate(logp: Tensor, ref: Tensor, valid: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(kl, d kl / d logp) of the estimator `kind` with d = ref - logp (0 on invalid rows): k1 = -d, k2 = d^2 / 2,
    k3 = exp(d) - d - 1."""
    d = torch.where(valid, ref - logp, 0.0)
    if kind == "k1":
        return -d, torch.ones_like(d)
    if kind == "k2":
        return d.square() / 2, -d
    e = torch.exp(d)
    return e - d - 1, 1 - e


def rollout_factors(o: PolicyLossOptions, valid: Tensor, old: Tensor, rollout: Tensor, seq_index: Tensor,
                    num_sequences: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(factor [N], truncated [N] bool, masked [N] bool) of the rollout correction; rho = exp(old - rollout) per
    token, or exp of its sum over the sequence at sequence level (seq_index / num_sequences read only there)."""
    rho_log = torch.where(valid, old - rollout, 0.0)
    if o.rollout_correction in ("seq_tis", "seq_mask"):
        rho_log = rho_log.new_zeros(num_sequences).index_add_(0, seq_index, rho_log)[seq_index]
    rho = torch.exp(rho_log)
    none = torch.zeros_like(valid)
    if o.rollout_correction.endswith("tis"):
        return torch.clamp(rho, max=o.rollout_cap), valid & (rho > o.rollout_cap), none
    lo, hi = (o.icepop_low, o.icepop_high) if o.rollout_correction == "icepop" else (1 / o.rollout_cap, o.rollout_cap)
    masked = valid & ((rho < lo) | (rho > hi))
    return (~masked).float(), none, masked


@dataclasses.dataclass
class PolicyTokens:
    """[N] fp32 per-token constants of one call (bool `valid`); None where a setting is off.

    adv: A' of the token's sequence; old: old log-probs (None: on-policy); seq_log_w: the sequence-level log-ratio
    of the token's sequence (levels "sequence", "sequence_token"); c: the policy term's weight, aggregation weight w
    times the rollout factor; w: the aggregation weight; ref: reference log-probs (beta > 0); seq_grad: level
    "sequence": the coupled policy gradient, sum over the sequence of c dl/dr, times s / L (`sequence_constants`);
    seq_kl_grad: level "sequence" with a bias-corrected KL: beta * sum over the sequence of w kl, times s / L.
    flags: [N, 2] (truncated, masked) of the rollout correction, as floats; rollout: the engine's log-probs when the
    token-level rollout correction is formed in the step (on-policy: rho = exp(logp - rollout) needs this call's
    log-probs), in which case c is w and the factor and flags come from the step. out: [N, len(TERMS)], row by row.
    """

    valid: Tensor
    adv: Tensor
    old: Tensor | None
    seq_log_w: Tensor | None
    c: Tensor
    w: Tensor
    ref: Tensor | None
    seq_grad: Tensor | None
    seq_kl_grad: Tensor | None
    flags: Tensor
    rollout: Tensor | None
    out: Tensor


def sequence_constants(t: PolicyTokens, seq_len: Tensor, seq_index: Tensor, num_sequences: int,
                       logp: Tensor | None, o: PolicyLossOptions) -> PolicyTokens:  # fmt: skip
    """Fills seq_grad (and seq_kl_grad) of level "sequence": d/dlogp_u of sum_t c_t l(s_i) = (sum_t c_t l'(s_i))
    s_i / L_i for every token u of sequence i (s_i = exp(mean log-ratio), L_i its valid tokens: seq_len [N] per token).
    logp: this call's log-probs from an earlier forward pass, needed only for the bias-corrected KL."""
    seq_sum = lambda x: x.new_zeros(num_sequences).index_add_(0, seq_index, x)[seq_index]
    s = torch.exp(t.seq_log_w)
    _, dldr, *_ = objective(s, t.adv, o)
    t.seq_grad = torch.where(t.valid, seq_sum(t.c * dldr) * s / seq_len, 0.0)
    if o.beta > 0 and o.kl_bias_correction:
        kl, _ = kl_estimate(logp, t.ref, t.valid, o.kl)
        t.seq_kl_grad = torch.where(t.valid, o.beta * seq_sum(t.w * kl) * s / seq_len, 0.0)
    return t


class PolicyStep:
    """The `TokenStep` of the policy losses: g = dLoss/dlogp of rows [i0, i1) from their log-probs, and the TERMS."""

    def __init__(self, tokens: PolicyTokens, options: PolicyLossOptions):
        self.t, self.o = tokens, options

    def __call__(self, i0: int, i1: int, logp: Tensor, entropy: Tensor) -> Tensor:
        t, o = self.t, self.o
        cut = lambda x: None if x is None else x[i0:i1]
        valid, a, c, w = cut(t.valid), cut(t.adv), cut(t.c), cut(t.w)
        flags = cut(t.flags)
        if t.rollout is not None:  # on-policy: old = this call's log-probs (values only)
            factor, tis, mis = rollout_factors(o, valid, logp, cut(t.rollout), None, 0)
            c, flags = w * factor, torch.stack([tis.float(), mis.float()], dim=1)
        level = o.importance_sampling_level
        if level == "token":
            log_w = torch.zeros_like(logp) if t.old is None else torch.where(valid, logp - cut(t.old), 0.0)
        else:
            log_w = cut(t.seq_log_w)
        r = torch.exp(log_w)
        if o.loss_type == "cispo":
            weight = torch.clamp(r, max=o.epsilon_high)
            pg, g = -weight * a * logp, -c * weight * a
            zero = torch.zeros_like(valid)
            low, high, dual = zero, (r > o.epsilon_high) & (a > 0), zero
        else:
            pg, dldr, low, high, dual = objective(r, a, o)
            g = cut(t.seq_grad) if level == "sequence" else c * dldr * r
        kl = kl_loss = torch.zeros_like(logp)
        if o.beta > 0:
            kl, dkl = kl_estimate(logp, cut(t.ref), valid, o.kl)
            if o.kl_bias_correction:
                kl_loss = kl * r
                coupled = cut(t.seq_kl_grad) if level == "sequence" else o.beta * w * kl * r
                g = g + o.beta * w * dkl * r + coupled
            else:
                kl_loss = kl
                g = g + o.beta * w * dkl
        terms = torch.cat([torch.stack([pg, c, r, kl, kl_loss, low.float(), high.float(), dual.float()], dim=1), flags],
                          dim=1)  # fmt: skip
        t.out[i0:i1] = torch.where(valid[:, None], terms, 0.0)
        return torch.where(valid, g, 0.0)

"""The settings of `policy_loss`: one frozen dataclass, checked on construction (names as TRL / Liger spell them)."""

from __future__ import annotations

import dataclasses

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
PPO_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence", "sequence_token")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-sum-norm", "bnpo")
DEFAULT_AGGREGATION = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "bnpo",
                       "dr_grpo": "seq-sum-norm", "dapo": "token-mean", "cispo": "token-mean"}  # fmt: skip
ADVANTAGES = ("group", "no_std", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
ROLLOUT_CORRECTIONS = ("token_tis", "seq_tis", "token_mask", "seq_mask", "icepop")


@dataclasses.dataclass(frozen=True)
class PolicyLossOptions:
    """Loss settings of `policy_loss` (DESIGN.md section 2b). Every field has TRL's / Liger's meaning where they
    have one; the README maps their names to these.

    loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (PPO-clip), "cispo", "sapo"; it also picks the aggregation.
    importance_sampling_level: "token"; "sequence" (GSPO: the masked mean log-ratio of the sequence for every token);
        "sequence_token" (GSPO-token: that value, with each token's own gradient).
    epsilon_low / epsilon_high: the PPO clip range [1 - eps_low, 1 + eps_high]; for "cispo" epsilon_high is the
        absolute upper bound of the IS weight (TRL), epsilon_low unused.
    delta: two-sided clip (INTELLECT-2): the ratio is first clamped from above at delta (> 1); None: off.
    clip_ratio_c: dual-clip (> 1): the loss of a token with A < 0 is capped at -clip_ratio_c * A; None: off.
    sapo_temperature_pos / _neg: SAPO's tau for A > 0 / A <= 0.
    aggregation: None (the loss_type's: grpo/sapo "seq-mean-token-mean", dapo/cispo "token-mean", dr_grpo
        "seq-sum-norm", bnpo "bnpo") or one of AGGREGATIONS. max_completion_length: dr_grpo's normaliser length
        (sum / (S * max_completion_length)); None takes the batch's longest sequence.
    advantage: "group" ((r - mean) / (std + 1e-6)), "no_std" (r - mean, Dr.GRPO), "rloo" (r_i - mean_{j != i} r_j);
        mgpo_lambda: MGPO's MaxEnt weight exp(-lambda D_ME) on top (0: off). Unused when advantages are given.
    beta: weight of the KL to the reference log-probs (0: off); kl: its estimator "k1" | "k2" | "k3";
        kl_bias_correction: multiply it by the (unclipped) importance ratio (DeepSeek-V3.2, TRL's
        use_bias_correction_kl).
    rollout_correction: None or, against the rollout engine's log-probs, "token_tis" / "seq_tis" (the loss times
        min(rho, rollout_cap), detached), "token_mask" / "seq_mask" (tokens, or whole sequences, with rho outside
        [1 / rollout_cap, rollout_cap] leave the policy term), "icepop" (tokens with rho outside
        [icepop_low, icepop_high] leave it); rho = exp(old - rollout), summed over the sequence at sequence level
        (on-policy, old is this call's log-probs).
    entropy_coef: the entropy bonus: loss - entropy_coef * aggregation(entropy), its gradient formed in the same pass.
    """

    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    clip_ratio_c: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    aggregation: str | None = None
    max_completion_length: int | None = None
    advantage: str = "group"
    mgpo_lambda: float = 0.0
    beta: float = 0.0
    kl: str = "k3"
    kl_bias_correction: bool = False
    rollout_correction: str | None = None
    rollout_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    entropy_coef: float = 0.0

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"PolicyLossOptions.{field}: {why}, got {getattr(self, field)!r}")

        for field, choices in [("loss_type", LOSS_TYPES), ("importance_sampling_level", IS_LEVELS),
                               ("advantage", ADVANTAGES), ("kl", KL_ESTIMATORS)]:  # fmt: skip
            if getattr(self, field) not in choices:
                bad(field, f"must be one of {choices}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"must be None or one of {AGGREGATIONS}")
        if self.rollout_correction is not None and self.rollout_correction not in ROLLOUT_CORRECTIONS:
            bad("rollout_correction", f"must be None or one of {ROLLOUT_CORRECTIONS}")
        if self.importance_sampling_level != "token" and self.loss_type in ("cispo", "sapo"):
            bad("importance_sampling_level", f"must be 'token' for loss_type={self.loss_type!r} (as in TRL / Liger)")
        if not (0 <= self.epsilon_low < 1):
            bad("epsilon_low", "must be in [0, 1)")
        if not self.epsilon_high >= 0:
            bad("epsilon_high", "must be >= 0")
        for field in ("delta", "clip_ratio_c"):
            value = getattr(self, field)
            if value is not None and not value > 1:
                bad(field, "must be None or > 1")
        for field in ("sapo_temperature_pos", "sapo_temperature_neg", "rollout_cap"):
            if not getattr(self, field) > 0:
                bad(field, "must be > 0")
        if not 0 < self.icepop_low < self.icepop_high:
            bad("icepop_low", f"need 0 < icepop_low < icepop_high={self.icepop_high}")
        if self.max_completion_length is not None and not self.max_completion_length >= 1:
            bad("max_completion_length", "must be None or >= 1")
        for field in ("mgpo_lambda", "beta", "entropy_coef"):
            if not getattr(self, field) >= 0:
                bad(field, "must be >= 0")

    @property
    def resolved_aggregation(self) -> str:
        """The aggregation in force: `aggregation`, or the loss_type's."""
        return self.aggregation or DEFAULT_AGGREGATION[self.loss_type]

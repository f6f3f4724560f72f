"""B3, the policy-loss family: each loss type forward+backward at 16 x 4,096 tokens, Qwen2.5 head, groups of 8.

    python -m vibeperf.bench.run --only B3-policy

Rows (schema of TARGETS.md, id "B3"): `vibeperf-triton-<loss_type>` for grpo, bnpo, dr_grpo, dapo, cispo, sapo;
`vibeperf-triton-grpo-entropy` (policy loss + entropy bonus); `vibeperf-triton-gspo` (GSPO, sequence-level ratio,
off-policy: four GEMM-sized passes, the scoring forward that gives the sequence ratio first) and
`vibeperf-triton-gspo-onpolicy` (old_logp=None: the ratio is 1, three passes); `vibeperf-triton-ce`, our fused CE
forward+backward on the same tokens, the yardstick of the <= 1.15x target; `liger-<loss_type>` and `liger-gspo`,
Liger-Kernel's LigerFusedLinearGRPOLoss with the same settings (tests/test_policy_loss.py says where the two
definitions coincide). Every row is checked against the fp32 `policy_loss_reference` before it is timed. The loss
settings: epsilon 0.2 / 0.2 (CISPO: epsilon_high = 1.2, its absolute bound), no KL, advantages given (the group
advantages of B3's rewards with the MGPO weight, lambda = 1), token ratios at B3_RATIOS, sequence ratios at
SEQ_RATIOS: clipping active on both sides, no ratio within 5% of an edge. Sequences are of equal length with every
token in the loss, so every aggregation is the mean over sequences of their token means: the reference runs one
sequence at a time ([T, V] fp32 logits) and averages.
"""

from __future__ import annotations

import torch

from vibeperf.kernels import PolicyLossOptions, linear_cross_entropy, linear_logprob, policy_loss
from vibeperf.kernels.policy import policy_loss_reference

from .common import relative_error
from .registry import B3_SEQS, BENCHMARKS, TOL, Benchmark, H, Impl, V, _b2_reference, _b3_inputs, _grads, _optional

SEQ_RATIOS = [0.5, 1.5, 0.95, 1.1, 0.7, 1.3, 0.85, 1.0]
LIGER_SHARED = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
# row name -> (PolicyLossOptions fields, on-policy)
CONFIGS: dict[str, tuple[dict, bool]] = {
    **{lt: (dict(loss_type=lt), False) for lt in LIGER_SHARED},
    "grpo-entropy": (dict(loss_type="grpo", entropy_coef=0.01), False),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence"), False),
    "gspo-onpolicy": (dict(loss_type="grpo", importance_sampling_level="sequence"), True),
}
NOTES = {"gspo": "4 GEMM passes (off-policy sequence ratio)", "gspo-onpolicy": "3 GEMM passes (ratio 1)"}


def options(name: str, n: int) -> PolicyLossOptions:
    fields = dict(CONFIGS[name][0])
    if fields["loss_type"] == "cispo":
        fields["epsilon_high"] = 1.2
    if fields["loss_type"] == "dr_grpo":
        fields["max_completion_length"] = n // B3_SEQS
    return PolicyLossOptions(**fields)


def _inputs(n: int) -> dict:
    """B3's inputs, plus old_logp_seq: old log-probs giving sequence s the ratio SEQ_RATIOS[s] (token log-ratios
    spread around it, mean zero per sequence)."""
    x = _b3_inputs(n)
    t = n // B3_SEQS
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        logp = linear_logprob(x["hidden"], x["weight"], x["targets"])
        spread = 0.2 * torch.randn(B3_SEQS, t, device="cuda", generator=g)
        spread = (spread - spread.mean(1, keepdim=True)).flatten()
        seq_ratio = torch.tensor(SEQ_RATIOS, device="cuda").repeat(B3_SEQS)[:B3_SEQS]
        x["old_logp_seq"] = logp - seq_ratio.log().repeat_interleave(t) - spread
    return x


def _old(x: dict, name: str):
    o, on_policy = options(name, x["hidden"].shape[0]), CONFIGS[name][1]
    if on_policy:
        return None
    return x["old_logp_seq"] if o.importance_sampling_level != "token" else x["old_logp"]


def _ours(x: dict, name: str, backend: str = "triton"):
    loss = policy_loss(x["hidden"], x["weight"], x["targets"], seq_index=x["seq_index"],
                       group_index=x["group_index"], advantages=x["advantages"], old_logp=_old(x, name),
                       options=options(name, x["hidden"].shape[0]), backend=backend).loss  # fmt: skip
    return (name, *_grads(loss, x))


def _impls() -> dict[str, Impl]:
    liger, liger_err = _optional("liger_kernel.chunked_loss")

    def liger_fn(x, name):
        o = options(name, x["hidden"].shape[0])
        old = _old(x, name)
        s, t = x["liger_mask"].shape
        loss_fn = liger.LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, loss_type=o.loss_type, epsilon_low=o.epsilon_low,
            epsilon_high=o.epsilon_high, importance_sampling_level=o.importance_sampling_level,
            max_completion_length=t, compiled=False,
        )  # fmt: skip
        loss, _ = loss_fn(x["hidden"].view(s, t, H), x["weight"], x["targets"].view(s, t), x["liger_mask"],
                          x["advantages"], old_per_token_logps=old.view(s, t))  # fmt: skip
        return (f"liger/{name}", *_grads(loss, x))

    impls = {f"vibeperf-triton-{name}": Impl(lambda x, name=name: _ours(x, name)) for name in CONFIGS}
    impls["vibeperf-triton-ce"] = Impl(lambda x: ("ce", *_grads(linear_cross_entropy(x["hidden"], x["weight"],
                                                                                     x["targets"], backend="triton"),
                                                                x)))  # fmt: skip
    for name in (*LIGER_SHARED, "gspo"):
        impls[f"liger-{name}"] = Impl(lambda x, name=name: liger_fn(x, name), skip=lambda n: liger_err)
    return impls


def _reference(x: dict) -> dict:
    """fp32 `policy_loss_reference` of every config, one sequence at a time, averaged (see the module doc); CE as
    B2's."""
    h = x["hidden"].detach().float()
    t = h.shape[0] // B3_SEQS
    refs = {"ce": _b2_reference(x), "loss_scale": float(x["advantages"].abs().mean())}
    for name in CONFIGS:
        o, old = options(name, h.shape[0]), _old(x, name)
        w = x["weight"].detach().float().requires_grad_(True)
        loss, dh = torch.zeros((), device=h.device), torch.zeros_like(h)
        for s in range(B3_SEQS):
            rows = slice(s * t, (s + 1) * t)
            hs = h[rows].clone().requires_grad_(True)
            out = policy_loss_reference(hs, w, x["targets"][rows], seq_index=torch.zeros_like(x["targets"][rows]),
                                        group_index=x["group_index"][:1] * 0, advantages=x["advantages"][s : s + 1],
                                        old_logp=None if old is None else old[rows], options=o)  # fmt: skip
            (out.loss / B3_SEQS).backward()
            loss += out.loss.detach() / B3_SEQS
            dh[rows] = hs.grad
        refs[name] = (loss, dh, w.grad)
    return refs


def _check(out, ref) -> tuple[bool, str]:
    kind, *values = out
    name = kind.removeprefix("liger/")
    errs = [relative_error(o, r) for o, r in zip(values, ref[name])]
    if name != "ce":  # the loss can cancel to near 0: its error is taken against the size of its terms, mean |A'|
        o, r = float(values[0]), float(ref[name][0])
        errs[0] = abs(o - r) / max(abs(r), ref["loss_scale"])
    note = f"{name} rel err loss/dh/dW " + "/".join(f"{e:.1e}" for e in errs)
    if kind in NOTES:
        note += f"; {NOTES[kind]}"
    return max(errs) <= TOL, note


BENCHMARK = Benchmark(
    id="B3",
    sizes=[B3_SEQS * 4096],
    flops=lambda n: 6 * n * H * V,
    make_inputs=_inputs,
    reference=_reference,
    check=_check,
    impls=_impls(),
    rep_ms=600.0,
)
BENCHMARKS["B3-policy"] = BENCHMARK

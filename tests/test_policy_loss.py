"""policy_loss (the fused RL policy-loss family) against its fp32 reference and against Liger-Kernel's GRPO loss.

Errors, tolerances and cases follow tests/test_mgpo_kernel.py (its module docstring; its helpers are reused): relative
errors against `policy_loss_reference` run in fp32 on the same (upcast) inputs; fp32 inputs within 1e-5; bf16 inputs
within 2x the error of plain PyTorch at bf16 (the reference with its head GEMM in bf16) plus 1e-6; GPU Qwen2.5-head
shapes within 4 * 2^-8 of the reference. The loss error is taken relative to max(|loss|, mean |A'|, entropy_coef *
mean entropy), the size of the terms it sums.
Inputs put clipping and masking to work: token ratios from mk.RATIOS, sequence ratios from SEQ_RATIOS (each at
least 5% from every clip edge of the settings used: 1 -/+ 0.2, 1.4 for delta / dual-clip / epsilon_high=0.4,
1.2 for CISPO's bound), rollout ratios from mk.ROLLOUT_SHIFT; sequences of unequal lengths, groups all correct, all
wrong and singletons (mk.DEGENERATE). Every setting of the family runs on the torch and Triton (interpreter) paths;
backend="cuda" runs the settings its row kernel has and refuses the others by name.
"""

from __future__ import annotations

import dataclasses

import pytest
import test_mgpo_kernel as mk
import torch
from helpers import assert_compiles_like_eager
from vibeperf.kernels import PolicyLossOptions, policy_loss
from vibeperf.kernels.lmhead import chunked
from vibeperf.kernels.policy import ops, policy_loss_reference

from vibeperf import _ext

needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
                                                  reason="needs vibeperf._C with CUDA and a GPU")]  # fmt: skip
BACKENDS = ["torch", "triton", pytest.param("cuda", marks=needs_cuda)]
SEQ_RATIOS = [0.5, 1.5, 0.95, 1.1, 0.7, 1.3, 0.85]
MASKED = dict(bias=True, temperature=0.7, ignored=(0, 4, 12), masked=(1, 9, 16))

# id, case (mk.BASE or mk.DEGENERATE), case options (+ seq: sequence ratios at SEQ_RATIOS; on_policy: old_logp=None),
# PolicyLossOptions fields
CONFIGS = [
    ("grpo", mk.BASE, dict(clip=True), dict(loss_type="grpo")),
    ("bnpo-asym", mk.BASE, dict(clip=True), dict(loss_type="bnpo", epsilon_high=0.4)),
    ("dr_grpo", mk.BASE, dict(clip=True), dict(loss_type="dr_grpo")),
    ("dr_grpo-maxlen9", mk.BASE, dict(clip=True), dict(loss_type="dr_grpo", max_completion_length=9)),
    ("dapo-delta", mk.BASE, dict(clip=True), dict(loss_type="dapo", delta=1.4)),
    ("grpo-dualclip", mk.BASE, dict(clip=True), dict(clip_ratio_c=1.4)),
    ("cispo", mk.BASE, dict(clip=True), dict(loss_type="cispo", epsilon_high=1.2)),
    ("sapo", mk.BASE, dict(clip=True), dict(loss_type="sapo")),
    ("gspo", mk.BASE, dict(seq=True), dict(importance_sampling_level="sequence")),
    (
        "gspo-dapo-delta-dual",
        mk.BASE,
        dict(seq=True),
        dict(loss_type="dapo", importance_sampling_level="sequence", delta=1.4, clip_ratio_c=1.4),
    ),  # fmt: skip
    ("gspo-onpolicy", mk.BASE, dict(on_policy=True), dict(importance_sampling_level="sequence")),
    ("gspo-token", mk.BASE, dict(seq=True), dict(importance_sampling_level="sequence_token")),
    ("kl-k1", mk.BASE, dict(clip=True, ref=True), dict(beta=0.1, kl="k1")),
    ("kl-k2", mk.BASE, dict(clip=True, ref=True), dict(beta=0.1, kl="k2")),
    ("kl-k3-biascorr", mk.BASE, dict(clip=True, ref=True), dict(beta=0.1, kl_bias_correction=True)),
    (
        "gspo-kl-k3-biascorr",
        mk.BASE,
        dict(seq=True, ref=True),
        dict(importance_sampling_level="sequence", beta=0.1, kl_bias_correction=True),
    ),  # fmt: skip
    (
        "gspo-onpolicy-kl-k2-biascorr",
        mk.BASE,
        dict(on_policy=True, ref=True),
        dict(importance_sampling_level="sequence", beta=0.1, kl="k2", kl_bias_correction=True),
    ),
    ("token-tis", mk.BASE, dict(clip=True, rollout=True), dict(rollout_correction="token_tis")),
    ("seq-tis", mk.BASE, dict(clip=True, rollout=True), dict(rollout_correction="seq_tis", rollout_cap=3.0)),
    ("token-mask", mk.BASE, dict(clip=True, rollout=True), dict(rollout_correction="token_mask")),
    ("seq-mask", mk.BASE, dict(clip=True, rollout=True), dict(rollout_correction="seq_mask", rollout_cap=3.0)),
    ("icepop", mk.BASE, dict(clip=True, rollout=True), dict(rollout_correction="icepop", icepop_high=2.0)),
    ("onpolicy-token-tis", mk.BASE, dict(on_policy=True, rollout=True), dict(rollout_correction="token_tis")),
    (
        "onpolicy-icepop-entropy",
        mk.BASE,
        dict(on_policy=True, rollout=True),
        dict(loss_type="dapo", rollout_correction="icepop", icepop_high=2.0, entropy_coef=0.05),
    ),
    (
        "onpolicy-seq-mask",
        mk.BASE,
        dict(on_policy=True, rollout=True),
        dict(rollout_correction="seq_mask", rollout_cap=3.0),
    ),  # fmt: skip
    (
        "gspo-onpolicy-token-mask",
        mk.BASE,
        dict(on_policy=True, rollout=True),
        dict(importance_sampling_level="sequence", rollout_correction="token_mask"),
    ),
    ("entropy-grpo", mk.BASE, dict(clip=True), dict(entropy_coef=0.05)),
    (
        "entropy-cispo-kl",
        mk.BASE,
        dict(clip=True, ref=True),
        dict(loss_type="cispo", epsilon_high=1.2, beta=0.1, entropy_coef=0.05),
    ),  # fmt: skip
    (
        "entropy-gspo-onpolicy",
        mk.BASE,
        dict(on_policy=True),
        dict(importance_sampling_level="sequence", entropy_coef=0.05),
    ),  # fmt: skip
    ("entropy-dapo-onpolicy", mk.BASE, dict(on_policy=True), dict(loss_type="dapo", entropy_coef=0.05)),
    ("adv-nostd", mk.BASE, dict(clip=True), dict(advantage="no_std")),
    ("adv-rloo-mgpo", mk.BASE, dict(clip=True), dict(advantage="rloo", mgpo_lambda=1.0)),
    (
        "degenerate-sapo-entropy",
        mk.DEGENERATE,
        dict(clip=True),
        dict(loss_type="sapo", mgpo_lambda=1.0, entropy_coef=0.05),
    ),  # fmt: skip
    (
        "degenerate-gspo-rloo",
        mk.DEGENERATE,
        dict(seq=True),
        dict(importance_sampling_level="sequence", advantage="rloo"),
    ),  # fmt: skip
    ("masked-temp-bias-gspo", mk.BASE, dict(seq=True, **MASKED), dict(importance_sampling_level="sequence")),
    (
        "masked-temp-bias-cispo-tis-entropy",
        mk.BASE,
        dict(clip=True, rollout=True, **MASKED),
        dict(loss_type="cispo", epsilon_high=1.2, rollout_correction="token_tis", entropy_coef=0.05),
    ),
]


def make(case: dict, case_kw: dict, **kw) -> tuple[mk.Case, dict]:
    """The case and the extra inputs of the call (old_logp=None for on-policy)."""
    case_kw = dict(case_kw)
    seq, on_policy = case_kw.pop("seq", False), case_kw.pop("on_policy", False)
    c = mk.make_case(**case, **case_kw, **kw)
    if seq:
        c = with_sequence_ratios(c)
    return c, (dict(old_logp=None) if on_policy else {})


def with_sequence_ratios(c: mk.Case, seed: int = 1) -> mk.Case:
    """old_logp moved so that sequence s has the ratio SEQ_RATIOS[s] (its tokens' log-ratios spread around it)."""
    up = lambda t: None if t is None else t.float()
    logp = mk.linear_logprob_reference(up(c.hidden), up(c.weight), c.targets, bias=up(c.bias),
                                       temperature=c.temperature)  # fmt: skip
    valid = (c.targets != -100) & (c.loss_mask if c.loss_mask is not None else True)
    s, dev = c.group_index.numel(), logp.device
    noise = 0.2 * torch.randn(len(logp), generator=torch.Generator().manual_seed(seed))
    spread = torch.where(valid, noise.to(dev), 0.0)
    count = torch.zeros(s, device=dev).index_add_(0, c.seq_index, valid.float()).clamp_min(1)
    spread = spread - (torch.zeros(s, device=dev).index_add_(0, c.seq_index, spread) / count)[c.seq_index]
    target = torch.tensor(SEQ_RATIOS, device=dev).repeat(s)[:s].log()[c.seq_index]
    old = torch.where(valid, logp - target - spread, torch.full_like(logp, 50.0))
    return dataclasses.replace(c, old_logp=old)


def on(c: mk.Case, device: str) -> mk.Case:
    return dataclasses.replace(c, **{f.name: getattr(c, f.name).to(device) for f in dataclasses.fields(c)
                                     if isinstance(getattr(c, f.name), torch.Tensor)})  # fmt: skip


def run(fn, c: mk.Case, backend: str | None = None, **kw):
    """mk.run for policy_loss / policy_loss_reference; backend "cuda" moves the case to the GPU and back."""
    if backend is None:
        return mk.run(fn, c, **kw)
    if backend != "cuda":
        return mk.run(fn, c, backend=backend, **kw)
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    loss, metrics, *grads = mk.run(fn, on(c, "cuda"), backend="cuda", **kw)
    return loss.cpu(), {k: v.cpu() for k, v in metrics.items()}, *[None if g is None else g.cpu() for g in grads]


def errors(ours, ref, c: mk.Case, o: PolicyLossOptions) -> dict[str, float]:
    """mk.errors, with the loss's scale raised to entropy_coef * mean entropy when the entropy bonus is on."""
    errs = mk.errors(ours, ref, c)
    scale = max(mk.loss_scale(c, ref[0], ref[1]["advantages"]), o.entropy_coef * float(ref[1]["entropy_mean"]))
    errs["loss"] = mk.rel_err(ours[0], ref[0], scale)
    return errs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,case_kw,opts", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_fp32_matches_reference(case, case_kw, opts, backend):
    c, extra = make(case, case_kw)
    o = PolicyLossOptions(**opts)
    unsupported = ops.cuda_unsupported(o, extra.get("old_logp", 0) is None)
    if backend == "cuda" and unsupported is not None:
        with pytest.raises(NotImplementedError, match=unsupported.split("=")[0]):
            run(policy_loss, c, backend, options=o, **extra)
        return
    ours = run(policy_loss, c, backend, options=o, num_groups=c.num_groups, **extra)
    ref = run(policy_loss_reference, c, options=o, **extra)
    errs = errors(ours, ref, c, o)
    assert max(errs.values()) <= mk.FP32_TOL, errs
    dead = c.targets == -100
    if c.loss_mask is not None:
        dead |= ~c.loss_mask
    assert not ours[2][dead].any(), "a token outside the loss got a gradient"


BF16 = ["gspo", "gspo-dapo-delta-dual", "sapo", "kl-k3-biascorr", "icepop", "entropy-cispo-kl",
        "masked-temp-bias-cispo-tis-entropy", "gspo-onpolicy-kl-k2-biascorr"]  # fmt: skip
BF16_CONFIGS = [c for c in CONFIGS if c[0] in BF16]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,case_kw,opts", [c[1:] for c in BF16_CONFIGS], ids=[c[0] for c in BF16_CONFIGS])
def test_bf16_within_twice_plain_pytorch(case, case_kw, opts, backend):
    c, extra = make(case, case_kw, dtype=torch.bfloat16, dim=64)
    o = PolicyLossOptions(**opts)
    ours = run(policy_loss, c, backend, options=o, num_groups=c.num_groups, **extra)
    ref = run(policy_loss_reference, c, up=True, options=o, **extra)
    low = run(policy_loss_reference, c, eager_low_precision=True, options=o, **extra)
    assert ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.bfloat16
    ours_err, low_err = errors(ours, ref, c, o), errors(low, ref, c, o)
    bad = {k: (e, low_err[k]) for k, e in ours_err.items() if e > 2 * low_err[k] + 1e-6}
    assert not bad, f"(ours, plain bf16) errors: {bad}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_several_chunks_match_reference(backend, monkeypatch):
    """16-token chunks (the last one ragged) on 38 interleaved tokens: the per-chunk step and the extra pass agree."""
    monkeypatch.setattr(chunked, "chunk_rows", lambda *args, **kw: 16)
    c = mk.make_case([7, 9, 3, 11, 8], [0, 0, 0, 1, 1], [1.0, 0.0, 1.0, 0.0, 1.0], rollout=True, ref=True,
                     interleave=True, ignored=(5, 20))  # fmt: skip
    c = with_sequence_ratios(c)
    o = PolicyLossOptions(importance_sampling_level="sequence", beta=0.1, kl_bias_correction=True,
                          rollout_correction="seq_tis", entropy_coef=0.05, mgpo_lambda=1.0)  # fmt: skip
    errs = errors(run(policy_loss, c, backend, options=o, num_groups=2), run(policy_loss_reference, c, options=o), c, o)
    assert max(errs.values()) <= mk.FP32_TOL, errs


def test_mgpo_preset_is_policy_loss():
    """mgpo_loss is policy_loss with the MGPO options: same loss, gradients and (shared) metrics."""
    c = mk.make_case(**mk.BASE, clip=True, rollout=True, ref=True)
    kw = dict(mgpo_lambda=1.0, eps_high=0.28, beta=0.1, tis_cap=1.5, aggregation="token-mean")
    preset = mk.run(mk.mgpo_loss, c, backend="torch", num_groups=3, **kw)
    o = mk.mgpo_options(**kw, with_rollout=True)
    full = run(policy_loss, c, "torch", options=o, num_groups=3)
    for a, b in zip((preset[0], *preset[2:]), (full[0], *full[2:])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k, v in preset[1].items():
        torch.testing.assert_close(v, full[1][k], rtol=0, atol=0)


def test_passes():
    """Three GEMM-sized passes, four for an off-policy sequence ratio, a coupled bias-corrected KL, or an on-policy
    rollout correction that needs whole sequences first."""
    seq = PolicyLossOptions(importance_sampling_level="sequence")
    assert not ops.extra_pass(PolicyLossOptions(), on_policy=False)
    assert not ops.extra_pass(seq, on_policy=True)
    assert ops.extra_pass(seq, on_policy=False)
    assert ops.extra_pass(PolicyLossOptions(importance_sampling_level="sequence_token"), on_policy=False)
    assert ops.extra_pass(dataclasses.replace(seq, beta=0.1, kl_bias_correction=True), on_policy=True)
    # an on-policy rollout correction: per token in the step (3 passes) unless it needs whole sequences first
    assert not ops.extra_pass(PolicyLossOptions(rollout_correction="token_tis"), on_policy=True)
    assert not ops.extra_pass(PolicyLossOptions(rollout_correction="icepop"), on_policy=True)
    assert ops.extra_pass(PolicyLossOptions(rollout_correction="seq_tis"), on_policy=True)
    assert ops.extra_pass(dataclasses.replace(seq, rollout_correction="token_mask"), on_policy=True)
    assert not ops.extra_pass(PolicyLossOptions(rollout_correction="seq_mask"), on_policy=False)


def test_whole_loss_compiles_without_graph_breaks():
    c = with_sequence_ratios(mk.make_case(**mk.BASE, rollout=True, ref=True))
    o = PolicyLossOptions(loss_type="dapo", importance_sampling_level="sequence", beta=0.1, kl="k2",
                          rollout_correction="token_mask", entropy_coef=0.05, advantage="rloo")  # fmt: skip
    kw = c.inputs(options=o, num_groups=3, backend="torch")

    def step(h, w):
        out = policy_loss(h, w, c.targets, **kw)
        return out.loss, out.metrics["mis_frac"]

    assert_compiles_like_eager(step, c.hidden, c.weight)


def test_opcheck_custom_op():
    """opcheck differentiates |sum| of every output and then compares the outputs: dh, an output that the backward
    scales in place by the incoming gradient, keeps its value only for a positive loss, which A' < 0 gives here."""
    c = mk.make_case([2, 3, 2], [0, 0, 0], [1.0, 0.0, 1.0], vocab=23, dim=8, bias=True, rollout=True, ref=True)
    hidden, weight, bias = (t.clone().requires_grad_(True) for t in (c.hidden, c.weight, c.bias))
    n = hidden.shape[0]
    o = PolicyLossOptions(loss_type="dapo", importance_sampling_level="sequence_token", beta=0.1,
                          rollout_correction="icepop", entropy_coef=0.01)  # fmt: skip
    args = (hidden, weight, c.targets, bias, -0.5 - torch.rand(n), c.old_logp, c.rollout_logp, c.ref_logp,
            torch.full((n,), 1 / n), c.seq_index, 3, ops.encode_options(o), 0.9, -100, True, True, "torch",
            "chunked", None)  # fmt: skip
    torch.library.opcheck(ops.policy_loss_fused_op, args)
    assert ops.decode_options(ops.encode_options(o)) == o


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(loss_type="ppo"), "PolicyLossOptions.loss_type"),
        (dict(loss_type="cispo", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(delta=1.0), "PolicyLossOptions.delta"),
        (dict(clip_ratio_c=0.5), "clip_ratio_c"),
        (dict(kl="k4"), "PolicyLossOptions.kl"),
        (dict(rollout_correction="tis"), "rollout_correction"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(advantage="gae"), "advantage"),
        (dict(entropy_coef=-0.1), "entropy_coef"),
        (dict(icepop_low=3.0, icepop_high=2.0), "icepop_low"),
        (dict(max_completion_length=0), "max_completion_length"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossOptions(**kw)


@pytest.mark.parametrize(
    "opts,extra,match",
    [
        (dict(beta=0.1), {}, "ref_logp"),
        (dict(rollout_correction="token_tis"), {}, "rollout_logp"),
    ],
    ids=["beta-without-ref", "rollout-without-logp"],
)
def test_bad_inputs_raise(opts, extra, match):
    c = mk.make_case(**mk.BASE)
    with pytest.raises(ValueError, match=match):
        policy_loss(c.hidden, c.weight, c.targets, **c.inputs(options=PolicyLossOptions(**opts), **extra))


# --- Liger-Kernel 0.8.5's LigerFusedLinearGRPOLoss, on every setting the two share ---

# id, PolicyLossOptions fields (Liger's arguments follow from them), sequence-level ratios
LIGER_CONFIGS = [
    ("grpo", dict(loss_type="grpo", epsilon_high=0.4)),
    ("bnpo-kl", dict(loss_type="bnpo", beta=0.05)),
    ("dr_grpo", dict(loss_type="dr_grpo")),
    ("dapo-tis", dict(loss_type="dapo", rollout_correction="token_tis")),
    ("cispo", dict(loss_type="cispo", epsilon_high=1.2)),
    ("sapo-kl", dict(loss_type="sapo", beta=0.05)),
    ("dapo-delta", dict(loss_type="dapo", delta=1.4)),
    (
        "grpo-kl-biascorr-tis",
        dict(loss_type="grpo", beta=0.05, kl_bias_correction=True, rollout_correction="token_tis"),
    ),
    ("gspo-grpo", dict(loss_type="grpo", importance_sampling_level="sequence")),
    (
        "gspo-dapo-kl-biascorr",
        dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.05, kl_bias_correction=True),
    ),  # fmt: skip
    (
        "gspo-bnpo-delta-tis",
        dict(loss_type="bnpo", importance_sampling_level="sequence", delta=1.4, rollout_correction="token_tis"),
    ),  # fmt: skip
    ("gspo-dr_grpo", dict(loss_type="dr_grpo", importance_sampling_level="sequence")),
]


def compare_with_liger(device, num_seqs, max_len, h_dim, vocab, dtype, opts: dict, tol):
    """Our loss against Liger's LigerFusedLinearGRPOLoss where the definitions coincide (DESIGN.md section 2b).

    Liger takes padded [B, T, H] inputs, an attention mask and advantages [B]; we take the same tokens flattened, with
    loss_mask = the attention mask and seq_index = the row, and the same advantages (`advantages=`, so neither side
    computes them). Settings: loss_type, importance_sampling_level ("token", "sequence"), epsilon_low / epsilon_high,
    delta, beta with ref_per_token_logps (Liger's k3 is ours: exp(ref - logp) - (ref - logp) - 1),
    use_bias_correction_kl = kl_bias_correction, sapo_temperature_pos / _neg, temperature 0.9; dr_grpo with
    max_completion_length = T on both sides; vllm_is_ratio = min(exp(old - rollout), rollout_cap) against our
    rollout_correction="token_tis". Normalisers coincide on one process with every sequence non-empty ("grpo" / "sapo":
    Liger divides by B, we by the sequences with a valid token; "dapo" with num_items_in_batch=None and "bnpo": the
    valid tokens). Metrics: Liger's clip ratio = clip_frac_low + clip_frac_high; its KL metric = kl_mean (without
    bias correction: with it, Liger reports the corrected KL). Padded positions get a valid token id and a finite
    old log-prob; the mask keeps them out of both losses.
    """
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    o = PolicyLossOptions(max_completion_length=max_len if opts.get("loss_type") == "dr_grpo" else None, **opts)
    g = torch.Generator(device=device).manual_seed(0)
    lengths = torch.tensor([max_len - (37 * s) % (max_len // 2) for s in range(num_seqs)], device=device)
    mask = torch.arange(max_len, device=device)[None, :] < lengths[:, None]  # [B, T]
    hidden = torch.randn(num_seqs, max_len, h_dim, device=device, generator=g).to(dtype)
    weight = (torch.randn(vocab, h_dim, device=device, generator=g) / h_dim**0.5).to(dtype)
    targets = torch.randint(0, vocab, (num_seqs, max_len), device=device, generator=g)
    adv = torch.tensor([-0.7, 1.2, 0.4, -1.5, -0.9, 0.3, 0.6, -1.1], device=device).repeat(num_seqs)[:num_seqs]
    with torch.no_grad():
        logp = mk.linear_logprob(hidden.flatten(0, 1), weight, targets.flatten(), temperature=0.9).view_as(mask)
    if o.importance_sampling_level == "sequence":
        spread = torch.where(mask, 0.2 * torch.randn(mask.shape, device=device, generator=g), 0.0)
        spread = spread - (spread.sum(1) / lengths)[:, None]
        seq_ratio = torch.tensor(SEQ_RATIOS, device=device).repeat(num_seqs)[:num_seqs]
        old = logp - seq_ratio.log()[:, None] - spread
    else:
        old = logp - mk.ratio_pattern(logp.numel(), device).log().view_as(logp)
    rollout = old - 0.5 * torch.randn(mask.shape, device=device, generator=g)
    ref_logp = old + 0.2 * torch.randn(mask.shape, device=device, generator=g)
    tis = o.rollout_correction == "token_tis"

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours = policy_loss(h1.flatten(0, 1), w1, targets.flatten(),
                       seq_index=torch.arange(num_seqs, device=device).repeat_interleave(max_len),
                       group_index=torch.arange(num_seqs, device=device) // 4, advantages=adv, old_logp=old.flatten(),
                       rollout_logp=rollout.flatten() if tis else None,
                       ref_logp=ref_logp.flatten() if o.beta > 0 else None, options=o, loss_mask=mask.flatten(),
                       temperature=0.9)  # fmt: skip
    ours.loss.backward()

    liger = LigerFusedLinearGRPOLoss(
        beta=o.beta, use_ref_model=o.beta > 0, loss_type=o.loss_type, epsilon_low=o.epsilon_low,
        epsilon_high=o.epsilon_high, importance_sampling_level=o.importance_sampling_level,
        sapo_temperature_pos=o.sapo_temperature_pos, sapo_temperature_neg=o.sapo_temperature_neg, temperature=0.9,
        max_completion_length=max_len, delta=o.delta, use_bias_correction_kl=o.kl_bias_correction, compiled=False,
    )  # fmt: skip
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    is_ratio = torch.exp(old - rollout).clamp(max=o.rollout_cap) if tis else None
    loss, liger_metrics = liger(h2, w2, targets, mask.long(), adv, ref_per_token_logps=ref_logp if o.beta > 0 else None,
                                old_per_token_logps=old, vllm_is_ratio=is_ratio)  # fmt: skip
    loss.backward()
    errs = {"loss": mk.rel_err(ours.loss, loss.detach(), float(adv.abs().mean())),
            "dh": mk.rel_err(h1.grad, h2.grad), "dW": mk.rel_err(w1.grad, w2.grad)}  # fmt: skip
    clip = ours.metrics["clip_frac_low"] + ours.metrics["clip_frac_high"]
    errs["clip"] = abs(float(clip - liger_metrics[-1]))
    if o.beta > 0 and not o.kl_bias_correction:
        errs["kl"] = mk.rel_err(ours.metrics["kl_mean"], liger_metrics[0])
    assert max(errs.values()) <= tol, errs
    assert clip > 0 or o.loss_type == "sapo", "no clipping in the inputs"


@pytest.mark.parametrize("opts", [c[1] for c in LIGER_CONFIGS], ids=[c[0] for c in LIGER_CONFIGS])
def test_liger_grpo_coincides_cpu(opts):
    """Liger's GRPO loss is plain torch: a small fp32 check on the CPU, skipped when liger_kernel is missing."""
    pytest.importorskip("liger_kernel.chunked_loss")
    compare_with_liger("cpu", 6, 9, 16, 131, torch.float32, opts, mk.FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [c[1] for c in LIGER_CONFIGS], ids=[c[0] for c in LIGER_CONFIGS])
def test_gpu_liger_grpo_coincides(opts):
    """16 sequences x 512 positions, Qwen2.5 head, bf16: each side within 4 * 2^-8 of the truth, so 8 * 2^-8 apart."""
    pytest.importorskip("liger_kernel.chunked_loss")
    compare_with_liger("cuda", 16, 512, 2048, 151_936, torch.bfloat16, opts, 8 * mk.U_BF16)


GPU_CONFIGS = ["gspo", "cispo", "sapo", "grpo-dualclip", "entropy-cispo-kl", "gspo-onpolicy-kl-k2-biascorr",
               "seq-mask", "dapo-delta"]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_qwen_head_matches_reference(name):
    """16 sequences of up to 512 tokens, V = 151,936, H = 2048, bf16 (Triton, the default on the GPU): within
    4 * 2^-8 of the fp32 reference run on the whole batch (its [N, V] logits fit an H200)."""
    _, case, case_kw, opts = next(c for c in CONFIGS if c[0] == name)
    c = mk.gpu_case()
    c = dataclasses.replace(c, ref_logp=c.old_logp + 0.2 * torch.randn_like(c.old_logp))
    extra = dict(old_logp=None) if case_kw.get("on_policy") else {}
    if case_kw.get("seq"):
        c = with_sequence_ratios(c)
    o = PolicyLossOptions(**opts)
    ours = run(policy_loss, c, options=o, num_groups=4, backend="triton", **extra)
    ref = run(policy_loss_reference, c, up=True, options=o, **extra)
    errs = errors(ours, ref, c, o)
    assert max(errs.values()) <= 4 * mk.U_BF16, errs

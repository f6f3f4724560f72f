"""mgpo_loss (the fused MGPO policy loss) against the fp32 reference `mgpo_loss_reference`: loss, metrics, gradients.

Errors are relative, ||out - ref|| / ||ref||, against the reference run in fp32 on the same (upcast) inputs. The
loss is a weighted sum of per-token terms of size |A'| that can cancel to near 0, so its error is taken relative to
max(|loss_ref|, mean |A'| over the valid tokens), the size of what is summed. Tolerances come from precision:
- fp32 inputs: 1e-5 (fp32 rounding of a few dozen operations per token, and of the sums).
- bf16 inputs (flash-attention's rule): at most 2x the error of plain PyTorch at that precision, i.e. the same
  reference with the head GEMM in bf16 (logits rounded to bf16, everything after in fp32, the gradients flowing back
  through the bf16 GEMM, as eager bf16 training does), plus a floor of 1e-6 for outputs it happens to get exact.
- GPU, Qwen2.5 head shapes (`-m gpu`): 4 * 2^-8 (the benchmarks' rule: a few bf16 roundings of the logits, dlogits
  and gradients); the reference then runs sequence by sequence, recombined exactly, to bound its memory.
CPU runs use the Triton interpreter at small, odd shapes (V = 131 is a prime above the interpreter's BLOCK_V = 128).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import CUDA_BACKEND, assert_compiles_like_eager, to_cpu
from vibeperf.kernels import linear_logprob, mgpo_loss
from vibeperf.kernels.ce.reference import linear_logprob_reference
from vibeperf.kernels.lmhead import chunked
from vibeperf.kernels.mgpo import mgpo_loss_reference, mgpo_options
from vibeperf.kernels.mgpo.reference import group_advantages_reference, mgpo_weight_reference
from vibeperf.kernels.policy import group_statistics, ops, token_weights

BACKENDS = ["triton", "torch"]
WITH_CUDA = [*BACKENDS, CUDA_BACKEND]
AGGS = ["seq-mean-token-mean", "token-mean", "seq-sum-norm"]
FP32_TOL = 1e-5
U_BF16 = 2**-8
# Ratios exp(logp - old_logp) given to the tokens in turn when clipping is wanted: outside [0.8, 1.2] on both sides.
# The clip is a step of the gradient in logp (r A' or 0): ratios stay >= 5% from its edges, far more than a bf16
# logit moves them, so that low-precision comparisons measure precision rather than which side a rounding falls.
RATIOS = [0.5, 1.5, 0.95, 1.1, 0.7, 1.3, 1.0, 0.85]
ROLLOUT_SHIFT = [-0.3, 0.2, 1.0, 0.0, 0.9, -1.2, 0.5]  # old - rollout: IS weights 0.74 .. 2.7, some above the cap


@dataclasses.dataclass
class Case:
    hidden: torch.Tensor  # [N, H] in the test dtype
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    targets: torch.Tensor  # [N]
    seq_index: torch.Tensor  # [N]
    group_index: torch.Tensor  # [S]
    rewards: torch.Tensor  # [S]
    old_logp: torch.Tensor  # [N] fp32
    rollout_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    loss_mask: torch.Tensor | None
    temperature: float

    @property
    def num_groups(self) -> int:
        return int(self.group_index.max()) + 1

    def inputs(self, **kw) -> dict:
        """Keyword arguments shared by mgpo_loss and mgpo_loss_reference (kw may add or override)."""
        return dict(seq_index=self.seq_index, group_index=self.group_index, rewards=self.rewards,
                    old_logp=self.old_logp, rollout_logp=self.rollout_logp, ref_logp=self.ref_logp,
                    loss_mask=self.loss_mask, temperature=self.temperature) | kw  # fmt: skip


def ratio_pattern(n: int, device="cpu") -> torch.Tensor:
    """[n] ratios taken in turn from RATIOS."""
    return torch.tensor(RATIOS, device=device).repeat(n // len(RATIOS) + 1)[:n]


def make_case(lengths, groups, rewards, *, dtype=torch.float32, vocab=131, dim=16, ignored=(), masked=(), clip=False,
              rollout=False, ref=False, bias=False, temperature=1.0, interleave=False, seed=0) -> Case:
    """Packed sequences of the given lengths; old log-probs put the ratios at RATIOS (clip) or near 1."""
    gen = torch.Generator().manual_seed(seed)
    seq_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if interleave:
        seq_index = seq_index[torch.randperm(len(seq_index), generator=gen)]
    n = len(seq_index)
    hidden = torch.randn(n, dim, generator=gen).to(dtype)
    weight = (0.5 * torch.randn(vocab, dim, generator=gen)).to(dtype)
    b = (0.3 * torch.randn(vocab, generator=gen)).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[list(ignored)] = -100
    up = lambda t: None if t is None else t.float()
    logp = linear_logprob_reference(up(hidden), up(weight), targets, bias=up(b), temperature=temperature)
    if clip:
        old = logp - ratio_pattern(n).log()
    else:
        old = logp + 0.05 * torch.randn(n, generator=gen)
    old = torch.where(targets == -100, torch.full_like(old, 50.0), old)  # garbage on ignored rows, on purpose
    shift = torch.tensor([ROLLOUT_SHIFT[t % len(ROLLOUT_SHIFT)] for t in range(n)])
    mask = None
    if masked:
        mask = torch.ones(n, dtype=torch.bool)
        mask[list(masked)] = False
    return Case(hidden=hidden, weight=weight, bias=b, targets=targets, seq_index=seq_index,
                group_index=torch.tensor(groups), rewards=torch.tensor(rewards), old_logp=old,
                rollout_logp=old - shift if rollout else None,
                ref_logp=old + 0.3 * torch.randn(n, generator=gen) if ref else None, loss_mask=mask,
                temperature=temperature)  # fmt: skip


def run(fn, c: Case, *, up=False, eager_low_precision=False, **kw):
    """(loss, metrics, dh, dW, db) of fn (mgpo_loss or mgpo_loss_reference) with grads of hidden / weight / bias.

    up: the leaves are the inputs upcast to fp32 (the reference's gradients then stay fp32).
    eager_low_precision: plain PyTorch at the input precision: the logits are a GEMM in the input dtype, fed to the
    fp32 reference through an identity head (exact in fp32), so their gradient flows back through that GEMM.
    """
    leaves = [t.detach().clone() for t in (c.hidden, c.weight)] + ([] if c.bias is None else [c.bias.detach().clone()])
    leaves = [(t.float() if up else t).requires_grad_(True) for t in leaves]
    hidden, weight, bias = leaves[0], leaves[1], leaves[2] if c.bias is not None else None
    if eager_low_precision:
        logits = hidden @ weight.T  # [N, V] in the input dtype
        hidden, weight = logits, torch.eye(logits.shape[1])
        bias = None if bias is None else bias.float()
    out = fn(hidden, weight, c.targets, **c.inputs(bias=bias, **kw))
    out.loss.backward()
    return out.loss.detach(), out.metrics, *[t.grad for t in leaves], *([None] if c.bias is None else [])


def run_on(backend: str, c: Case, **kw):
    """`run(mgpo_loss, c, backend=backend, ...)`; for "cuda" on the case moved to the GPU, results back on the CPU."""
    if backend != "cuda":
        return run(mgpo_loss, c, backend=backend, **kw)
    moved = {f.name: getattr(c, f.name).cuda() for f in dataclasses.fields(c)
             if isinstance(getattr(c, f.name), torch.Tensor)}  # fmt: skip
    loss, metrics, *grads = run(mgpo_loss, dataclasses.replace(c, **moved), backend="cuda", **kw)
    return to_cpu(loss), {k: to_cpu(v) for k, v in metrics.items()}, *[to_cpu(g) for g in grads]


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite output"
    denom = float(ref.norm()) if scale is None else scale
    return float((out - ref).norm()) / max(denom, 1e-30)


def loss_scale(c: Case, ref_loss: torch.Tensor, adv: torch.Tensor, ignore_index: int = -100) -> float:
    """max(|loss|, mean |A'| over the valid tokens): the size of the terms the loss sums (see the module doc)."""
    valid = c.targets != ignore_index
    if c.loss_mask is not None:
        valid &= c.loss_mask
    return max(abs(float(ref_loss)), float(adv.double()[c.seq_index][valid].abs().mean()) if valid.any() else 0.0)


def errors(ours, ref, c: Case) -> dict[str, float]:
    """Relative error of every output: loss, each metric, dh, dW (and db)."""
    loss, metrics, *grads = ours
    ref_loss, ref_metrics, *ref_grads = ref
    assert set(metrics) == set(ref_metrics)
    errs = {"loss": rel_err(loss, ref_loss, loss_scale(c, ref_loss, ref_metrics["advantages"]))}
    errs |= {name: rel_err(metrics[name], ref_metrics[name]) for name in ref_metrics}
    errs |= {name: rel_err(g, r) for name, g, r in zip(("dh", "dW", "db"), grads, ref_grads) if r is not None}
    return errs


BASE = dict(lengths=[3, 5, 1, 4, 6, 2, 3], groups=[0, 0, 0, 1, 1, 2, 2], rewards=[1.0, 0.0, 1.0, 0.0, 1.0, 0.3, 0.8])
# Group 0 all correct, group 1 all wrong, a singleton (group 2), and one mixed group: A' = 0 but in group 3.
DEGENERATE = dict(lengths=[3, 2, 4, 1, 2, 5, 2], groups=[0, 0, 1, 1, 2, 3, 3], rewards=[1.0, 1.0, 0.0, 0.0, 1.0, 1, 0])
CASES = [
    # id, case options, loss options
    ("plain", BASE, {}, {}),
    ("clip-both-sides", BASE, dict(clip=True), {}),
    ("clip-asym-lambda", BASE, dict(clip=True), dict(eps_low=0.1, eps_high=0.28, mgpo_lambda=1.5)),
    ("tis", BASE, dict(rollout=True, clip=True), dict(mgpo_lambda=1.0)),
    ("kl", BASE, dict(ref=True), dict(beta=0.1)),
    ("tis-kl-cap1.5", BASE, dict(rollout=True, ref=True, clip=True), dict(beta=0.05, tis_cap=1.5)),
    ("ignored-mask-emptyseq", BASE, dict(ignored=(0, 4, 5, 12), masked=(1, 2, 3, 9, 16), clip=True, rollout=True),
     dict(mgpo_lambda=0.5)),
    ("temp0.7-bias-scalenone", BASE, dict(bias=True, temperature=0.7, clip=True), dict(scale="none")),
    ("interleaved", BASE, dict(interleave=True, clip=True, rollout=True), dict(mgpo_lambda=2.0)),
    ("allcorrect-allwrong-groups", DEGENERATE, dict(clip=True), dict(mgpo_lambda=1.0)),
]
FP32_CASES = [(f"{cid}-{agg}", case, case_kw, dict(aggregation=agg) | loss_kw)
              for cid, case, case_kw, loss_kw in CASES for agg in AGGS]  # fmt: skip


@pytest.mark.parametrize("backend", WITH_CUDA)
@pytest.mark.parametrize("case,case_kw,loss_kw", [c[1:] for c in FP32_CASES], ids=[c[0] for c in FP32_CASES])
def test_fp32_matches_reference(case, case_kw, loss_kw, backend):
    c = make_case(**case, **case_kw)
    ours = run_on(backend, c, num_groups=c.num_groups, **loss_kw)
    ref = run(mgpo_loss_reference, c, **loss_kw)
    errs = errors(ours, ref, c)
    assert max(errs.values()) <= FP32_TOL, errs
    assert ours[0].dtype == torch.float32 and all(m.dtype == torch.float32 for m in ours[1].values())
    dead = c.targets == -100
    if c.loss_mask is not None:
        dead |= ~c.loss_mask
    assert not ours[2][dead].any(), "a token outside the loss got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_zero_advantage_groups_give_zero_loss_and_gradients(agg, backend):
    """Every group all correct, all wrong or a singleton: A' = 0, the loss is exactly 0 and nothing is NaN."""
    c = make_case([3, 2, 4, 1, 2], [0, 0, 1, 1, 2], [1.0, 1.0, 0.0, 0.0, 1.0], clip=True)
    loss, metrics, dh, dw, _ = run(mgpo_loss, c, backend=backend, aggregation=agg, mgpo_lambda=1.0, num_groups=3)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()
    assert torch.equal(metrics["advantages"], torch.zeros(5))
    torch.testing.assert_close(metrics["mgpo_weights"], torch.full((3,), 0.5))
    assert metrics["clip_frac_low"].item() == 0.0 and metrics["clip_frac_high"].item() == 0.0


def test_advantages_given_are_used_as_is():
    c = make_case(**BASE, clip=True)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 1.1, -0.7])
    for backend in BACKENDS:
        ours = run(mgpo_loss, c, backend=backend, advantages=adv, rewards=None, mgpo_lambda=3.0, num_groups=3)
        ref = run(mgpo_loss_reference, c, advantages=adv, rewards=None, mgpo_lambda=3.0)
        errs = errors(ours, ref, c)
        assert max(errs.values()) <= FP32_TOL, errs


BF16_CASES = [
    (f"{cid}-{agg}", case_kw, dict(aggregation=agg) | loss_kw)
    for agg in AGGS
    for cid, case_kw, loss_kw in [
        ("clip-tis-kl", dict(clip=True, rollout=True, ref=True), dict(beta=0.05, mgpo_lambda=1.0)),
        ("temp0.7-bias-ignored-mask", dict(bias=True, temperature=0.7, ignored=(0, 7), masked=(3, 4), clip=True), {}),
    ]
]


@pytest.mark.parametrize("backend", WITH_CUDA)
@pytest.mark.parametrize("case_kw,loss_kw", [c[1:] for c in BF16_CASES], ids=[c[0] for c in BF16_CASES])
def test_bf16_within_twice_plain_pytorch(case_kw, loss_kw, backend):
    c = make_case(**BASE, dtype=torch.bfloat16, dim=64, **case_kw)
    ours = run_on(backend, c, num_groups=c.num_groups, **loss_kw)
    ref = run(mgpo_loss_reference, c, up=True, **loss_kw)
    low = run(mgpo_loss_reference, c, eager_low_precision=True, **loss_kw)
    assert ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.bfloat16
    ours_err, low_err = errors(ours, ref, c), errors(low, ref, c)
    bad = {k: (e, low_err[k]) for k, e in ours_err.items() if e > 2 * low_err[k] + 1e-6}
    assert not bad, f"(ours, plain bf16) errors: {bad}"


@pytest.mark.parametrize("backend", WITH_CUDA)
def test_several_chunks_match_reference(backend, monkeypatch):
    """16-token chunks of the engine (the last one ragged) on 38 interleaved tokens give the reference's results."""
    monkeypatch.setattr(chunked, "chunk_rows", lambda *args, **kw: 16)
    c = make_case([7, 9, 3, 11, 8], [0, 0, 0, 1, 1], [1.0, 0.0, 1.0, 0.0, 1.0], clip=True, rollout=True, ref=True,
                  interleave=True, ignored=(5, 20))  # fmt: skip
    kw = dict(beta=0.1, mgpo_lambda=1.0)
    errs = errors(run_on(backend, c, num_groups=2, **kw), run(mgpo_loss_reference, c, **kw), c)
    assert max(errs.values()) <= FP32_TOL, errs


def test_no_grad_returns_loss_and_metrics():
    c = make_case(**BASE, clip=True, rollout=True)
    ref = run(mgpo_loss_reference, c)
    hidden = c.hidden.clone().requires_grad_(True)
    with torch.no_grad():
        out = mgpo_loss(hidden, c.weight, c.targets, **c.inputs(num_groups=3))
    assert not out.loss.requires_grad
    errs = errors((out.loss, out.metrics), ref[:2], c)
    assert max(errs.values()) <= FP32_TOL, errs


def test_num_groups_defaults_to_a_shape():
    """Without num_groups the weights come padded to [S]; the first G entries are the reference's."""
    c = make_case(**BASE)
    out = mgpo_loss(c.hidden, c.weight, c.targets, **c.inputs(mgpo_lambda=1.0))
    ref = mgpo_loss_reference(c.hidden, c.weight, c.targets, **c.inputs(mgpo_lambda=1.0))
    assert out.metrics["mgpo_weights"].shape == (7,)
    torch.testing.assert_close(out.metrics["mgpo_weights"][:3], ref.metrics["mgpo_weights"], rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=FP32_TOL, atol=1e-7)


def test_backward_twice_is_refused():
    c = make_case(**BASE)
    hidden = c.hidden.clone().requires_grad_(True)
    loss = mgpo_loss(hidden, c.weight, c.targets, backend="torch", **c.inputs()).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_autograd_grad_returns_plain_tensors():
    """The gradients are the op's own outputs, scaled in place: handed out detached, they hold no graph."""
    c = make_case(**BASE, clip=True)
    hidden, weight = c.hidden.clone().requires_grad_(True), c.weight.clone().requires_grad_(True)
    grads = torch.autograd.grad(mgpo_loss(hidden, weight, c.targets, backend="torch", **c.inputs()).loss,
                                [hidden, weight])  # fmt: skip
    assert all(g.grad_fn is None and not g.requires_grad for g in grads)


def test_loss_scales_with_upstream_gradient():
    c = make_case(**BASE, clip=True)
    h1, h2 = c.hidden.clone().requires_grad_(True), c.hidden.clone().requires_grad_(True)
    (3.0 * mgpo_loss(h1, c.weight, c.targets, backend="torch", **c.inputs()).loss).backward()
    mgpo_loss(h2, c.weight, c.targets, backend="torch", **c.inputs()).loss.backward()
    torch.testing.assert_close(h1.grad, 3.0 * h2.grad)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rewards=None), "exactly one"),
        (dict(advantages=torch.zeros(7)), "exactly one"),
        (dict(aggregation="seq-mean"), "aggregation"),
        (dict(beta=0.1), "ref_logp"),
        (dict(scale="batch"), "scale"),
        (dict(mgpo_lambda=-1.0), "mgpo_lambda"),
        (dict(eps_low=1.0), "eps_low"),
        (dict(tis_cap=0.0), "tis_cap"),
        (dict(seq_index=torch.zeros(5, dtype=torch.long)), "seq_index"),
        (dict(group_index=torch.zeros(0, dtype=torch.long)), "group_index"),
        (dict(rewards=torch.zeros(6)), "rewards"),
        (dict(old_logp=torch.zeros(3)), "old_logp"),
        (dict(loss_mask=torch.ones(24)), "loss_mask"),
        (dict(num_groups=0), "num_groups"),
        (dict(temperature=0.0), "temperature"),
        (dict(backend="gpu"), "backend must be one of"),
    ],
    ids=["neither", "both", "aggregation", "beta-without-ref", "scale", "lambda", "eps-low", "tis-cap", "seq-index-N",
         "group-index-empty", "rewards-S", "old-logp-N", "mask-dtype", "num-groups", "temperature", "backend"],
)
def test_bad_arguments_raise(kw, match):
    c = make_case(**BASE)
    with pytest.raises((ValueError, NotImplementedError), match=match):
        mgpo_loss(c.hidden, c.weight, c.targets, **c.inputs(**kw))


def test_group_statistics_trace_without_graph_breaks():
    """fullgraph=True fails on a host sync (.item(), .tolist(), nonzero, data-dependent shapes): there is none."""

    def stats(rewards, group_index, seq_index, valid):
        adv, w = group_statistics(rewards, group_index, num_groups=3, mgpo_lambda=1.5, scale="group")
        return adv, w, *[token_weights(valid, seq_index, 7, agg) for agg in AGGS]

    c = make_case(**BASE, ignored=(0, 4), masked=(1, 2, 3))
    valid = (c.targets != -100) & c.loss_mask
    compiled = torch.compile(stats, fullgraph=True, backend="aot_eager")
    got = compiled(c.rewards, c.group_index, c.seq_index, valid)
    want = stats(c.rewards, c.group_index, c.seq_index, valid)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    ref_w = mgpo_weight_reference(c.rewards, c.group_index, mgpo_lambda=1.5)
    torch.testing.assert_close(want[0], ref_w[c.group_index] * group_advantages_reference(c.rewards, c.group_index))
    torch.testing.assert_close(want[1], ref_w)


def test_whole_loss_compiles_without_graph_breaks():
    c = make_case(**BASE, clip=True, rollout=True, ref=True)
    kw = c.inputs(beta=0.1, mgpo_lambda=1.0, num_groups=3, backend="torch")

    def step(h, w):
        out = mgpo_loss(h, w, c.targets, **kw)
        return out.loss, out.metrics["clip_frac_high"]

    assert_compiles_like_eager(step, c.hidden, c.weight)


def test_opcheck_custom_op():
    c = make_case([2, 3, 2], [0, 0, 0], [1.0, 0.0, 1.0], vocab=23, dim=8, bias=True, clip=True, rollout=True, ref=True)
    hidden, weight, bias = (t.clone().requires_grad_(True) for t in (c.hidden, c.weight, c.bias))
    n = hidden.shape[0]
    options = mgpo_options(eps_low=0.2, eps_high=0.28, tis_cap=2.0, beta=0.1, with_rollout=True)
    args = (hidden, weight, c.targets, bias, torch.randn(n), c.old_logp, c.rollout_logp, c.ref_logp,
            torch.full((n,), 1 / n), c.seq_index, 3, ops.encode_options(options), 0.9, -100, True, True,
            "torch", "chunked", None)  # fmt: skip
    torch.library.opcheck(ops.policy_loss_fused_op, args)


def reference_by_sequences(c: Case, *, aggregation: str, seqs_per_piece: int, **kw):
    """mgpo_loss_reference run on pieces of whole sequences and recombined exactly (bounded memory at large V).

    The advantages come from the whole batch (`advantages=` into each piece). Each piece's loss is its own
    aggregation; rescaled by (piece's / batch's) valid tokens (token-mean), sequences with a valid token
    (seq-mean-token-mean) or S * max_len (seq-sum-norm) and summed, it is the batch's loss, and so are the gradients.
    Token-mean metrics recombine by valid tokens, ratio_max by max. Returns (loss, metrics, dh, dW) in fp32.
    """
    weights = mgpo_weight_reference(c.rewards.float(), c.group_index, mgpo_lambda=kw.get("mgpo_lambda", 0.0))
    adv = weights[c.group_index] * group_advantages_reference(c.rewards.float(), c.group_index,
                                                              scale=kw.pop("scale", "group"))  # fmt: skip
    kw.pop("mgpo_lambda", None)
    valid = c.targets != -100
    if c.loss_mask is not None:
        valid &= c.loss_mask
    seq_len = torch.bincount(c.seq_index[valid], minlength=len(adv)).float()
    total = {"token-mean": valid.sum().clamp_min(1), "seq-mean-token-mean": (seq_len > 0).sum().clamp_min(1),
             "seq-sum-norm": len(adv) * seq_len.max().clamp_min(1)}[aggregation]  # fmt: skip
    hidden, weight = c.hidden.float(), c.weight.float().requires_grad_(True)
    loss, dh, sums, ratio_max = 0.0, torch.zeros_like(hidden), {}, torch.zeros(())
    for s0 in range(0, len(adv), seqs_per_piece):
        seqs = torch.arange(s0, min(s0 + seqs_per_piece, len(adv)), device=adv.device)
        rows = torch.isin(c.seq_index, seqs)
        sl = seq_len[seqs]
        part = {"token-mean": sl.sum().clamp_min(1), "seq-mean-token-mean": (sl > 0).sum().clamp_min(1),
                "seq-sum-norm": len(seqs) * sl.max().clamp_min(1)}[aggregation]  # fmt: skip
        h = hidden[rows].requires_grad_(True)
        old, rollout, ref, mask = (None if t is None else t[rows] for t in (c.old_logp, c.rollout_logp, c.ref_logp,
                                                                              c.loss_mask))  # fmt: skip
        out = mgpo_loss_reference(h, weight, c.targets[rows], seq_index=c.seq_index[rows] - s0,
                                  group_index=torch.zeros_like(seqs), advantages=adv[seqs], old_logp=old,
                                  rollout_logp=rollout, ref_logp=ref, loss_mask=mask, temperature=c.temperature,
                                  aggregation=aggregation, **kw)  # fmt: skip
        (out.loss * (part / total)).backward()
        loss = loss + out.loss.detach() * (part / total)
        dh[rows] = h.grad
        n_valid = valid[rows].sum()
        for name, m in out.metrics.items():
            if m.dim() == 0 and name != "ratio_max":
                sums[name] = sums.get(name, 0.0) + m * n_valid
        ratio_max = torch.maximum(ratio_max, out.metrics["ratio_max"])
    metrics = {name: v / valid.sum().clamp_min(1) for name, v in sums.items()}
    metrics |= {"ratio_max": ratio_max, "mgpo_weights": weights, "advantages": adv}
    return loss, metrics, dh, weight.grad


def test_reference_by_sequences_is_the_reference():
    """The recombination used at GPU shapes, checked here against the whole-batch reference."""
    for agg in AGGS:
        c = make_case(**BASE, clip=True, rollout=True, ref=True, ignored=(2, 9), masked=(4, 20))
        kw = dict(beta=0.1, mgpo_lambda=1.0)
        pieces = reference_by_sequences(c, aggregation=agg, seqs_per_piece=3, **kw)
        errs = errors(pieces, run(mgpo_loss_reference, c, up=True, aggregation=agg, **kw), c)
        assert max(errs.values()) <= FP32_TOL, (agg, errs)


def gpu_case(num_seqs=16, max_len=512, group_size=4, *, seed=0) -> Case:
    """Qwen2.5 head shapes on the GPU: packed sequences of 257 to 512 tokens, bf16, groups of 4: one all correct,
    one all wrong, two mixed."""
    h_dim, vocab = 2048, 151_936
    g = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.tensor([max_len - (97 * s) % (max_len // 2) for s in range(num_seqs)], device="cuda")
    seq_index = torch.repeat_interleave(torch.arange(num_seqs, device="cuda"), lengths)
    n = seq_index.numel()
    hidden = torch.randn(n, h_dim, device="cuda", generator=g).to(torch.bfloat16)
    weight = (0.04 * torch.randn(vocab, h_dim, device="cuda", generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    targets[::53] = -100
    rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0], device="cuda").float()[:num_seqs]
    with torch.no_grad():
        logp = linear_logprob(hidden, weight, targets)
    old = logp - ratio_pattern(n, "cuda").log()  # both clips active, no ratio near a clip edge
    return Case(hidden=hidden, weight=weight, bias=None, targets=targets, seq_index=seq_index,
                group_index=torch.arange(num_seqs, device="cuda") // group_size, rewards=rewards, old_logp=old,
                rollout_logp=old - 0.5 * torch.randn(n, device="cuda", generator=g), ref_logp=None, loss_mask=None,
                temperature=1.0)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", CUDA_BACKEND])
@pytest.mark.parametrize("agg", AGGS)
def test_gpu_qwen_head_matches_reference(agg, backend):
    """16 sequences of up to 512 tokens, V = 151,936, H = 2048, bf16, TIS on, lambda = 1: within 4 * 2^-8."""
    c = gpu_case()
    kw = dict(aggregation=agg, mgpo_lambda=1.0)
    ours = run(mgpo_loss, c, num_groups=4, backend=backend, **kw)
    ref = reference_by_sequences(c, seqs_per_piece=2, **kw)
    errs = errors(ours, ref, c)
    assert max(errs.values()) <= 4 * U_BF16, errs


@pytest.mark.gpu
def test_gpu_forward_backward_without_host_sync():
    """CUDA's sync debug mode raises on any host sync (.item(), nonzero, a blocking copy) in forward and backward."""
    c = gpu_case(num_seqs=4, max_len=128)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], device="cuda")
    hidden = c.hidden.clone().requires_grad_(True)
    weight = c.weight.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mgpo_loss(hidden, weight, c.targets, **c.inputs(rewards=rewards, mgpo_lambda=1.0, num_groups=1))
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss) and hidden.grad.abs().sum() > 0


LIGER_SETTINGS = [
    # id, our aggregation, Liger's loss_type, with the k3 KL (beta > 0), with truncated IS
    ("grpo-seqmean", "seq-mean-token-mean", "grpo", False, False),
    ("dapo-tokenmean-tis", "token-mean", "dapo", False, True),
    ("bnpo-tokenmean-kl", "token-mean", "bnpo", True, False),
    ("drgrpo-seqsumnorm", "seq-sum-norm", "dr_grpo", False, False),
]


def compare_with_liger(device, num_seqs, max_len, h_dim, vocab, dtype, aggregation, loss_type, kl, tis, tol):
    """Our loss against Liger's LigerFusedLinearGRPOLoss where the two definitions coincide.

    Liger takes padded [B, T, H] inputs, an attention mask and advantages [B] (it computes none); we take the same
    tokens flattened, with loss_mask = attention mask and seq_index = row. The settings that coincide with ours at
    mgpo_lambda = 0 (A' = A, plain GRPO):
    - advantages: ours (metrics["advantages"]) given to Liger; importance_sampling_level="token"; same eps_low /
      eps_high / temperature; delta=None (no two-sided clip), use_bias_correction_kl=False.
    - loss_type "grpo" = "seq-mean-token-mean" (Liger divides by B, we by the sequences with a valid token: equal when
      every sequence has one); "dapo" (one process, num_items_in_batch=None) and "bnpo" = "token-mean";
      "dr_grpo" with max_completion_length = the longest valid sequence of the batch = "seq-sum-norm".
    - beta = 0 and use_ref_model=False, or beta > 0 with ref_per_token_logps: Liger's k3 is ours,
      exp(ref - logp) - (ref - logp) - 1, added outside the IS weight.
    - truncated IS: vllm_is_ratio = min(exp(old_logp - rollout_logp), tis_cap), multiplied into the clipped term.
    - metrics: Liger's clip ratio = clip_frac_low + clip_frac_high; its KL metric = kl_mean.
    Liger computes log-probs of every position (no ignore_index): padded positions get a valid token id and a finite
    old log-prob, and the mask keeps them out of both losses.
    """
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    g = torch.Generator(device=device).manual_seed(0)
    lengths = torch.tensor([max_len - (37 * s) % (max_len // 2) for s in range(num_seqs)], device=device)
    mask = torch.arange(max_len, device=device)[None, :] < lengths[:, None]  # [B, T]
    hidden = torch.randn(num_seqs, max_len, h_dim, device=device, generator=g).to(dtype)
    weight = (torch.randn(vocab, h_dim, device=device, generator=g) / h_dim**0.5).to(dtype)
    targets = torch.randint(0, vocab, (num_seqs, max_len), device=device, generator=g)
    rewards = (torch.arange(num_seqs, device=device) % 3 == 0).float()
    with torch.no_grad():
        logp = linear_logprob(hidden.flatten(0, 1), weight, targets.flatten()).view(num_seqs, max_len)
    old = logp - ratio_pattern(logp.numel(), device).log().view_as(logp)
    rollout = old - 0.5 * torch.randn(num_seqs, max_len, device=device, generator=g)
    ref_logp = old + 0.2 * torch.randn(num_seqs, max_len, device=device, generator=g)
    beta, tis_cap = (0.05 if kl else 0.0), 2.0

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours = mgpo_loss(h1.flatten(0, 1), w1, targets.flatten(), seq_index=torch.arange(num_seqs, device=device)
                     .repeat_interleave(max_len), group_index=torch.arange(num_seqs, device=device) // 4,
                     rewards=rewards, old_logp=old.flatten(), rollout_logp=rollout.flatten() if tis else None,
                     ref_logp=ref_logp.flatten() if kl else None, beta=beta, tis_cap=tis_cap, aggregation=aggregation,
                     loss_mask=mask.flatten(), eps_low=0.2, eps_high=0.28, temperature=0.9)  # fmt: skip
    ours.loss.backward()

    liger = LigerFusedLinearGRPOLoss(beta=beta, use_ref_model=kl, loss_type=loss_type, epsilon_low=0.2,
                                     epsilon_high=0.28, importance_sampling_level="token", temperature=0.9,
                                     max_completion_length=int(lengths.max()), compiled=False)  # fmt: skip
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    is_ratio = torch.exp(old - rollout).clamp(max=tis_cap) if tis else None
    loss, liger_metrics = liger(h2, w2, targets, mask.long(), ours.metrics["advantages"],
                                ref_per_token_logps=ref_logp if kl else None, old_per_token_logps=old,
                                vllm_is_ratio=is_ratio)  # fmt: skip
    loss.backward()
    assert rel_err(ours.loss, loss.detach(), abs(float(ours.metrics["advantages"].abs().mean()))) <= tol
    assert rel_err(h1.grad, h2.grad) <= tol and rel_err(w1.grad, w2.grad) <= tol
    clip = ours.metrics["clip_frac_low"] + ours.metrics["clip_frac_high"]
    assert rel_err(clip, liger_metrics[-1]) <= tol
    if kl:
        assert rel_err(ours.metrics["kl_mean"], liger_metrics[0]) <= tol


@pytest.mark.parametrize("setting", LIGER_SETTINGS, ids=[s[0] for s in LIGER_SETTINGS])
def test_liger_grpo_coincides_cpu(setting):
    """Liger's GRPO loss is plain torch: a small fp32 check on the CPU, skipped when liger_kernel is missing."""
    pytest.importorskip("liger_kernel.chunked_loss")
    _, agg, loss_type, kl, tis = setting
    compare_with_liger("cpu", 6, 9, 16, 131, torch.float32, agg, loss_type, kl, tis, FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", LIGER_SETTINGS, ids=[s[0] for s in LIGER_SETTINGS])
def test_gpu_liger_grpo_coincides(setting):
    """16 sequences x 512 positions, Qwen2.5 head, bf16: each side within 4 * 2^-8 of the truth, so 8 * 2^-8 apart."""
    pytest.importorskip("liger_kernel.chunked_loss")
    _, agg, loss_type, kl, tis = setting
    compare_with_liger("cuda", 16, 512, 2048, 151_936, torch.bfloat16, agg, loss_type, kl, tis, 8 * U_BF16)

"""The benchmarks: ids, shapes, inputs, fp32 references, correctness checks and every implementation timed.

Correctness tolerances come from bf16 precision: u = 2^-8 is bf16's spacing at 1; an implementation that keeps
logits, dlogits or gradients in bf16 rounds each of them once or twice, so its relative error against the fp32
reference is a few u. We accept 4u = 1.6e-2 in relative L2 error (per output) and nothing NaN.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vibeperf import _ext
from vibeperf.kernels import linear_cross_entropy, linear_logprob, mgpo_loss
from vibeperf.kernels.lmhead import scoring_fwd, settings, triton_fwd
from vibeperf.kernels.mgpo import mgpo_loss_reference
from vibeperf.kernels.mgpo.reference import group_advantages_reference, mgpo_weight_reference
from vibeperf.kernels.policy import group_statistics

from .common import relative_error

H, V = 2048, 151_936
LLAMA3_H, LLAMA3_V = 4096, 128_256
TOL = 4 * 2**-8
EAGER_MAX_LOGIT_BYTES = 24 * 2**30


@dataclasses.dataclass
class Impl:
    fn: Callable
    skip: Callable[[int], str | None] | None = None


@dataclasses.dataclass
class Benchmark:
    id: str
    sizes: list[int]
    flops: Callable[[int], float]
    make_inputs: Callable[[int], dict]
    reference: Callable[[dict], object]
    check: Callable[[object, object], tuple[bool, str]]
    impls: dict[str, Impl]
    rep_ms: float = 1000.0
    device: str = "cuda"  # where the inputs live and how time is taken (common.time_ms)
    hidden: int = H
    vocab: int = V


def _optional(module: str):
    """Baselines are optional: a missing one is reported as not run, never silently dropped."""
    import importlib

    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        return None, f"{module} not installed ({exc})"


def head_inputs(n: int, grad: bool = False, hidden_size: int = H, vocab: int = V) -> dict:
    g = torch.Generator(device="cuda").manual_seed(n)
    hidden = torch.randn(n, hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.float32, generator=g) * 0.04
    weight = weight.to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    targets[::97] = -100
    if grad:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    return {"hidden": hidden, "weight": weight, "targets": targets}


def _eager_skip(n: int) -> str | None:
    return "fp32 logits would not fit comfortably" if n * V * 6 > EAGER_MAX_LOGIT_BYTES else None


def _chunked_logprob_torch(hidden, weight, targets, chunk=4096):
    def piece(h, w, t):
        z = (h @ w.T).float()
        valid = t != -100
        logp = z.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1) - torch.logsumexp(z, -1)
        return torch.where(valid, logp, 0.0)

    piece = _COMPILED.setdefault("logprob", torch.compile(piece, dynamic=False))
    return torch.cat([piece(hidden[i : i + chunk], weight, targets[i : i + chunk])
                      for i in range(0, hidden.shape[0], chunk)])  # fmt: skip


_COMPILED: dict = {}


def _cuda_ext_skip(n: int) -> str | None:
    return None if _ext.HAS_CUDA_EXT else f"vibeperf._C built without CUDA ({_ext.EXT_ERROR or 'no CUDA part'})"


def _b1_impls() -> dict[str, Impl]:
    liger, liger_err = _optional("liger_kernel.transformers.functional")
    cce, cce_err = _optional("cut_cross_entropy")
    impls = {
        "vibeperf-triton": Impl(lambda x: linear_logprob(x["hidden"], x["weight"], x["targets"], backend="triton")),
        # with the entropy (RL old-log-probs, scoring); the row's check is on the log-probs, the entropy's is
        # tests/test_linear_logprob.py::test_gpu_forward_full_vocab
        "vibeperf-triton+entropy": Impl(
            lambda x: linear_logprob(x["hidden"], x["weight"], x["targets"], return_entropy=True, backend="triton")[0]
        ),
        "vibeperf-chunked": Impl(lambda x: linear_logprob(x["hidden"], x["weight"], x["targets"], backend="triton",
                                                          schedule="chunked")),  # fmt: skip
        "vibeperf-chunked+entropy": Impl(lambda x: linear_logprob(x["hidden"], x["weight"], x["targets"],
                                                                  return_entropy=True, backend="triton",
                                                                  schedule="chunked")[0]),  # fmt: skip
        "vibeperf-cuda": Impl(
            lambda x: linear_logprob(x["hidden"], x["weight"], x["targets"], backend="cuda"), skip=_cuda_ext_skip
        ),
        "vibeperf-tiled": Impl(lambda x: scoring_fwd.linear_logprob_tiled_fwd(x["hidden"], x["weight"], x["targets"],
                                                                             None, 1.0, -100, False)[0]),  # fmt: skip
        "vibeperf-fused": Impl(lambda x: triton_fwd.linear_logprob_fwd(x["hidden"], x["weight"], x["targets"], None,
                                                                       1.0, -100, False)[0]),  # fmt: skip
        "eager": Impl(
            lambda x: -F.cross_entropy((x["hidden"] @ x["weight"].T).float(), x["targets"], reduction="none"),
            skip=_eager_skip,
        ),
        "compiled": Impl(lambda x: _chunked_logprob_torch(x["hidden"], x["weight"], x["targets"])),
        "liger": Impl(
            lambda x: -liger.liger_fused_linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none"),
            skip=lambda n: liger_err,
        ),
        "cce": Impl(
            lambda x: -cce.linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none"),
            skip=lambda n: cce_err,
        ),
        "floor": Impl(lambda x: x["hidden"] @ x["weight"].T),
    }
    return impls


def _b1_reference(x: dict) -> torch.Tensor:
    return linear_logprob(x["hidden"].float(), x["weight"].float(), x["targets"], backend="torch")


def _b1_check(out, ref) -> tuple[bool, str]:
    if out.shape != ref.shape:  # the floor returns logits: nothing to compare
        return True, "bare head GEMM (no softmax), not comparable"
    err = relative_error(out, ref)
    return err <= TOL, f"rel err {err:.1e}"


def _grads(loss, x):
    return (loss.detach(), *torch.autograd.grad(loss, [x["hidden"], x["weight"]]))


def liger_chunk_rows(n: int, hidden: int, vocab: int) -> int:
    """The token rows of Liger-Kernel 0.8.5's logits chunk in its fused linear cross-entropy: the next power of two
    of n / ceil(V / H), so that a chunk's logits take about as much memory as the hidden states."""
    per = -(-vocab // hidden)
    return 1 << max(0, (-(-n // per) - 1).bit_length())


def with_env(name: str, value: str) -> Callable[[Callable], Callable]:
    """A decorator: fn run with the environment variable `name` set to `value` for the call, restored after it (the
    engine's run-wide precision modes of lmhead/settings.py, for the B2 rows that measure them)."""

    def wrap(fn: Callable) -> Callable:
        def run(*args, **kwargs):
            old = os.environ.get(name)
            os.environ[name] = value
            try:
                return fn(*args, **kwargs)
            finally:
                if old is None:
                    del os.environ[name]
                else:
                    os.environ[name] = old

        return run

    return wrap


dw_acc_weight = with_env(settings.DW_ACC_ENV, "weight")  # dW summed over the chunks in the weight's dtype, as Liger
grad_form_rows = with_env(settings.GRAD_ENV, "rows")  # dz by the row pass, not the default scaled form


def _b2_impls() -> dict[str, Impl]:
    liger, liger_err = _optional("liger_kernel.transformers.functional")
    cce, cce_err = _optional("cut_cross_entropy")

    def floor(x):
        h, w = x["hidden"].detach(), x["weight"].detach()
        z = h @ w.T
        return None, z @ w, z.T @ h

    def triton_ce(x, workspace_bytes=None):
        return _grads(linear_cross_entropy(x["hidden"], x["weight"], x["targets"], backend="triton",
                                           workspace_bytes=workspace_bytes), x)  # fmt: skip

    def triton_ce_in_liger_chunks(x):
        (n, h), w = x["hidden"].shape, x["weight"]
        return triton_ce(x, workspace_bytes=liger_chunk_rows(n, h, w.shape[0]) * w.shape[0] * w.element_size())

    compiled_ce = torch.compile(lambda h, w, t: F.cross_entropy((h @ w.T).float(), t), dynamic=False)
    return {
        "vibeperf-triton": Impl(triton_ce),
        "vibeperf-cuda": Impl(lambda x: _grads(linear_cross_entropy(x["hidden"], x["weight"], x["targets"],
                                                                    backend="cuda"), x),
                              skip=_cuda_ext_skip),  # fmt: skip
        # Opt-in: dW summed in bf16 (no fp32 accumulator); then also with Liger's logits chunk (Liger's memory).
        "vibeperf-bf16acc": Impl(dw_acc_weight(triton_ce)),
        "vibeperf-bf16acc-ligerchunk": Impl(dw_acc_weight(triton_ce_in_liger_chunks)),
        # Opt-out: the row pass's gradient form instead of the default scaled one (lmhead/settings.py)
        "vibeperf-rows": Impl(grad_form_rows(triton_ce)),
        "eager": Impl(lambda x: _grads(F.cross_entropy((x["hidden"] @ x["weight"].T).float(), x["targets"]), x),
                      skip=lambda n: "fp32 logits + grads would not fit comfortably" if n > 8192 else None),
        "compiled": Impl(lambda x: _grads(compiled_ce(x["hidden"], x["weight"], x["targets"]), x),
                         skip=lambda n: "materialises the logits; run at N <= 8192 only" if n > 8192 else None),
        "liger": Impl(lambda x: _grads(liger.liger_fused_linear_cross_entropy(x["hidden"], x["weight"], x["targets"]),
                                       x), skip=lambda n: liger_err),  # fmt: skip
        "cce": Impl(lambda x: _grads(cce.linear_cross_entropy(x["hidden"], x["weight"], x["targets"]), x),
                    skip=lambda n: cce_err),
        "floor": Impl(floor),
    }


def _b2_reference(x: dict):
    h = x["hidden"].detach().float().requires_grad_(True)
    w = x["weight"].detach().float().requires_grad_(True)
    loss = linear_cross_entropy(h, w, x["targets"], backend="torch")
    return (loss.detach(), *torch.autograd.grad(loss, [h, w]))


def _b2_check(out, ref) -> tuple[bool, str]:
    if out[0] is None:
        return True, "three bare GEMMs (bf16 dW), not comparable"
    errs = [relative_error(o, r) for o, r in zip(out, ref)]
    return max(errs) <= TOL, "rel err loss/dh/dW " + "/".join(f"{e:.1e}" for e in errs)


B3_SEQS, B3_GROUP, B3_LAMBDA = 16, 8, 1.0
B3_REWARDS = [1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1]  # p_c = 0.5 and 0.25: both MaxEnt weights in play
# Token ratios exp(logp - old_logp), in turn: both clips active, none within 5% of a clip edge. The clip is a step of
# the gradient in logp, and a bf16 logit moves a ratio by ~1%: a token at the edge would test rounding, not precision.
B3_RATIOS = [0.5, 1.5, 0.95, 1.1, 0.7, 1.3, 1.0, 0.85]


def _b3_inputs(n: int) -> dict:
    """B3: n tokens packed as 16 sequences of n / 16, two groups of 8, every token in the loss (Liger's GRPO has no
    ignore_index), old log-probs putting the ratios at B3_RATIOS.

    Adds seq_index [N], group_index [S], rewards [S], old_logp [N], advantages [S] (A', our group statistics, given
    to Liger, which computes none) and the [S, N / S] attention mask Liger takes.
    """
    if n % B3_SEQS:
        raise ValueError(f"B3 needs a token count divisible by {B3_SEQS}, got {n}")
    x = head_inputs(n, grad=True)
    x["targets"].clamp_(min=0)
    with torch.no_grad():
        logp = linear_logprob(x["hidden"], x["weight"], x["targets"])
    x["old_logp"] = logp - torch.tensor(B3_RATIOS, device="cuda").log().repeat(n // len(B3_RATIOS) + 1)[:n]
    x["seq_index"] = torch.arange(B3_SEQS, device="cuda").repeat_interleave(n // B3_SEQS)
    x["group_index"] = torch.arange(B3_SEQS, device="cuda") // B3_GROUP
    x["rewards"] = torch.tensor(B3_REWARDS, device="cuda", dtype=torch.float32)
    x["advantages"], _ = group_statistics(x["rewards"], x["group_index"], num_groups=B3_SEQS // B3_GROUP,
                                                   mgpo_lambda=B3_LAMBDA)  # fmt: skip
    x["liger_mask"] = torch.ones(B3_SEQS, n // B3_SEQS, device="cuda", dtype=torch.int64)
    return x


def _b3_impls() -> dict[str, Impl]:
    """Ours; our B2 (linear_cross_entropy) on the same tokens, for the <= 1.15x target in the same run; Liger's
    LigerFusedLinearGRPOLoss where its definition coincides with ours (tests/test_mgpo_kernel.py says why):
    loss_type="grpo" = seq-mean-token-mean (every sequence has tokens), beta=0, token-level ratios, the same eps, and
    our A' given as its advantages (so lambda = 1 is computed by both); inputs shaped [S, T, H] as it wants them.
    The floor is the three bare GEMMs."""
    liger, liger_err = _optional("liger_kernel.chunked_loss")
    grpo = None if liger is None else liger.LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2,
        importance_sampling_level="token",
    )  # fmt: skip

    def ours(x, backend="triton"):
        loss = mgpo_loss(x["hidden"], x["weight"], x["targets"], seq_index=x["seq_index"], group_index=x["group_index"],
                         rewards=x["rewards"], old_logp=x["old_logp"], mgpo_lambda=B3_LAMBDA,
                         num_groups=B3_SEQS // B3_GROUP, backend=backend).loss  # fmt: skip
        return ("mgpo", *_grads(loss, x))

    def liger_fn(x):
        s, t = x["liger_mask"].shape
        loss, _ = grpo(x["hidden"].view(s, t, H), x["weight"], x["targets"].view(s, t), x["liger_mask"],
                       x["advantages"], old_per_token_logps=x["old_logp"].view(s, t))  # fmt: skip
        return ("mgpo", *_grads(loss, x))

    def floor(x):
        h, w = x["hidden"].detach(), x["weight"].detach()
        z = h @ w.T
        return ("floor", z @ w, z.T @ h)

    return {
        "vibeperf-triton": Impl(ours),
        "vibeperf-cuda": Impl(lambda x: ours(x, backend="cuda"), skip=_cuda_ext_skip),
        "vibeperf-ce(B2)": Impl(lambda x: ("ce", *_grads(linear_cross_entropy(x["hidden"], x["weight"], x["targets"],
                                                                              backend="triton"), x))),  # fmt: skip
        "liger": Impl(liger_fn, skip=lambda n: liger_err),
        "floor": Impl(floor),
    }


def _b3_reference(x: dict) -> dict:
    """fp32 references on the bf16 inputs upcast. MGPO: `mgpo_loss_reference` one sequence at a time ([T, V] fp32
    logits rather than [N, V]) with A' from the reference group statistics; with seq-mean-token-mean and every token
    valid, the batch's loss and gradients are the mean of the sequences'. CE (for the B2 row): as B2's."""
    weights = mgpo_weight_reference(x["rewards"], x["group_index"], mgpo_lambda=B3_LAMBDA)
    adv = weights[x["group_index"]] * group_advantages_reference(x["rewards"], x["group_index"])
    h = x["hidden"].detach().float()
    w = x["weight"].detach().float().requires_grad_(True)
    t = h.shape[0] // B3_SEQS
    loss, dh = torch.zeros((), device=h.device), torch.zeros_like(h)
    for s in range(B3_SEQS):
        rows = slice(s * t, (s + 1) * t)
        hs = h[rows].clone().requires_grad_(True)
        out = mgpo_loss_reference(hs, w, x["targets"][rows], seq_index=torch.zeros_like(x["targets"][rows]),
                                  group_index=x["group_index"][:1] * 0, advantages=adv[s : s + 1],
                                  old_logp=x["old_logp"][rows])  # fmt: skip
        (out.loss / B3_SEQS).backward()
        loss += out.loss.detach() / B3_SEQS
        dh[rows] = hs.grad
    return {"mgpo": (loss, dh, w.grad), "ce": _b2_reference(x), "loss_scale": float(adv.abs().mean())}


def _b3_check(out, ref) -> tuple[bool, str]:
    kind, *values = out
    if kind == "floor":
        return True, "three bare GEMMs (bf16 dW), not comparable"
    errs = [relative_error(o, r) for o, r in zip(values, ref[kind])]
    if kind == "mgpo":  # the loss can cancel to near 0: its error is taken against the size of its terms, mean |A'|
        o, r = float(values[0]), float(ref[kind][0])
        errs[0] = abs(o - r) / max(abs(r), ref["loss_scale"])
    return max(errs) <= TOL, f"{kind} rel err loss/dh/dW " + "/".join(f"{e:.1e}" for e in errs)


BENCHMARKS: dict[str, Benchmark] = {
    "B1": Benchmark(
        id="B1",
        sizes=[8192, 32768, 65536],
        flops=lambda n: 2 * n * H * V,
        make_inputs=head_inputs,
        reference=_b1_reference,
        check=_b1_check,
        impls=_b1_impls(),
        rep_ms=600.0,
    ),
    "B2": Benchmark(
        id="B2",
        sizes=[8192, 32768, 65536],
        flops=lambda n: 6 * n * H * V,
        make_inputs=lambda n: head_inputs(n, grad=True),
        reference=_b2_reference,
        check=_b2_check,
        impls=_b2_impls(),
        rep_ms=1500.0,
    ),
    "B2-llama3": Benchmark(  # the Llama-3 head (issue 19's table): the same impls and checks as B2
        id="B2-llama3",
        sizes=[4096, 8192, 16384],
        flops=lambda n: 6 * n * LLAMA3_H * LLAMA3_V,
        make_inputs=lambda n: head_inputs(n, grad=True, hidden_size=LLAMA3_H, vocab=LLAMA3_V),
        reference=_b2_reference,
        check=_b2_check,
        impls=_b2_impls(),
        rep_ms=1500.0,
        hidden=LLAMA3_H,
        vocab=LLAMA3_V,
    ),
    "B3": Benchmark(
        id="B3",
        sizes=[B3_SEQS * 4096],
        flops=lambda n: 6 * n * H * V,
        make_inputs=_b3_inputs,
        reference=_b3_reference,
        check=_b3_check,
        impls=_b3_impls(),
        rep_ms=1500.0,
    ),
}

# The policy-loss family rows of B3: their own module, built on the helpers above (so imported last), which adds
# BENCHMARKS["B3-policy"] itself; registering there keeps `import vibeperf.bench.b3_policy` first free of a cycle.
from . import b3_policy  # noqa: E402, F401

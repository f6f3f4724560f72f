"""The benchmarks: ids, shapes, inputs, fp32 references, correctness checks and every implementation timed.

Correctness tolerances come from bf16 precision: u = 2^-8 is bf16's spacing at 1; an implementation that keeps
logits, dlogits or gradients in bf16 rounds each of them once or twice, so its relative error against the fp32
reference is a few u. We accept 4u = 1.6e-2 in relative L2 error (per output) and nothing NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from vibeperf.kernels import linear_cross_entropy, linear_logprob
from vibeperf.kernels.linear_logprob import triton_fwd

from .common import relative_error

H, V = 2048, 151_936
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


def _optional(module: str):
    """Baselines are optional: a missing one is reported as not run, never silently dropped."""
    import importlib

    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        return None, f"{module} not installed ({exc})"


def head_inputs(n: int, grad: bool = False) -> dict:
    g = torch.Generator(device="cuda").manual_seed(n)
    hidden = torch.randn(n, H, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = (torch.randn(V, H, device="cuda", dtype=torch.float32, generator=g) * 0.04).to(torch.bfloat16)
    targets = torch.randint(0, V, (n,), device="cuda", generator=g)
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


def _b1_impls() -> dict[str, Impl]:
    liger, liger_err = _optional("liger_kernel.transformers.functional")
    cce, cce_err = _optional("cut_cross_entropy")
    impls = {
        "vibeperf-triton": Impl(lambda x: linear_logprob(x["hidden"], x["weight"], x["targets"], backend="triton")),
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


def _b2_impls() -> dict[str, Impl]:
    liger, liger_err = _optional("liger_kernel.transformers.functional")
    cce, cce_err = _optional("cut_cross_entropy")

    def floor(x):
        h, w = x["hidden"].detach(), x["weight"].detach()
        z = h @ w.T
        return None, z @ w, z.T @ h

    compiled_ce = torch.compile(lambda h, w, t: F.cross_entropy((h @ w.T).float(), t), dynamic=False)
    return {
        "vibeperf-triton": Impl(lambda x: _grads(linear_cross_entropy(x["hidden"], x["weight"], x["targets"],
                                                                      backend="triton"), x)),  # fmt: skip
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
}

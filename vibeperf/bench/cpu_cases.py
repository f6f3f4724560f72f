"""B1 and B2 at a CPU size, so `vibeperf bench` (and its --compare) runs, checks and times something on a machine
without a GPU.

The same ops as the GPU cases (log-prob forward; cross-entropy forward+backward) at H = 256, V = 8,192 in fp32, our
chunked PyTorch path (`backend="torch"`, what `auto` runs on CPU tensors) beside the eager one-matmul version, both
checked against an fp64 reference before they are timed. Tolerance from fp32 precision: u = 2^-24; a dot product of
H terms and a log-sum-exp over V terms round a few dozen times at most, so 2^-16 (256 u) in relative L2 error per
output separates rounding from a real error (a wrong row or a missing term is O(1)). These figures measure the CPU
path only; they say nothing about the GPU kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vibeperf.kernels import linear_cross_entropy, linear_logprob

from .common import relative_error
from .registry import Benchmark, Impl

H, V = 256, 8192
TOL = 2.0**-16
SIZES = [256]


def head_inputs(n: int, grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.1
    targets = torch.randint(0, V, (n,), generator=g)
    targets[::97] = -100
    if grad:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    return {"hidden": hidden, "weight": weight, "targets": targets}


def _logprob64(hidden, weight, targets):
    z = hidden.double() @ weight.double().T
    valid = targets != -100
    logp = z.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1) - torch.logsumexp(z, -1)
    return torch.where(valid, logp, 0.0)


def _grads(loss, x):
    return (loss.detach(), *torch.autograd.grad(loss, [x["hidden"], x["weight"]]))


def _b2_reference(x):
    h = x["hidden"].detach().double().requires_grad_(True)
    w = x["weight"].detach().double().requires_grad_(True)
    loss = F.cross_entropy(h @ w.T, x["targets"])
    return (loss.detach(), *torch.autograd.grad(loss, [h, w]))


def _check(out, ref) -> tuple[bool, str]:
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    errs = [relative_error(o, r) for o, r in zip(outs, refs)]
    return max(errs) <= TOL, "rel err " + "/".join(f"{e:.1e}" for e in errs)


BENCHMARKS: dict[str, Benchmark] = {
    "B1": Benchmark(
        id="B1",
        sizes=SIZES,
        flops=lambda n: 2 * n * H * V,
        make_inputs=head_inputs,
        reference=lambda x: _logprob64(x["hidden"], x["weight"], x["targets"]),
        check=_check,
        impls={
            "vibeperf-torch": Impl(lambda x: linear_logprob(x["hidden"], x["weight"], x["targets"], backend="torch")),
            "eager": Impl(lambda x: -F.cross_entropy(x["hidden"] @ x["weight"].T, x["targets"], reduction="none")),
        },
        rep_ms=300.0,
        device="cpu",
        hidden=H,
        vocab=V,
    ),
    "B2": Benchmark(
        id="B2",
        sizes=SIZES,
        flops=lambda n: 6 * n * H * V,
        make_inputs=lambda n: head_inputs(n, grad=True),
        reference=_b2_reference,
        check=_check,
        impls={
            "vibeperf-torch": Impl(lambda x: _grads(linear_cross_entropy(x["hidden"], x["weight"], x["targets"],
                                                                     backend="torch"), x)),  # fmt: skip
            "eager": Impl(lambda x: _grads(F.cross_entropy(x["hidden"] @ x["weight"].T, x["targets"]), x)),
        },
        rep_ms=300.0,
        device="cpu",
        hidden=H,
        vocab=V,
    ),
}

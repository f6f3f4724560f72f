"""linear_logprob / linear_cross_entropy against the fp32 reference: values and both gradients.

Tolerances come from precision (flash-attention's rule): the reference runs in fp64 on the same (upcast) inputs;
the kernel's relative error against it must be at most twice the error of plain PyTorch at the input precision
(for bf16 / fp16: logits and their gradients in that dtype, as eager training computes them; for fp32: the fp32
reference), plus a floor of 1e-6 for outputs that plain PyTorch happens to get exactly right.
CPU runs use the Triton interpreter at small, odd shapes; `-m gpu` runs the full Qwen2.5 head shapes.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA_BACKEND, on_backend, to_cpu
from vibeperf.kernels import linear_cross_entropy, linear_logprob, lmhead
from vibeperf.kernels.ce import linear_cross_entropy_reference, linear_logprob_reference, ops
from vibeperf.kernels.lmhead import chunked, scoring_fwd, triton_fwd, triton_gemm, triton_rows


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def make_case(n, v, h, dtype, *, scale=0.3, ignore_every=0, negative=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    b = None
    if negative:
        # every logit far below zero: a running max that started at 0 instead of -inf would be wrong here
        b = torch.full((v,), -80.0).to(dtype)
    elif bias:
        b = torch.randn(v, generator=g).to(dtype)
    return hidden, weight, targets, b


CASES = [
    # id, N, V, H, dtype, temperature, options
    ("T257-V1009-H64-fp32", 257, 1009, 64, torch.float32, 1.0, {}),
    ("T257-V1009-H64-fp32-temp0.7-ignored", 257, 1009, 64, torch.float32, 0.7, {"ignore_every": 5}),
    ("T67-V301-H48-fp32-bias", 67, 301, 48, torch.float32, 1.0, {"bias": True}),
    ("T33-V131-H32-fp32-allneg", 33, 131, 32, torch.float32, 1.0, {"negative": True}),
    ("T129-V1009-H64-bf16-temp0.7", 129, 1009, 64, torch.bfloat16, 0.7, {"ignore_every": 7}),
    ("T40-V257-H32-fp16", 40, 257, 32, torch.float16, 1.0, {}),
]
BACKENDS = ["triton", "torch", CUDA_BACKEND]


def _tol(low_precision_err):
    return 2 * low_precision_err + 1e-6


def _torch_low_precision_logprob(hidden, weight, targets, temperature, bias, want_entropy=False):
    """Plain PyTorch at the input precision: logits rounded to the input dtype, then softmax in fp32."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.float() / temperature
    valid = targets != -100
    lse = torch.logsumexp(z, -1)
    logp = torch.where(valid, z.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1) - lse, 0.0)
    ent = torch.where(valid, lse - (torch.softmax(z, -1) * z).sum(-1), 0.0)
    return (logp, ent) if want_entropy else logp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_logprob_and_entropy_forward(case, backend):
    _, n, v, h, dtype, temp, opts = case
    hidden, weight, targets, bias = make_case(n, v, h, dtype, **opts)
    h_b, w_b, t_b, b_b = on_backend(backend, hidden, weight, targets, bias)
    logp, ent = linear_logprob(h_b, w_b, t_b, temperature=temp, bias=b_b, return_entropy=True, backend=backend)
    logp, ent = to_cpu(logp), to_cpu(ent)
    up = lambda t: None if t is None else t.double()
    ref_logp, ref_ent = linear_logprob_reference(up(hidden), up(weight), targets, temperature=temp, bias=up(bias),
                                                 return_entropy=True)  # fmt: skip
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    lp_lo, ent_lo = _torch_low_precision_logprob(hidden, weight, targets, temp, bias, want_entropy=True)
    assert rel_err(logp, ref_logp) <= _tol(rel_err(lp_lo, ref_logp))
    assert rel_err(ent, ref_ent) <= _tol(rel_err(ent_lo, ref_ent))
    ignored = targets == -100
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)


@pytest.mark.parametrize(
    "variant", ["fused-splits1", "fused-splits3", "tiled-16x64", "tiled-default", "chunked-16", "chunked-default"]
)
def test_forward_schedules_agree(variant):
    """Every forward schedule, with V split in several slices / tiles / chunks, against the reference."""
    hidden, weight, targets, bias = make_case(67, 301, 48, torch.float32, bias=True, ignore_every=9)
    if variant.startswith("chunked"):
        chunk = 16 if variant == "chunked-16" else None
        logp, lse, ent = scoring_fwd.linear_logprob_chunked_fwd(hidden, weight, targets, bias, 0.7, -100, True,
                                                                chunk=chunk)  # fmt: skip
    elif variant.startswith("fused"):
        splits = int(variant[-1])
        logp, lse, ent = triton_fwd.linear_logprob_fwd(hidden, weight, targets, bias, 0.7, -100, True, splits=splits)
    else:
        tile = (16, 64) if variant == "tiled-16x64" else None
        logp, lse, ent = scoring_fwd.linear_logprob_tiled_fwd(hidden, weight, targets, bias, 0.7, -100, True, tile=tile)
    ref_logp, ref_ent = linear_logprob_reference(hidden, weight, targets, temperature=0.7, bias=bias,
                                                 return_entropy=True)  # fmt: skip
    ref_lse = torch.logsumexp((hidden @ weight.T + bias) / 0.7, -1)
    assert rel_err(logp, ref_logp) <= 1e-5
    assert rel_err(ent, ref_ent) <= 1e-5
    assert rel_err(lse, ref_lse) <= 1e-5


def _engine_case(mode: str, dtype, seed: int):
    """Inputs and keyword arguments of `chunked.lmhead_chunked` for one loss mode: chunks of 80 of 203 rows (ragged
    last one), V = 1000, ignored rows, temperature 0.8. Modes: nll (weights known before the pass), given (upstream
    gradients of logp), given+entropy (and of the entropy), given+entropy-out (entropy returned, no gradient),
    step (the per-token step of the policy losses)."""
    hidden, weight, targets, _ = make_case(203, 1000, 64, dtype, ignore_every=6)
    g = torch.Generator().manual_seed(seed)
    kw = dict(temperature=0.8, ignore_index=-100, backend="triton", chunk=80)
    if mode == "nll":
        kw.update(loss=1, g_logp=torch.full((203,), 1 / 203))
    elif mode == "step":
        kw.update(loss=0, g_logp=None, step=lambda i0, i1, lp, en: torch.exp(lp) - 0.1 * en)
    else:
        kw.update(loss=0, g_logp=torch.randn(203, generator=g), want_entropy=mode != "given")
        if mode == "given+entropy":
            kw.update(g_ent=torch.randn(203, generator=g))
    return hidden, weight, targets, kw


def _assert_engine_outputs_match(out, ref, tol):
    for name, a, b in zip(["logp", "entropy", "lse", "dh", "dW", "db"], out, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, name
            assert rel_err(a.float(), b.float()) <= tol, name


@pytest.mark.parametrize("epi_split", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_epilogue_forward_schedule(monkeypatch, dtype, epi_split):
    """The default forward ("epilogue": the head GEMM folds its tiles into softmax statistics and the targets'
    logits, no logit stored) against the reference: two chunks of rows (the smallest partials budget: 128 rows),
    tiles cut by V, ignored rows, a temperature; a bias (not supported by it) falls back to "chunked"."""
    monkeypatch.setattr(triton_gemm, "CONFIG", triton_gemm.interpreter_config(epi_split))
    hidden, weight, targets, _ = make_case(203, 1000, 48, dtype, ignore_every=5)
    budget = 12 * 8 * 128  # partials of 128 rows x 8 tiles of 128 columns
    assert triton_gemm.epilogue_chunk_rows(203, 1000, budget) == 128
    assert triton_gemm.epilogue_chunk_rows(10**6, 151_936) == 64 * 2**20 // (12 * 1187) // 128 * 128  # 4608
    ran = []
    for name in ("epilogue", "chunked"):
        fwd = lmhead.FORWARD_SCHEDULES[name]
        spy = lambda *a, _f=fwd, _n=name, **k: ran.append(_n) or _f(*a, **k)  # noqa: E731
        monkeypatch.setitem(lmhead.FORWARD_SCHEDULES, name, spy)
    logp, ent = linear_logprob(hidden, weight, targets, temperature=0.7, return_entropy=True, backend="triton",
                               workspace_bytes=budget)  # fmt: skip
    ref_logp, ref_ent = linear_logprob_reference(hidden.double(), weight.double(), targets, temperature=0.7,
                                                 return_entropy=True)  # fmt: skip
    lo = _torch_low_precision_logprob(hidden, weight, targets, 0.7, None)
    tol = 1e-5 if dtype == torch.float32 else _tol(rel_err(lo, ref_logp))
    assert rel_err(logp, ref_logp) <= tol
    assert rel_err(ent, ref_ent) <= max(tol, 1e-5 if dtype == torch.float32 else 1e-3)
    assert torch.all(logp[targets == -100] == 0)
    linear_logprob(hidden, weight, targets, bias=torch.zeros(1000, dtype=dtype), backend="triton")
    assert ran == ["epilogue", "chunked"]


def _grads(fn, hidden, weight, bias, *, up=False):
    """(value, dh, dW, db) of fn; up=True: on fp64 copies of the inputs, up=<dtype>: on copies in that dtype."""
    dtype = torch.float64 if up is True else (up or None)
    cast = lambda t: t.detach().clone().to(dtype) if dtype else t.detach().clone()
    leaves = [cast(hidden), cast(weight)]
    b = None if bias is None else cast(bias)
    for t in leaves + ([b] if b is not None else []):
        t.requires_grad_(True)
    out = fn(leaves[0], leaves[1], b)
    out.backward()
    return out.detach(), leaves[0].grad, leaves[1].grad, None if b is None else b.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cross_entropy_forward_backward(case, backend, reduction):
    """The three-pass path (gradients computed in the forward) for mean and sum reductions."""
    _, n, v, h, dtype, temp, opts = case
    hidden, weight, targets, bias = make_case(n, v, h, dtype, **opts)
    (t_b,) = on_backend(backend, targets)
    ours = _grads(lambda hh, ww, bb: 0.5 * linear_cross_entropy(hh, ww, t_b, reduction=reduction, temperature=temp,
                                                                bias=bb, backend=backend),
                  *on_backend(backend, hidden, weight, bias))  # fmt: skip
    ref = _grads(lambda hh, ww, bb: 0.5 * linear_cross_entropy_reference(hh, ww, targets, reduction=reduction,
                                                                         temperature=temp, bias=bb),
                 hidden, weight, bias, up=True)  # fmt: skip
    low = _grads(lambda hh, ww, bb: 0.5 * F.cross_entropy((((hh @ ww.T) + (0 if bb is None else bb)).float() / temp),
                                                          targets, reduction=reduction), hidden, weight, bias)
    for name, o, r, lo in zip(("loss", "dh", "dW", "db"), ours, ref, low):
        if r is None:
            continue
        assert o.dtype == (torch.float32 if name == "loss" else dtype), name
        assert rel_err(to_cpu(o), r) <= _tol(rel_err(lo, r)), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_recompute_backward_with_arbitrary_upstream(case, backend):
    """reduction "none" / return_entropy: any upstream gradient of logp and entropy (the recompute backward)."""
    _check_recompute_backward(case, backend, used=("logp", "entropy"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", [("logp",), ("entropy",)])
def test_recompute_backward_of_one_output(used, backend):
    """Only one of (logp, entropy) reaches the loss: the other's gradient is None, not zeros, and still right."""
    _check_recompute_backward(CASES[1], backend, used)


def _check_recompute_backward(case, backend, used):
    _, n, v, h, dtype, temp, opts = case
    hidden, weight, targets, bias = make_case(n, v, h, dtype, **opts)
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    t_b, gl_b, ge_b = on_backend(backend, targets, g_logp, g_ent)

    def loss(lp, en, gl, ge):
        return sum((lp * gl).sum() if u == "logp" else (en * ge).sum() for u in used)

    def ours_fn(hh, ww, bb):
        lp, en = linear_logprob(hh, ww, t_b, temperature=temp, bias=bb, return_entropy=True, backend=backend)
        return loss(lp, en, gl_b, ge_b)

    def ref_fn(hh, ww, bb):
        lp, en = linear_logprob_reference(hh, ww, targets, temperature=temp, bias=bb, return_entropy=True)
        return loss(lp, en, g_logp, g_ent)

    def low_fn(hh, ww, bb):
        lp, en = _torch_low_precision_logprob(hh, ww, targets, temp, bb, want_entropy=True)
        return loss(lp, en, g_logp, g_ent)

    ours, ref, low = (_grads(ours_fn, *on_backend(backend, hidden, weight, bias)),
                      _grads(ref_fn, hidden, weight, bias, up=True), _grads(low_fn, hidden, weight, bias))  # fmt: skip
    for name, o, r, lo in zip(("value", "dh", "dW", "db"), ours, ref, low):
        if r is not None:
            assert rel_err(to_cpu(o), r) <= _tol(rel_err(lo, r)), name


def test_cross_entropy_none_and_token_weight():
    hidden, weight, targets, _ = make_case(50, 97, 32, torch.float32, ignore_every=4)
    nll = linear_cross_entropy(hidden, weight, targets, reduction="none")
    ref = linear_cross_entropy_reference(hidden, weight, targets, reduction="none")
    assert rel_err(nll, ref) <= 1e-5
    w = torch.rand(50)
    weighted = linear_cross_entropy(hidden, weight, targets, reduction="sum", token_weight=w)
    assert torch.allclose(weighted, (ref * w).sum(), rtol=1e-5)
    mean = linear_cross_entropy(hidden, weight, targets, reduction="mean", token_weight=w)
    assert torch.allclose(mean, (ref * w).sum() / (targets != -100).sum(), rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", CUDA_BACKEND])
def test_all_rows_ignored_gives_zero_loss_and_gradients(backend):
    hidden, weight, targets, _ = on_backend(backend, *make_case(20, 64, 16, torch.float32))
    targets[:] = -100
    loss, dh, dw, _ = _grads(lambda hh, ww, bb: linear_cross_entropy(hh, ww, targets, backend=backend), hidden, weight,
                             None)  # fmt: skip
    assert loss.item() == 0.0 and torch.all(dh == 0) and torch.all(dw == 0)
    logp = linear_logprob(hidden[:0], weight, targets[:0], backend=backend)
    assert logp.shape == (0,)


def test_chunking_does_not_change_results():
    """Several chunks of the three-pass engine (including a ragged last one) equal one chunk."""
    hidden, weight, targets, bias = make_case(70, 131, 32, torch.float32, bias=True, ignore_every=6)
    w = torch.full((70,), 1 / 70)
    outs = [chunked.lmhead_chunked(hidden, weight, targets, bias, temperature=0.9, ignore_index=-100, loss=1,
                                   g_logp=w, want_entropy=True, backend="triton", chunk=c) for c in (70, 32, 13)]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_one_chunk_when_it_takes_no_more_memory():
    """With a low-precision dW the engine takes all tokens in one chunk when their logits fit the workspace plus the
    fp32 dW accumulator several chunks would hold; that chunk's dW comes straight from its GEMM, as accurate as
    plain bf16 autograd (within 2x of its error against fp32) and equal to the several-chunk result to bf16
    rounding."""
    assert chunked.chunk_rows(10_000, 1000, 2, workspace_bytes=2**20, dw_hidden=4096) == 512  # 20 MB > 1 + 16.4 MB
    assert chunked.chunk_rows(8_000, 1000, 2, workspace_bytes=2**20, dw_hidden=4096) == 8_000  # 16 MB fits
    assert chunked.chunk_rows(8_000, 1000, 2, workspace_bytes=2**20) == 512  # no dW: the workspace decides
    v = 151_936  # a workspace of 5,520 rows: cut to a multiple of chunked.CHUNK_ALIGN
    assert chunked.chunk_rows(65_536, v, 2, workspace_bytes=5_520 * v * 2) == 2 * chunked.CHUNK_ALIGN
    hidden, weight, targets, _ = make_case(200, 256, 64, torch.float32, ignore_every=7)
    w = torch.full((200,), 1 / 200)
    kw = dict(temperature=1.0, ignore_index=-100, loss=1, g_logp=w, backend="torch", workspace_bytes=128 * 256 * 2)
    assert chunked.chunk_rows(200, 256, 2, 128 * 256 * 2, dw_hidden=64) == 200
    ref_dw = chunked.lmhead_chunked(hidden, weight, targets, None, **kw)[4]
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    one = chunked.lmhead_chunked(hb, wb, targets, None, **kw)[4]
    several = chunked.lmhead_chunked(hb, wb, targets, None, chunk=64, **kw)[4]
    assert one.dtype == several.dtype == torch.bfloat16
    h1, w1 = hb.clone().requires_grad_(True), wb.clone().requires_grad_(True)
    z = (h1 @ w1.T).float()
    (-(z.log_softmax(-1).gather(1, torch.where(targets == -100, 0, targets)[:, None])[:, 0] * (targets != -100))
     .sum() / 200).backward()  # fmt: skip
    plain = rel_err(w1.grad.float(), ref_dw)
    assert rel_err(one.float(), ref_dw) <= 2 * plain + 1e-6
    assert rel_err(one.float(), several.float()) <= 2 * 2**-8


def test_dw_accumulated_in_the_weight_dtype(monkeypatch):
    """$VIBEPERF_LMHEAD_DW_ACC=weight: dW summed over the chunks in the weight's dtype (no fp32 accumulator, the
    all-in-one-chunk rule off). Its error against the fp64 reference is bounded by precision: plain bf16 autograd's,
    plus one bf16 rounding (unit roundoff 2^-8) of each chunk's running sum; the fp32 mode stays within 2x plain's."""
    n, v, h, c = 301, 257, 64, 40  # 8 chunks, the last ragged
    hidden, weight, targets, _ = make_case(n, v, h, torch.float32, ignore_every=7)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    w = torch.full((n,), 1 / n)
    kw = dict(temperature=1.0, ignore_index=-100, loss=1, g_logp=w, backend="torch", workspace_bytes=c * v * 2)
    ref = chunked.lmhead_chunked(hidden.double(), weight.double(), targets, None, **kw)[4]
    fp32_acc = chunked.lmhead_chunked(hb, wb, targets, None, **kw)[4]
    monkeypatch.setenv("VIBEPERF_LMHEAD_DW_ACC", "weight")
    seen = []
    real_rows = chunked.chunk_rows
    monkeypatch.setattr(chunked, "chunk_rows", lambda *a, **k: seen.append(k["dw_hidden"]) or real_rows(*a, **k))
    low_acc = chunked.lmhead_chunked(hb, wb, targets, None, **kw)[4]
    assert seen == [0] and low_acc.dtype == torch.bfloat16  # no accumulator to weigh against the workspace
    assert not torch.equal(low_acc, fp32_acc)  # the mode took effect: 8 roundings instead of one
    # The running sums S_j after each chunk (from the fp64 engine's dz): their sizes weigh the roundings.
    sums = [chunked.lmhead_chunked(hidden[:i1].double(), weight.double(), targets[:i1], None,
                                   **{**kw, "g_logp": w[:i1]})[4].norm() for i1 in range(c, n + c, c)]  # fmt: skip
    h1, w1 = hb.clone().requires_grad_(True), wb.clone().requires_grad_(True)
    z = (h1 @ w1.T).float()
    (-(z.log_softmax(-1).gather(1, torch.where(targets == -100, 0, targets)[:, None])[:, 0] * (targets != -100))
     .sum() / n).backward()  # fmt: skip
    plain = rel_err(w1.grad.float(), ref)
    assert rel_err(fp32_acc.float(), ref) <= 2 * plain + 1e-6
    assert rel_err(low_acc.float(), ref) <= plain + 2**-8 * float(sum(sums) / ref.norm())


_EPILOGUE_CASES = [  # form, dtype, mode, epi_split: "rows" as before, "scaled" on fp32 (its fallbacks: the next test)
    *[("rows", d, m, e) for d in (torch.float32, torch.float16) for m in ("nll", "given+entropy", "step")
      for e in (1, 2)],
    *[("scaled", torch.float32, m, e) for m in ("nll", "step") for e in (1, 2)],
    ("scaled", torch.float32, "given", 2),
]


@pytest.mark.parametrize(("form", "dtype", "mode", "epi_split"), _EPILOGUE_CASES,
                         ids=[f"{f}-{str(d)[6:]}-{m}-split{e}" for f, d, m, e in _EPILOGUE_CASES])  # fmt: skip
def test_head_gemm_with_statistics_epilogue_matches(monkeypatch, dtype, mode, epi_split, form):
    """The Triton head GEMM whose epilogue writes the rows' partial softmax states (triton_gemm.py) gives the
    engine's outputs of the cuBLAS GEMM + two-pass row kernel, in either gradient form: "rows" (the row kernel merges
    the partials and reads and writes z once) and "scaled" ($VIBEPERF_LMHEAD_GRAD: the GEMM stores P = 2^(z - mref)
    and dz = alpha P + beta onehot(y); fp32 here, the interpreter's stand-in for bf16, which has fp32's exponent
    range). Several chunks with a ragged last one, tiles cut by V (1000 = 31 tiles of 32 + 8: with the epilogue in
    two pieces, the last tile's second piece lies wholly past V), ignored rows, a temperature; the per-token loss
    step (policy losses) included."""
    monkeypatch.setattr(triton_gemm, "CONFIG", triton_gemm.interpreter_config(epi_split))
    hidden, weight, targets, kw = _engine_case(mode, dtype, seed=1)
    workspace = torch.empty(80, 1000, dtype=dtype)
    assert triton_gemm.eligible(None, hidden, weight, workspace)
    assert not triton_gemm.eligible(torch.zeros(1000, dtype=dtype), hidden, weight, workspace)
    assert not triton_gemm.eligible(None, hidden[:, :63].contiguous(), weight[:, :63].contiguous())  # rows unaligned
    monkeypatch.setattr(chunked, "HEAD_GEMM", "cublas")
    ref = chunked.lmhead_chunked(hidden, weight, targets, None, **kw)
    monkeypatch.setattr(chunked, "HEAD_GEMM", "triton")
    monkeypatch.setenv("VIBEPERF_LMHEAD_GRAD", form)
    calls = []
    real_scale = triton_rows.lmhead_row_scale
    monkeypatch.setattr(triton_rows, "lmhead_row_scale", lambda *a, **k: calls.append(1) or real_scale(*a, **k))
    out = chunked.lmhead_chunked(hidden, weight, targets, None, **kw)
    assert bool(calls) == (form == "scaled")
    # fp16: dz rounded to fp16 from statistics that agree to ~1e-6
    _assert_engine_outputs_match(out, ref, 1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("case", ["fp16", "entropy-gradient", "bias", "torch-backend"])
def test_scaled_gradient_form_falls_back_to_rows(monkeypatch, case):
    """$VIBEPERF_LMHEAD_GRAD=scaled applies to the fused head GEMM with a workspace of fp32's exponent range (bf16, or
    fp32 under the interpreter) and no entropy gradient; elsewhere the engine runs the row pass, with the same results
    bit for bit."""
    monkeypatch.setattr(triton_gemm, "CONFIG", triton_gemm.interpreter_config(1))
    dtype = torch.float16 if case == "fp16" else torch.float32
    hidden, weight, targets, b = make_case(40, 96, 32, dtype, ignore_every=5, bias=case == "bias")
    kw = dict(temperature=0.9, ignore_index=-100, loss=0, g_logp=torch.randn(40), chunk=16,
              backend="torch" if case == "torch-backend" else "triton")
    if case == "entropy-gradient":
        kw.update(g_ent=torch.randn(40), want_entropy=True)
    calls = []
    real_scale = triton_rows.lmhead_row_scale
    monkeypatch.setattr(triton_rows, "lmhead_row_scale", lambda *a, **k: calls.append(1) or real_scale(*a, **k))
    ref = chunked.lmhead_chunked(hidden, weight, targets, b, **kw)
    monkeypatch.setenv("VIBEPERF_LMHEAD_GRAD", "scaled")
    out = chunked.lmhead_chunked(hidden, weight, targets, b, **kw)
    assert not calls
    _assert_engine_outputs_match(out, ref, 0.0)


# Rounding tests of Triton stores run in fp16: the interpreter truncates fp32 to bf16 where the GPU rounds to nearest
# (its fp16 rounds to nearest, as the GPU does).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("first", [0, 3])
def test_add_target_rows_rounds_each_destination_once(dtype, first):
    """triton_rows.add_target_rows (the scaled form's target term of dW): dw[y_r] += beta_r h_r with repeated targets
    (one run of 9, longer than the kernel's 4-row block, and one of exactly 4) and rows without a target (-1);
    H = 150 cut into blocks. Below fp32 each destination row is the fp32 sum of its old value and all its rows,
    rounded once (bit for bit); rows no target names are untouched."""
    g = torch.Generator().manual_seed(first)

    def fixed(shape, bound, frac_bits):  # values of few bits: every fp32 product and sum here is exact
        return torch.randint(-bound, bound + 1, shape, generator=g) / 2.0**frac_bits

    y = torch.tensor([5, first, 5, -1, 8, first, 5, 7, 5, 5, 5, 5, 10, -1, 5, 10, 10, 5, 10])
    dw = fixed((11, 150), 1000, 8).to(dtype)
    hidden = fixed((len(y), 150), 1000, 6).to(dtype)
    beta = fixed((len(y),), 64, 2)
    keep = y >= 0
    want = dw.double().index_add(0, y[keep], hidden[keep].double() * beta[keep, None].double())
    out = dw.clone()
    triton_rows.add_target_rows(out, y, hidden, beta)
    if dtype == torch.float32:
        assert torch.allclose(out.double(), want, rtol=1e-6, atol=1e-4)
    else:
        assert torch.equal(out, want.to(dtype))  # one rounding of each row's exact sum
    untouched = [i for i in range(11) if i not in y.tolist()]
    assert torch.equal(out[untouched], dw[untouched])


def test_row_vectors_start_aligned_whatever_the_row_count():
    """Triton specialises pointers on 16-byte alignment: per-row vectors planed from one buffer must all start
    aligned, or a new token count compiles the kernels again (GPU: test_gpu_new_token_count_compiles_nothing)."""
    for rows in (1, 2, 3, 5, 16, 17, 1021):
        vecs = triton_rows.row_vectors(3, rows, torch.device("cpu"))
        assert len(vecs) == 3 and all(v.shape == (rows,) and v.is_contiguous() for v in vecs)
        assert all(v.data_ptr() % 64 == 0 for v in vecs), rows
        assert len({v.data_ptr() for v in vecs}) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_rows_rounds_once(dtype):
    """triton_rows.scale_rows: x alpha (the scaled form's dW operand) and x alpha + beta W[y] (its dh from P W in
    fp32), y = -1 adding nothing; summed in fp32 and rounded once to the output's dtype (bit for bit, as torch's
    fp32 math rounded once); H = 150 cut into blocks; a row-strided output (dh's slice of a chunk)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 150, generator=g)
    alpha, beta = torch.randn(6, generator=g), torch.randn(6, generator=g)
    weight = torch.randn(9, 150, generator=g).to(dtype)
    y = torch.tensor([3, -1, 8, 3, 0, -1])
    assert torch.equal(triton_rows.scale_rows(x.to(dtype), alpha), (x.to(dtype).float() * alpha[:, None]).to(dtype))
    dh = torch.zeros(8, 150, dtype=dtype)
    triton_rows.scale_rows(x, alpha, out=dh[1:7], target=(beta, weight, y))
    term = torch.where(y[:, None] >= 0, weight[y.clamp(min=0)].float() * beta[:, None], 0.0)
    assert torch.equal(dh[1:7], (x * alpha[:, None] + term).to(dtype))
    assert not dh[0].any() and not dh[7].any()


@pytest.mark.parametrize("step", [False, True])
def test_scaled_gradient_refills_rows_beyond_its_range(monkeypatch, step):
    """The scaled form holds dz = alpha P for rows whose NLL is at most SCALE_REF_LOG2 + P_MAX_LOG2 bits (66.5
    nats); P of a row beyond that was capped by the GEMM, and the row is rewritten from its recomputed logits
    (`lmhead_row_refill_kernel`). Rows 3 and 100 get a target logit 120 nats below the others (the GEMM's cap is hit),
    row 50 one of 45 nats (in range); several chunks; the results match the cuBLAS + row-kernel engine."""
    monkeypatch.setattr(triton_gemm, "CONFIG", triton_gemm.interpreter_config(2))
    hidden, weight, targets, kw = _engine_case("step" if step else "nll", torch.float32, seed=2)
    weight = weight.clone()
    for row, gap in ((3, 120.0), (100, 120.0), (50, 45.0)):
        targets[row] = 990 - row  # a vocabulary row of its own
        weight[990 - row] = -gap * 0.8 * hidden[row] / hidden[row].norm() ** 2  # logit -gap at temperature 0.8
    seen = []
    real_scale = triton_rows.lmhead_row_scale

    def spy(*a, **k):
        out = real_scale(*a, **k)
        if out[3] is not None:
            seen.append(out[2] - (a[2] - triton_rows.SCALE_REF_LOG2) / triton_fwd.LOG2E)  # lse - target logit
        return out

    monkeypatch.setattr(triton_rows, "lmhead_row_scale", spy)
    monkeypatch.setattr(chunked, "HEAD_GEMM", "cublas")
    ref = chunked.lmhead_chunked(hidden, weight, targets, None, **kw)
    monkeypatch.setattr(chunked, "HEAD_GEMM", "triton")
    monkeypatch.setenv("VIBEPERF_LMHEAD_GRAD", "scaled")
    out = chunked.lmhead_chunked(hidden, weight, targets, None, **kw)
    nll = torch.cat(seen)
    assert nll[[3, 100]].min() > 100 and 45 < nll[50] < 66  # the rows are where the test means them to be
    _assert_engine_outputs_match(out, ref, 1e-5)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_fp32_master_weight_returns_fp32_dw(backend, dtype):
    """An fp32 weight with low-precision hidden states (fp32 weights under autocast): the op computes in hidden's
    dtype and returns dW in fp32 from its fp32 accumulator, closer to the fp32 math of the same GEMM inputs than the
    same op on a low-precision copy of the weight (whose dW is rounded once more); forward, dh equal to that op's."""
    hidden, w32, targets, bias = make_case(133, 257, 40, torch.float32, bias=True, ignore_every=7)
    h = hidden.to(dtype)

    def run(weight, b):
        hh, ww = h.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = linear_cross_entropy(hh, ww, targets, bias=b, backend=backend)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    loss_m, dh_m, dw_m = run(w32, bias)
    loss_l, dh_l, dw_l = run(w32.to(dtype), bias)
    assert dw_m.dtype == torch.float32 and dh_m.dtype == dtype
    assert torch.equal(loss_m, loss_l) and torch.equal(dh_m, dh_l)
    hr, wr = h.float().requires_grad_(True), w32.to(dtype).float().requires_grad_(True)  # the GEMMs' inputs, in fp32
    linear_cross_entropy_reference(hr, wr, targets, bias=bias).backward()
    assert rel_err(dw_m, wr.grad) < rel_err(dw_l.float(), wr.grad)
    assert rel_err(dw_m, wr.grad) <= torch.finfo(dtype).eps  # what is left: logits and dz rounded to the dtype
    with pytest.raises(ValueError, match="or weight be fp32"):
        linear_cross_entropy(h, w32.to(torch.float64), targets, backend=backend)


def test_no_grad_path_skips_gradients():
    hidden, weight, targets, _ = make_case(30, 64, 16, torch.float32)
    hidden.requires_grad_(True)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    assert torch.allclose(loss, linear_cross_entropy_reference(hidden.detach(), weight, targets), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden": torch.zeros(4, 8, 2)}, "hidden must be"),
        ({"weight": torch.zeros(10, 7)}, "weight must be"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, "targets must be"),
        ({"targets": torch.zeros(4)}, "integer"),
        ({"weight": torch.zeros(10, 8, dtype=torch.float64)}, "share a float dtype"),
        ({"bias": torch.zeros(3)}, "bias must be"),
        ({"temperature": 0.0}, "temperature"),
        ({"backend": "nope"}, "backend must be"),
    ],
    ids=["hidden-3d", "weight-H", "targets-N", "targets-float", "dtype-mismatch", "bias-V", "temp-0", "bad"],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    args = {"hidden": torch.zeros(4, 8), "weight": torch.zeros(10, 8), "targets": torch.zeros(4, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises((ValueError, NotImplementedError), match=message):
        linear_logprob(**args)


@pytest.mark.parametrize(("backend", "workspace"),
                         [("torch", 2**12), pytest.param("cuda", None, marks=CUDA_BACKEND.marks)],
                         ids=["torch", "cuda"])  # fmt: skip
def test_opcheck_custom_ops(backend, workspace):
    hidden, weight, targets, bias, w = on_backend(backend, *make_case(9, 37, 16, torch.float32, bias=True),
                                                  torch.full((9,), 1 / 9))  # fmt: skip
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(ops.linear_logprob_op, (hidden, weight, targets, bias, 0.8, -100, True, backend, "chunked",
                                                  workspace))  # fmt: skip
    torch.library.opcheck(ops.linear_nll_fused_op, (hidden, weight, targets, None, w, 1.0, -100, True, True, backend,
                                                    None))  # fmt: skip


def test_torch_compile_has_no_graph_breaks():
    hidden, weight, targets, _ = make_case(24, 53, 16, torch.float32, ignore_every=5)

    def step(h, w, t):
        logp = linear_logprob(h, w, t, backend="torch")
        return linear_cross_entropy(h, w, t, backend="torch") + logp.sum() * 0.1

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(h1, w1, targets)
    out.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = step(h2, w2, targets)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-5)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-4, atol=1e-7)


def test_backward_twice_is_refused():
    hidden, weight, targets, _ = make_case(8, 16, 8, torch.float32)
    hidden.requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, targets, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_upstream_scaling_is_in_place_and_skipped_at_one(dtype, monkeypatch):
    """lmhead.upstream.scale_by_upstream (the backward of the ops that form their gradients in the forward): in place,
    the version bumped either way (a second backward is refused); an incoming gradient of 1 leaves the tensor as it
    was (on the device, no host sync), another scales it in fp32 with one rounding to its dtype (bf16: the
    interpreter truncates where the GPU rounds to nearest, so one bf16 spacing, 2^-7 relative); 5,003 elements: two
    kernel blocks, the last ragged, walked by one program. The CPU path without the interpreter multiplies."""
    from vibeperf.kernels.lmhead import upstream

    monkeypatch.setattr(upstream, "INTERPRET", True)
    t = torch.randn(5003).to(dtype)
    ref = t.clone()
    version = t._version
    out = upstream.scale_by_upstream(t, torch.tensor(1.0))
    assert torch.equal(out, ref) and out.data_ptr() == t.data_ptr() and t._version > version
    monkeypatch.setattr(upstream, "MAX_PROGRAMS", 1)  # one program striding over both blocks
    out = upstream.scale_by_upstream(t, torch.tensor(0.37))
    want = ref.float() * 0.37
    ulp = 2**-7 if dtype == torch.bfloat16 else 0.0
    assert out.data_ptr() == t.data_ptr() and out.dtype == dtype
    assert ((out.float() - want.to(dtype).float()).abs() <= ulp * want.abs()).all()
    assert upstream.scale_by_upstream(t[:0], torch.tensor(2.0)) is None
    monkeypatch.setattr(upstream, "INTERPRET", False)
    assert torch.equal(upstream.scale_by_upstream(ref.clone(), torch.tensor(1.0)), ref)
    assert rel_err(upstream.scale_by_upstream(ref.clone(), torch.tensor(2.0)).float(), 2 * ref.float()) == 0


def test_engine_settings_are_read_at_call_time(monkeypatch):
    """VIBEPERF_LMHEAD_* set after import take effect at the next call; keyword arguments win over them."""
    hidden, weight, targets, _ = make_case(9, 37, 16, torch.float32, ignore_every=4)
    ref = linear_logprob_reference(hidden, weight, targets)
    ran = []
    for name in ("tiled", "fused"):
        fwd = lmhead.FORWARD_SCHEDULES[name]
        spy = lambda *a, _f=fwd, _n=name, **k: ran.append(_n) or _f(*a, **k)  # noqa: E731
        monkeypatch.setitem(lmhead.FORWARD_SCHEDULES, name, spy)
    monkeypatch.setenv("VIBEPERF_LMHEAD_FWD", "tiled")
    assert rel_err(linear_logprob(hidden, weight, targets, backend="triton"), ref) <= 1e-5
    assert rel_err(linear_logprob(hidden, weight, targets, backend="triton", schedule="fused"), ref) <= 1e-5
    assert ran == ["tiled", "fused"]

    monkeypatch.setenv("VIBEPERF_LMHEAD_WORKSPACE_MB", "3")
    assert chunked.chunk_rows(10**6, 1000, 2) == 3 * 2**20 // 2000 // 128 * 128
    assert chunked.chunk_rows(10**6, 1000, 2, workspace_bytes=2**20) == 512
    monkeypatch.setenv("VIBEPERF_LMHEAD_TILE_MB", "1")
    assert scoring_fwd.tile_shape(10**6, 4096, 2) == (256, 2048)
    seen = []
    monkeypatch.setattr(chunked, "chunk_rows",
                        lambda n, v, e, workspace_bytes=None, **kw: seen.append(workspace_bytes) or 4)  # fmt: skip
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_cross_entropy(h1, w1, targets, backend="torch", workspace_bytes=12345).backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_cross_entropy_reference(h2, w2, targets).backward()
    assert seen == [12345]  # the keyword reached the engine, whose chunks of 4 rows then gave the reference's grads
    assert rel_err(h1.grad, h2.grad) <= 1e-5 and rel_err(w1.grad, w2.grad) <= 1e-5


@pytest.mark.parametrize(
    ("env", "value", "kwargs", "message"),
    [
        ("VIBEPERF_LMHEAD_FWD", "fast", {}, "VIBEPERF_LMHEAD_FWD must be one of"),
        ("VIBEPERF_LMHEAD_WORKSPACE_MB", "lots", {"reduction": "sum"}, "VIBEPERF_LMHEAD_WORKSPACE_MB must be a"),
        ("VIBEPERF_LMHEAD_SCORE_MB", "0", {"schedule": "chunked"}, "VIBEPERF_LMHEAD_SCORE_MB must be a positive"),
        ("VIBEPERF_LMHEAD_TILE_MB", "-1", {"schedule": "tiled"}, "VIBEPERF_LMHEAD_TILE_MB must be a positive"),
        ("VIBEPERF_LMHEAD_DW_ACC", "bf16", {"reduction": "sum"}, "VIBEPERF_LMHEAD_DW_ACC must be one of"),
        ("VIBEPERF_LMHEAD_GRAD", "fast", {"reduction": "sum"}, "VIBEPERF_LMHEAD_GRAD must be one of"),
        (None, None, {"schedule": "fast"}, "schedule must be one of"),
        (None, None, {"workspace_bytes": 0}, "workspace_bytes must be a positive int"),
    ],
    ids=["fwd", "workspace", "score", "tile", "dw-acc", "grad", "schedule-arg", "workspace-arg"],
)
def test_engine_settings_bad_values_are_one_line_errors(monkeypatch, env, value, kwargs, message):
    hidden, weight, targets, _ = make_case(4, 10, 8, torch.float32)
    if env is not None:
        monkeypatch.setenv(env, value)
    reduction = kwargs.pop("reduction", None)
    with pytest.raises(ValueError, match=f"^{message}") as err:
        if reduction:  # the three-pass engine (gradients wanted)
            linear_cross_entropy(hidden.requires_grad_(True), weight.requires_grad_(True), targets,
                                 reduction=reduction, backend="torch")
        else:  # the scoring forward of backend "triton"
            linear_logprob(hidden, weight, targets, backend="triton", **kwargs)
    assert "\n" not in str(err.value)


# ---- GPU: the real Qwen2.5-3B head shapes -------------------------------------------------------------------------

GPU_H, GPU_V = 2048, 151_936


def _gpu_inputs(n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, GPU_H, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(GPU_V, GPU_H, device="cuda", generator=g) * 0.04).to(torch.bfloat16)
    targets = torch.randint(0, GPU_V, (n,), device="cuda", generator=g)
    targets[::11] = -100
    return hidden, weight, targets


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["scaled", "rows"])
def test_gpu_cross_entropy_without_host_sync(monkeypatch, form):
    """CUDA's sync debug mode raises on any host sync (.item(), nonzero, a blocking copy) in the fused CE's forward and
    backward, in either gradient form (the scaled form's sort and refill count included), over several chunks."""
    monkeypatch.setenv("VIBEPERF_LMHEAD_GRAD", form)
    hidden, weight, targets = _gpu_inputs(3000, seed=2)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy(hidden, weight, targets, backend="triton", workspace_bytes=1024 * GPU_V * 2)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def _calls_at_token_counts(inputs, counts, workspace_bytes):
    """The engine's calls of a training or scoring step at each of `counts` tokens (inputs(n, seed) -> hidden, weight,
    targets): CE forward and backward, log-prob + entropy forward and backward, and the no-grad forward."""
    for seed, n in enumerate(counts):
        hidden, weight, targets = inputs(n, seed)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        linear_cross_entropy(hidden, weight, targets, backend="triton", workspace_bytes=workspace_bytes).backward()
        logp, ent = linear_logprob(hidden, weight, targets, return_entropy=True, backend="triton")
        (logp.sum() + ent.sum()).backward()
        with torch.no_grad():
            linear_logprob(hidden, weight, targets, return_entropy=True, backend="triton")


# Packed SFT and RL batches change their token count every step. Unless told not to, Triton specialises an integer
# argument on being 1 or a multiple of 16 and a pointer on 16-byte alignment, so a kernel given a size that follows
# the token count, or a vector planed C elements into a buffer, compiles again (hundreds of ms on the host, inside a
# training step) the first time a count of another kind comes. After a first call, counts of other kinds (odd last
# chunks, a single token) must compile nothing.
NEW_COUNTS_GPU = (4096, (3001, 1, 2059))  # (first, then), chunks of 1,024 rows
NEW_COUNTS_CPU = (256, (300, 1, 259))  # chunks of 128 rows


def _launch_specialisation(kernel, args, kwargs, specialise):
    """What Triton keys a compiled kernel on, from one launch's arguments: each argument through Triton's own
    specialisation (type, divisibility by 16 / alignment, == 1), honouring do_not_specialize, and the constexprs'
    values."""
    from triton.backends.compiler import BaseBackend

    opts = kernel.kwargs
    no_value, no_align = set(opts.get("do_not_specialize") or ()), set(opts.get("do_not_specialize_on_alignment") or ())
    bound = dict(zip(kernel.arg_names, args)) | kwargs
    key = []
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if name not in bound:
            continue
        value = bound[name]
        if "constexpr" in str(param.annotation):
            key.append((name, repr(value)))
            continue
        try:
            key.append((name, specialise(BaseBackend, value, False, name not in no_value, name not in no_align)))
        except Exception:  # not a tensor or number (a TMA descriptor): its type
            key.append((name, type(value).__name__))
    return tuple(key)


@pytest.mark.parametrize("form", ["scaled", "rows"])
def test_new_token_count_specialises_no_kernel_anew(monkeypatch, form):
    """The CPU twin of test_gpu_new_token_count_compiles_nothing: under the interpreter nothing compiles, so every
    launch's arguments go through Triton's own specialisation function (what a GPU's compile cache is keyed on), and
    the launches at the later counts must all have keys the first count's launches had."""
    from triton.runtime import interpreter, jit

    specialise = getattr(jit, "native_specialize_impl", None)
    if not triton_fwd.INTERPRET or specialise is None:
        pytest.skip("needs the Triton interpreter and its native_specialize_impl")
    monkeypatch.setenv("VIBEPERF_LMHEAD_GRAD", form)
    keys = {}
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        keys.setdefault(self.__name__, set()).add(_launch_specialisation(self, args, kwargs, specialise))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)
    h, v = 32, 200

    def inputs(n, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.1,
                torch.randint(0, v, (n,), generator=g))  # fmt: skip

    first, then = NEW_COUNTS_CPU
    _calls_at_token_counts(inputs, [first], 128 * v * 4)
    seen = {name: set(k) for name, k in keys.items()}
    _calls_at_token_counts(inputs, then, 128 * v * 4)
    anew = {name: k - seen.get(name, set()) for name, k in keys.items() if k - seen.get(name, set())}
    assert not anew, f"specialised anew for a new token count: {anew}"
    ran = {"head_gemm_stats_kernel", "merge_rows_kernel", "lmhead_row_grad_kernel", "_scale_unless_one_kernel"}
    if form == "scaled":  # the scaled form's own kernels ran too, so their launches were checked
        ran |= {"lmhead_row_scale_kernel", "scale_rows_kernel", "add_target_rows_kernel", "target_logit_kernel"}
    assert ran <= set(seen), sorted(ran - set(seen))


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["scaled", "rows"])
def test_gpu_new_token_count_compiles_nothing(monkeypatch, form):
    """After one call at 4,096 tokens, calls at other counts compile no Triton kernel (see NEW_COUNTS_GPU's comment),
    checked by Triton's compile hook."""
    import triton

    monkeypatch.setenv("VIBEPERF_LMHEAD_GRAD", form)
    first, then = NEW_COUNTS_GPU
    _calls_at_token_counts(lambda n, seed: _gpu_inputs(n, seed=seed), [first], 1024 * GPU_V * 2)
    compiled = []

    def record(*args, **kwargs):
        compiled.append(str(kwargs.get("repr", kwargs.get("fn")))[:300])
        return False  # compile as usual

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", record)
    _calls_at_token_counts(lambda n, seed: _gpu_inputs(n, seed=seed + 1), then, 1024 * GPU_V * 2)
    torch.cuda.synchronize()
    assert not compiled, f"compiled again for a new token count: {sorted(set(compiled))}"


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1000, 65536, 131072], ids=["N1000", "N65536", "N131072"])
def test_gpu_forward_full_vocab(n):
    hidden, weight, targets = _gpu_inputs(n)
    logp, ent = linear_logprob(hidden, weight, targets, return_entropy=True)
    ref_logp, ref_ent = linear_logprob(hidden.float(), weight.float(), targets, return_entropy=True, backend="torch")
    lo = _torch_low_precision_logprob(hidden[:4096], weight, targets[:4096], 1.0, None)
    tol = 2 * rel_err(lo, ref_logp[:4096]) + 1e-6
    assert rel_err(logp, ref_logp) <= tol
    assert rel_err(ent, ref_ent) <= 1e-3
    fused, _, _ = triton_fwd.linear_logprob_fwd(hidden, weight, targets, None, 1.0, -100, False)
    assert rel_err(fused, ref_logp) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("head_gemm", ["cublas", "triton+rows", "triton", "triton+dwacc"])
@pytest.mark.parametrize("n", [4097, 65536], ids=["N4097", "N65536"])
def test_gpu_cross_entropy_grads_full_vocab(n, head_gemm, monkeypatch):
    """Full Qwen2.5 head, each engine variant (cuBLAS + two-pass rows; Triton with the statistics in its epilogue +
    one row pass; the default, Triton in the scaled gradient form, dz = alpha P, no pass; the default with dW summed
    over the chunks in bf16, $VIBEPERF_LMHEAD_DW_ACC=weight): loss, dh, dW within twice plain bf16 PyTorch's error.
    The bf16 sum's dW rounds its running sum once per chunk (k chunks, 16 at N65536): its bar is plain's error plus k
    roundings of unit roundoff u = 2^-8 adding up as a random walk over partial sums that grow like sqrt(j / k),
    u * sqrt((k + 1) / 2) (H200: 4.1x plain's error at N65536, 1.8x in B2). The scaled form's dW GEMM reads alpha h
    rounded to bf16, two roundings per term where plain has one; with the target's term (each row's largest) inside
    that GEMM too its dW was 2.3x plain's on the H200 (40bb23e); that term goes beside the GEMMs in fp32, rounded
    once as the row pass's -1 + p_y is (H200 at 8c30059: passed, B2's dh / dW errors half the row pass's)."""
    monkeypatch.setattr(chunked, "HEAD_GEMM", head_gemm.split("+")[0])
    monkeypatch.setenv("VIBEPERF_LMHEAD_GRAD", "rows" if head_gemm.endswith("+rows") else "scaled")
    bf16_sum = head_gemm.endswith("+dwacc")
    if bf16_sum:
        monkeypatch.setenv("VIBEPERF_LMHEAD_DW_ACC", "weight")
    hidden, weight, targets = _gpu_inputs(n, seed=1)
    ours = _grads(lambda hh, ww, bb: linear_cross_entropy(hh, ww, targets), hidden, weight, None)
    ref = _grads(lambda hh, ww, bb: linear_cross_entropy(hh, ww, targets, backend="torch"), hidden, weight, None,
                 up=torch.float32)  # fmt: skip
    m = 4096  # plain bf16 PyTorch on a slice sets the precision bar (its full-size logits would not fit)
    low = _grads(lambda hh, ww, bb: F.cross_entropy((hh[:m] @ ww.T).float(), targets[:m], reduction="sum") / n,
                 hidden, weight, None)  # fmt: skip
    ref_m = _grads(lambda hh, ww, bb: linear_cross_entropy(hh[:m], ww, targets[:m], reduction="sum",
                                                           backend="torch") / n, hidden, weight, None,
                   up=torch.float32)
    for i, name in enumerate(("loss", "dh", "dW")):
        lo_err = rel_err(low[i][:m] if name == "dh" else low[i], ref_m[i][:m] if name == "dh" else ref_m[i])
        err = rel_err(ours[i], ref[i])
        print(f"{head_gemm} N={n} {name}: rel err {err:.2e}, plain bf16 {lo_err:.2e} ({err / max(lo_err, 1e-30):.2f}x)")
        if bf16_sum and name == "dW":
            k = -(-n // chunked.chunk_rows(n, GPU_V, 2))
            assert err <= lo_err + 2**-8 * ((k + 1) / 2) ** 0.5, name
        else:
            assert err <= 2 * lo_err + 1e-6, name

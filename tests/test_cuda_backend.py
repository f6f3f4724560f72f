"""backend="cuda" (vibeperf._C: cuBLASLt GEMMs + the CUDA row kernel) against the fp64 / fp32 references.

The same odd cases and precision-derived tolerances as tests/test_linear_logprob.py (its helpers are reused): the
kernel's relative error must be at most twice that of plain PyTorch at the input precision. `-m gpu` runs them with
CUDA tensors, plus the full Qwen2.5 head (V = 151,936); on the CPU only the clear-error checks run.
"""

from __future__ import annotations

import pytest
import test_mgpo_kernel as mk
import torch
import torch.nn.functional as F
from test_linear_logprob import (
    CASES,
    GPU_H,
    GPU_V,
    _gpu_inputs,
    _grads,
    _tol,
    _torch_low_precision_logprob,
    make_case,
    rel_err,
)
from vibeperf.kernels import linear_cross_entropy, linear_logprob, mgpo_loss
from vibeperf.kernels.ce import linear_cross_entropy_reference, linear_logprob_reference, ops
from vibeperf.kernels.lmhead import autoselect, chunked, cuda_backend, triton_rows
from vibeperf.kernels.mgpo import mgpo_loss_reference as mgpo_reference

from vibeperf import _ext

needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
    reason=f"needs a GPU and vibeperf._C built with CUDA ({_ext.EXT_ERROR or 'built without its CUDA part'})",
)


def _cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def _cpu(t):
    return None if t is None else t.detach().cpu()


def test_cuda_backend_without_extension_raises_clear_error(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    hidden, weight, targets, _ = make_case(4, 10, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs vibeperf._C built with CUDA \("):
        linear_logprob(hidden, weight, targets, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs vibeperf._C built with CUDA \("):
        linear_cross_entropy(hidden.requires_grad_(True), weight, targets, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' needs vibeperf._C built with CUDA"):
        cuda_backend.linear_logprob_fwd(hidden, weight, targets, None, 1.0, -100, False)


def test_cuda_backend_needs_cuda_tensors(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", True)
    hidden, weight, targets, _ = make_case(4, 10, 8, torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        linear_logprob(hidden, weight, targets, backend="cuda")


def test_mgpo_cuda_backend_needs_the_extension_and_cuda_tensors(monkeypatch):
    hidden, weight, targets, _ = make_case(4, 10, 8, torch.float32)
    kw = dict(seq_index=torch.zeros(4, dtype=torch.long), group_index=torch.zeros(1, dtype=torch.long),
              rewards=torch.ones(1), old_logp=torch.zeros(4), backend="cuda")  # fmt: skip
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    with pytest.raises(RuntimeError, match="backend='cuda' needs vibeperf._C built with CUDA"):
        mgpo_loss(hidden, weight, targets, **kw)
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", True)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        mgpo_loss(hidden, weight, targets, **kw)


def test_chunk_below_one_is_refused_before_the_extension():
    hidden, weight, targets, _ = make_case(4, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        cuda_backend._chunk(4, weight, 0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_logprob_and_entropy_forward(case):
    _, n, v, h, dtype, temp, opts = case
    hidden, weight, targets, bias = make_case(n, v, h, dtype, **opts)
    logp, ent = linear_logprob(*_cuda(hidden, weight, targets), temperature=temp, bias=_cuda(bias)[0],
                               return_entropy=True, backend="cuda")  # fmt: skip
    up = lambda t: None if t is None else t.double()
    ref_logp, ref_ent = linear_logprob_reference(up(hidden), up(weight), targets, temperature=temp, bias=up(bias),
                                                 return_entropy=True)  # fmt: skip
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    lp_lo, ent_lo = _torch_low_precision_logprob(hidden, weight, targets, temp, bias, want_entropy=True)
    assert rel_err(_cpu(logp), ref_logp) <= _tol(rel_err(lp_lo, ref_logp))
    assert rel_err(_cpu(ent), ref_ent) <= _tol(rel_err(ent_lo, ref_ent))
    ignored = targets == -100
    assert torch.all(_cpu(logp)[ignored] == 0) and torch.all(_cpu(ent)[ignored] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_cross_entropy_forward_backward(case, reduction):
    """The three-pass path (gradients in the forward) against the fp64 reference, per output."""
    _, n, v, h, dtype, temp, opts = case
    hidden, weight, targets, bias = make_case(n, v, h, dtype, **opts)
    t_cuda = targets.cuda()
    ours = _grads(lambda hh, ww, bb: 0.5 * linear_cross_entropy(hh, ww, t_cuda, reduction=reduction, temperature=temp,
                                                                bias=bb, backend="cuda"),
                  *_cuda(hidden, weight), _cuda(bias)[0])  # fmt: skip
    ref = _grads(lambda hh, ww, bb: 0.5 * linear_cross_entropy_reference(hh, ww, targets, reduction=reduction,
                                                                         temperature=temp, bias=bb),
                 hidden, weight, bias, up=True)  # fmt: skip
    logits = lambda hh, ww, bb: ((hh @ ww.T) + (0 if bb is None else bb)).float() / temp
    low = _grads(lambda hh, ww, bb: 0.5 * F.cross_entropy(logits(hh, ww, bb), targets, reduction=reduction), hidden,
                 weight, bias)  # fmt: skip
    for name, o, r, lo in zip(("loss", "dh", "dW", "db"), ours, ref, low):
        if r is None:
            continue
        assert o.dtype == (torch.float32 if name == "loss" else dtype), name
        assert rel_err(_cpu(o), r) <= _tol(rel_err(lo, r)), name


@pytest.mark.parametrize("case", CASES[:5], ids=[c[0] for c in CASES[:5]])
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_recompute_backward_with_arbitrary_upstream(case):
    """linear_logprob's recompute backward: any upstream gradient of logp and entropy."""
    _, n, v, h, dtype, temp, opts = case
    hidden, weight, targets, bias = make_case(n, v, h, dtype, **opts)
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    t_cuda, gl_cuda, ge_cuda = _cuda(targets, g_logp, g_ent)

    def ours_fn(hh, ww, bb):
        lp, en = linear_logprob(hh, ww, t_cuda, temperature=temp, bias=bb, return_entropy=True, backend="cuda")
        return (lp * gl_cuda).sum() + (en * ge_cuda).sum()

    def ref_fn(hh, ww, bb):
        lp, en = linear_logprob_reference(hh, ww, targets, temperature=temp, bias=bb, return_entropy=True)
        return (lp * g_logp).sum() + (en * g_ent).sum()

    def low_fn(hh, ww, bb):
        lp, en = _torch_low_precision_logprob(hh, ww, targets, temp, bb, want_entropy=True)
        return (lp * g_logp).sum() + (en * g_ent).sum()

    ours = _grads(ours_fn, *_cuda(hidden, weight), _cuda(bias)[0])
    ref, low = _grads(ref_fn, hidden, weight, bias, up=True), _grads(low_fn, hidden, weight, bias)
    for name, o, r, lo in zip(("value", "dh", "dW", "db"), ours, ref, low):
        if r is not None:
            assert rel_err(_cpu(o), r) <= _tol(rel_err(lo, r)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_chunking_and_unaligned_rows(dtype):
    """Any chunk size (13 rows: GEMM pointers off 256-byte alignment; 1 row; a ragged last chunk) and V = 131 (the
    logits rows padded to a 16-byte stride, the row kernel's scalar tail) against the plain-torch engine on fp32 inputs.
    Tolerance: 4 units of the input precision's rounding (logits and dlogits are rounded once each), 1e-5 in fp32."""
    hidden, weight, targets, bias = _cuda(*make_case(70, 131, 40, dtype, bias=True, ignore_every=6))
    g = torch.Generator().manual_seed(2)
    g_logp, g_ent = _cuda(torch.randn(70, generator=g), torch.randn(70, generator=g))
    kw = dict(temperature=0.9, ignore_index=-100, loss=triton_rows.LOSS_GIVEN, g_logp=g_logp, g_ent=g_ent,
              want_entropy=True)  # fmt: skip
    ref = chunked.lmhead_chunked(hidden.float(), weight.float(), targets, bias.float(), backend="torch", **kw)
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps / 2
    for c in (70, 32, 13, 1):
        out = cuda_backend.lmhead_chunked(hidden, weight, targets, bias, chunk=c, **kw)
        for name, o, r in zip(("logp", "entropy", "lse", "dh", "dW", "db"), out, ref):
            assert o.dtype == (torch.float32 if name in ("logp", "entropy", "lse") else dtype), name
            assert rel_err(o.float(), r) <= tol, f"{name}, chunk {c}"


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_all_rows_ignored_and_empty_input():
    hidden, weight, targets, _ = _cuda(*make_case(20, 64, 16, torch.float32))
    targets[:] = -100
    loss, dh, dw, _ = _grads(lambda hh, ww, bb: linear_cross_entropy(hh, ww, targets, backend="cuda"), hidden, weight,
                             None)  # fmt: skip
    assert loss.item() == 0.0 and torch.all(dh == 0) and torch.all(dw == 0)
    logp = linear_logprob(hidden[:0], weight, targets[:0], backend="cuda")
    assert logp.shape == (0,)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_torch_checks():
    hidden, weight, targets, _ = _cuda(*make_case(8, 32, 16, torch.bfloat16))
    fwd = _ext.C.lmhead_logprob_fwd_cuda
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(hidden.T.contiguous().T, weight, targets, None, 1.0, -100, False, 4)
    with pytest.raises(RuntimeError, match="share a dtype"):
        fwd(hidden, weight.float(), targets, None, 1.0, -100, False, 4)
    with pytest.raises(RuntimeError, match="int64"):
        fwd(hidden, weight, targets.int(), None, 1.0, -100, False, 4)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        fwd(hidden.cpu(), weight, targets, None, 1.0, -100, False, 4)
    with pytest.raises(RuntimeError, match="chunk"):
        fwd(hidden, weight, targets, None, 1.0, -100, False, 0)
    with pytest.raises(RuntimeError, match="g_logp"):
        _ext.C.lmhead_chunked_cuda(hidden, weight, targets, None, torch.zeros(3, device="cuda"), None, 1.0, -100, 0,
                                   False, True, True, 4)  # fmt: skip


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_opcheck():
    hidden, weight, targets, bias = _cuda(*make_case(9, 37, 16, torch.float32, bias=True))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    w = torch.full((9,), 1 / 9, device="cuda")
    torch.library.opcheck(ops.linear_logprob_op, (hidden, weight, targets, bias, 0.8, -100, True, "cuda", "chunked",
                                                  None))  # fmt: skip
    torch.library.opcheck(ops.linear_nll_fused_op, (hidden, weight, targets, None, w, 1.0, -100, True, True, "cuda",
                                                    None))  # fmt: skip


@pytest.mark.parametrize("n", [1000, 65536], ids=["N1000", "N65536"])
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_forward_full_vocab(n):
    hidden, weight, targets = _gpu_inputs(n)
    logp, ent = linear_logprob(hidden, weight, targets, return_entropy=True, backend="cuda")
    ref_logp, ref_ent = linear_logprob(hidden.float(), weight.float(), targets, return_entropy=True, backend="torch")
    lo = _torch_low_precision_logprob(hidden[:4096], weight, targets[:4096], 1.0, None)
    tol = 2 * rel_err(lo, ref_logp[:4096]) + 1e-6
    assert rel_err(logp, ref_logp) <= tol
    assert rel_err(ent, ref_ent) <= 1e-3
    with torch.no_grad():
        triton_logp = linear_logprob(hidden, weight, targets, backend="triton")
    assert rel_err(triton_logp, logp) <= tol


@pytest.mark.parametrize("n", [4097, 65536], ids=["N4097", "N65536"])
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_cross_entropy_grads_full_vocab(n):
    assert (GPU_H, GPU_V) == (2048, 151_936)
    hidden, weight, targets = _gpu_inputs(n, seed=1)
    ours = _grads(lambda hh, ww, bb: linear_cross_entropy(hh, ww, targets, backend="cuda"), hidden, weight, None)
    ref = _grads(lambda hh, ww, bb: linear_cross_entropy(hh, ww, targets, backend="torch"), hidden, weight, None,
                 up=torch.float32)  # fmt: skip
    m = 4096  # plain bf16 PyTorch on a slice sets the precision bar (its full-size logits would not fit)
    low = _grads(lambda hh, ww, bb: F.cross_entropy((hh[:m] @ ww.T).float(), targets[:m], reduction="sum") / n,
                 hidden, weight, None)  # fmt: skip
    ref_m = _grads(lambda hh, ww, bb: linear_cross_entropy(hh[:m], ww, targets[:m], reduction="sum",
                                                           backend="torch") / n, hidden, weight, None,
                   up=torch.float32)  # fmt: skip
    for i, name in enumerate(("loss", "dh", "dW")):
        lo_err = rel_err(low[i][:m] if name == "dh" else low[i], ref_m[i][:m] if name == "dh" else ref_m[i])
        assert rel_err(ours[i], ref[i]) <= 2 * lo_err + 1e-6, name


# --- MGPO loss through the CUDA row kernel: the cases and tolerances of tests/test_mgpo_kernel.py ---


def _mgpo_cuda(c, **kw):
    """(loss, metrics, dh, dW, db) of mgpo_loss(backend="cuda") on the case moved to the GPU, returned on the CPU."""
    import dataclasses

    moved = {f.name: getattr(c, f.name).cuda() for f in dataclasses.fields(c)
             if isinstance(getattr(c, f.name), torch.Tensor)}  # fmt: skip
    loss, metrics, *grads = mk.run(mgpo_loss, dataclasses.replace(c, **moved), backend="cuda", **kw)
    return loss.cpu(), {k: v.cpu() for k, v in metrics.items()}, *[None if g is None else g.cpu() for g in grads]


@pytest.mark.parametrize("case,case_kw,loss_kw", [c[1:] for c in mk.FP32_CASES], ids=[c[0] for c in mk.FP32_CASES])
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_mgpo_fp32_matches_reference(case, case_kw, loss_kw):
    c = mk.make_case(**case, **case_kw)
    errs = mk.errors(_mgpo_cuda(c, num_groups=c.num_groups, **loss_kw), mk.run(mgpo_reference, c, **loss_kw), c)
    assert max(errs.values()) <= mk.FP32_TOL, errs


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_mgpo_bf16_and_chunks(monkeypatch):
    """bf16 within twice plain PyTorch (as the Triton test), and 16-token chunks with a ragged last one in fp32."""
    for _, case_kw, loss_kw in mk.BF16_CASES:
        c = mk.make_case(**mk.BASE, dtype=torch.bfloat16, dim=64, **case_kw)
        ours = _mgpo_cuda(c, num_groups=c.num_groups, **loss_kw)
        ref = mk.run(mgpo_reference, c, up=True, **loss_kw)
        low = mk.run(mgpo_reference, c, eager_low_precision=True, **loss_kw)
        ours_err, low_err = mk.errors(ours, ref, c), mk.errors(low, ref, c)
        bad = {k: (e, low_err[k]) for k, e in ours_err.items() if e > 2 * low_err[k] + 1e-6}
        assert not bad, f"{loss_kw}: (ours, plain bf16) errors: {bad}"
    c = mk.make_case([7, 9, 3, 11, 8], [0, 0, 0, 1, 1], [1.0, 0.0, 1.0, 0.0, 1.0], clip=True, rollout=True, ref=True,
                  interleave=True, ignored=(5, 20))  # fmt: skip
    kw = dict(beta=0.1, mgpo_lambda=1.0)
    monkeypatch.setattr(chunked, "chunk_rows", lambda *args, **k: 16)
    errs = mk.errors(_mgpo_cuda(c, num_groups=2, **kw), mk.run(mgpo_reference, c, **kw), c)
    assert max(errs.values()) <= mk.FP32_TOL, errs


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-sum-norm"])
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_mgpo_qwen_head_matches_reference(agg):
    """The Triton GPU test's case (16 sequences, V = 151,936, bf16, TIS, lambda = 1) through backend="cuda"."""
    c = mk.gpu_case()
    kw = dict(aggregation=agg, mgpo_lambda=1.0)
    errs = mk.errors(mk.run(mgpo_loss, c, num_groups=4, backend="cuda", **kw),
                  mk.reference_by_sequences(c, seqs_per_piece=2, **kw), c)  # fmt: skip
    assert max(errs.values()) <= 4 * mk.U_BF16, errs


# --- backend="auto": the measured table (kernels/lmhead/autoselect.py) ---

ENTRIES = [
    {"gpu": "G", "work": "train", "dtype": "bfloat16", "H": 64, "V": 1000, "N": 1024, "winner": "cuda"},
    {"gpu": "G", "work": "train", "dtype": "bfloat16", "H": 64, "V": 1000, "N": 4096, "winner": "triton"},
    {"gpu": "G", "work": "forward", "dtype": "bfloat16", "H": 64, "V": 1000, "N": 1024, "winner": "cuda"},
]


@pytest.mark.parametrize(
    "work,gpu,dtype,n,want",
    [
        ("train", "G", torch.bfloat16, 1500, "cuda"),  # log2: 1500 is nearer 1024 than 4096
        ("train", "G", torch.bfloat16, 2048, "cuda"),  # a tie on the log scale goes to the smaller N
        ("train", "G", torch.bfloat16, 3000, "triton"),
        ("train", "G", torch.bfloat16, 10**6, "triton"),
        ("forward", "G", torch.bfloat16, 10**6, "cuda"),
        ("mgpo", "G", torch.bfloat16, 1024, "triton"),  # no entry for this work
        ("train", "other GPU", torch.bfloat16, 1024, "triton"),
        ("train", "G", torch.float16, 1024, "triton"),
    ],
)
def test_auto_table_rule(work, gpu, dtype, n, want):
    assert autoselect.choose(work, gpu, dtype, n, 64, 1000, entries=ENTRIES) == want
    assert autoselect.choose(work, gpu, dtype, n, 64, 999, entries=ENTRIES) == "triton"  # another shape


def test_auto_resolution_on_cuda_and_cpu_devices(monkeypatch):
    from vibeperf.kernels.lmhead import resolve_backend

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, auto=lambda: "cuda") == "cuda"
    assert resolve_backend("auto", cuda, auto=None) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", torch.device("cpu"), auto=lambda: "cuda") == "torch"
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)  # no CUDA part: never "cuda", whatever the table says
    hidden, weight, _, _ = make_case(4, 10, 8, torch.float32)
    assert autoselect.auto_backend("train", hidden, weight) == "triton"
    with pytest.raises(ValueError, match="work must be one of"):
        autoselect.choose("backward", "G", torch.bfloat16, 1, 1, 1, entries=ENTRIES)


def test_backend_table_margin_and_committed_table_is_current():
    from benchmarks import backend_table

    def row(impl, n, ms, ok=True):
        return {"id": "B2", "impl": impl, "n_tokens": n, "ms": ms, "correct": ok}

    doc = {"_file": "x.json", "machine": {"gpu": "G", "date": "2026-01-01"}, "results": [
        row("vibeperf-triton", 8, 100.0), row("vibeperf-cuda", 8, 96.0),  # 4% faster: cuda
        row("vibeperf-triton", 16, 100.0), row("vibeperf-cuda", 16, 98.0),  # 2%: within the margin, triton
        row("vibeperf-triton", 32, 100.0), row("vibeperf-cuda", 32, None, ok=False),  # cuda wrong: no entry
    ]}  # fmt: skip
    entries = backend_table.build_table([doc])["entries"]
    assert [(e["work"], e["N"], e["winner"]) for e in entries] == [("train", 8, "cuda"), ("train", 16, "triton")]
    assert backend_table.main(["--check"]) == 0, "run `python -m benchmarks.backend_table`"

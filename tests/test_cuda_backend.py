"""backend="cuda" (vibeperf._C: cuBLASLt GEMMs + the CUDA row kernel): what only that backend has.

The cases every backend shares run as the "cuda" parameter of the backend-parametrised tests in
tests/test_linear_logprob.py (forward, cross-entropy, recompute backward, all rows ignored, opcheck) and
tests/test_mgpo_kernel.py (fp32, bf16, chunks, the Qwen head). Here: the clear errors without the extension or
CUDA tensors (on the CPU too), the C++ argument checks, any chunk size against the plain-torch engine, the full
Qwen2.5 head (V = 151,936) against torch and Triton, and the measured table behind backend="auto". `-m gpu` runs the
GPU ones, with the same precision-derived tolerances as tests/test_linear_logprob.py (its helpers are reused).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_cuda_ext, on_backend
from test_linear_logprob import (
    GPU_H,
    GPU_V,
    _gpu_inputs,
    _grads,
    _torch_low_precision_logprob,
    make_case,
    rel_err,
)
from vibeperf.kernels import linear_cross_entropy, linear_logprob, mgpo_loss
from vibeperf.kernels.lmhead import autoselect, chunked, cuda_backend, triton_rows

from vibeperf import _ext


def _cuda(*tensors):
    return on_backend("cuda", *tensors)


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


def test_dw_accumulation_in_the_weight_dtype_keeps_gradients_off_the_cuda_engine(monkeypatch):
    """$VIBEPERF_LMHEAD_DW_ACC=weight: the CUDA engine sums dW in fp32 only, so "auto" takes "triton" for gradients
    (whatever the table says; the forward keeps the table's pick) and an explicit "cuda" with a bf16 dW refuses."""
    from vibeperf.kernels import lmhead

    hidden, weight, targets, _ = make_case(4, 10, 8, torch.bfloat16)
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", True)
    monkeypatch.setattr(autoselect, "choose", lambda *a, **k: "cuda")
    monkeypatch.setattr(autoselect, "_gpu_name", lambda index: "G")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert autoselect.auto_backend("train", hidden, weight) == "cuda"
    monkeypatch.setenv("VIBEPERF_LMHEAD_DW_ACC", "weight")
    assert [autoselect.auto_backend(w, hidden, weight) for w in autoselect.WORKS] == ["cuda", "triton", "triton"]
    engine = lmhead.chunked_engine("cuda")
    with pytest.raises(ValueError, match="^VIBEPERF_LMHEAD_DW_ACC=weight: backend='cuda' accumulates dW in fp32"):
        engine(hidden, weight, targets, None, temperature=1.0, ignore_index=-100, loss=1, g_logp=None)


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

"""Where the LM-head time goes: per-pass timings and forward-variant sweep (GPU only).

    python -m vibeperf.bench.lmhead_passes [--n 65536] [--train-only | --chunks C ...] [--head qwen llama3]

Prints, for the Qwen2.5-3B head (H = 2048, V = 151,936, bf16): the fused Triton forward (and its autotuned
config), the L2-tiled forward at several tile shapes, and the chunked training path split into its passes
(head GEMM, row epilogue, dh GEMM, fp32 dW accumulation). Every variant is checked against the fp32 reference.
`--train-only` runs only `train_sweep`: the training path's passes and engine variants (the head GEMM with the
softmax statistics in its epilogue, or cuBLAS's; dz written by a row pass, or the scaled form: P stored by the head
GEMM, dz = alpha P per row) against three bare GEMMs, for each `--head` (qwen: H 2,048,
V 151,936; llama3: H 4,096, V 128,256); each variant is checked against the cuBLAS path.
`--configs` runs only `config_sweep`: each candidate tile config of the fused head GEMM timed alone, as training and
as scoring run it.
`--chunks 1664 2048 4096` runs only `chunk_sweep`: the CE forward + backward with the engine's chunk forced to each
size (time against three bare GEMMs and Liger's loss of the same run, peak extra memory, outputs against the
default call), the measurement behind `chunked.CHUNK_ALIGN` and the default workspace.
The whole-op comparisons of both sweeps (and their floor) are timed together in ROUNDS interleaved rounds
(`common.interleaved_ms`), so a drift of the GPU's clocks during the run does not decide a comparison.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from vibeperf.kernels import linear_cross_entropy, linear_logprob
from vibeperf.kernels.lmhead import chunked, scoring_fwd, settings, triton_fwd, triton_gemm, triton_rows

from .common import do_bench_ms, interleaved_ms, peak_matmul_tflops, relative_error
from .registry import LLAMA3_H, LLAMA3_V, TOL, H, V, head_inputs, with_env

HEADS = {"qwen": (H, V), "llama3": (LLAMA3_H, LLAMA3_V)}
ROUNDS = 10  # interleaved rounds (`common.interleaved_ms`) of the whole-op comparisons


@contextlib.contextmanager
def engine_settings(**values):
    """chunked.py's module settings (HEAD_GEMM) set for the block, restored after it."""
    old = {name: getattr(chunked, name) for name in values}
    for name, value in values.items():
        setattr(chunked, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(chunked, name, value)


def with_settings(fn, **values):
    """fn as a callable that runs under `engine_settings(**values)` each time it is called."""

    def run():
        with engine_settings(**values):
            return fn()

    return run


def train_sweep(n: int, h_size: int, vocab: int, peak: float) -> None:
    """Per-pass times of one chunk (scaled to all chunks) and the whole CE fwd+bwd under each engine variant."""
    x = head_inputs(n, hidden_size=h_size, vocab=vocab)
    h, w, t = x["hidden"], x["weight"], x["targets"]
    tag = f"N={n:6d} H={h_size} V={vocab}"
    frac = lambda ms, passes: passes * 2 * n * h_size * vocab / (ms * 1e-3) / 1e12 / peak
    c = chunked.chunk_rows(n, vocab, 2, dw_hidden=h_size)
    per = n / c
    z = torch.empty((c, vocab), device="cuda", dtype=torch.bfloat16)
    hc, tc = h[:c], t[:c]
    g = torch.full((c,), 1.0 / n, device="cuda")
    torch.mm(hc, w.T, out=z)
    stats = triton_rows.lmhead_row_grad(z, tc, None, g, None, 1.0, -100, 1, True, phase=triton_rows.PHASE_STATS)
    part = triton_gemm.head_gemm_stats(hc, w, z, 1.0, True)
    mref = triton_rows.target_logits(hc, w, tc, 1.0, -100)
    merged = triton_rows.lmhead_row_grad(z, tc, None, g, None, 1.0, -100, 1, True, phase=triton_rows.PHASE_STATS,
                                         partials=part)  # fmt: skip
    err = max(relative_error(a, b) for a, b in zip(merged, stats))
    print(f"{tag} chunk {c} rows x {per:.1f}; statistics from the GEMM epilogue's partials vs the row pass: rel err "
          f"{err:.1e}{'' if err <= 1e-5 else '  WRONG'}  ({triton_gemm.CONFIG})")
    passes = [
        ("head GEMM (cuBLAS)", lambda: torch.mm(hc, w.T, out=z), 1),
        ("head GEMM + stats epilogue (triton)", lambda: triton_gemm.head_gemm_stats(hc, w, z, 1.0, False), 1),
        ("head GEMM + stats epilogue + entropy", lambda: triton_gemm.head_gemm_stats(hc, w, z, 1.0, True), 1),
        ("row kernel (2 reads + 1 write)", lambda: triton_rows.lmhead_row_grad(
            z, tc, None, g, None, 1.0, -100, 1, False), -3),
        ("row kernel from partials (1 + 1)", lambda: triton_rows.lmhead_row_grad(
            z, tc, None, g, None, 1.0, -100, 1, False, partials=part), -2),
        ("head GEMM + stats, P stored (scaled dz)", lambda: triton_gemm.head_gemm_stats(hc, w, z, 1.0, False,
                                                                                        mref=mref), 1),
        ("dh GEMM, fp32 out (scaled dz)", lambda: chunked._mm_fp32(z, w), 1),
    ]
    dh = torch.empty_like(hc)
    dw32 = torch.zeros((vocab, h_size), device="cuda", dtype=torch.float32)
    passes += [("dh GEMM", lambda: torch.mm(z, w, out=dh), 1),
               ("dW fp32 accumulate", lambda: chunked._accumulate_fp32(dw32, z.T, hc), 1)]
    for name, fn, fl in passes:
        ms = do_bench_ms(fn, rep_ms=200)
        extra = f"{fl * 2 * c * h_size * vocab / (ms * 1e-3) / 1e12 / peak:.3f} of peak" if fl > 0 else \
            f"{-fl * c * vocab * 2 / (ms * 1e-3) / 1e12:.2f} TB/s ({-fl} passes of the chunk)"  # fmt: skip
        print(f"{tag} {name:<40} {ms * per:8.2f} ms  {extra}", flush=True)
    z = dw32 = dh = passes = part = None  # free the chunk buffers before the whole-op runs
    xg = head_inputs(n, grad=True, hidden_size=h_size, vocab=vocab)
    grads = lambda: torch.autograd.grad(linear_cross_entropy(xg["hidden"], xg["weight"], xg["targets"]),
                                        [xg["hidden"], xg["weight"]])  # fmt: skip
    with engine_settings(HEAD_GEMM="cublas"):
        ref = grads()
    variants, errs = {}, {}
    for head_gemm, form in (("cublas", "rows"), ("triton", "rows"), ("triton", "scaled")):
        name = f"CE fwd+bwd head GEMM {head_gemm}, dz {form}"
        variants[name] = run = with_settings(with_env(settings.GRAD_ENV, form)(grads), HEAD_GEMM=head_gemm)
        errs[name] = max(relative_error(a.float(), b.float()) for a, b in zip(run(), ref))
    if n * vocab * 2 * 2 < 40 * 2**30:  # the floor's full logits fit beside everything else
        variants["three bare GEMMs (floor)"] = floor_call(h, w)
    for name, ms in interleaved_ms(variants, rounds=ROUNDS).items():
        check = f"  vs cublas {errs[name]:.1e}{'' if errs[name] <= 1e-2 else '  WRONG'}" if name in errs else ""
        print(f"{tag} {name:<51} {ms:8.2f} ms  {frac(ms, 3):.3f} of peak{check}", flush=True)


def config_sweep(n: int, h_size: int, vocab: int, peak: float) -> None:
    """Every candidate config of the fused head GEMM (`triton_gemm.CANDIDATES`; the first is the one calls run), on
    one chunk of the default's size: as the training path runs it (P stored, the scaled form) and as the scoring
    forward does (nothing stored: the targets' logits and entropy's partials), each timed alone and checked against
    the first; cuBLAS's bare head GEMM of the chunk beside them."""
    x = head_inputs(n, hidden_size=h_size, vocab=vocab)
    h, w, t = x["hidden"], x["weight"], x["targets"]
    tag = f"N={n:6d} H={h_size} V={vocab}"
    c = chunked.chunk_rows(n, vocab, 2, dw_hidden=h_size)
    hc, tc = h[:c], t[:c]
    z = torch.empty((c, vocab), device="cuda", dtype=torch.bfloat16)
    mref = triton_rows.target_logits(hc, w, tc, 1.0, -100)
    tz = torch.zeros(c, device="cuda", dtype=torch.float32)
    uses = {  # name: (call, tolerance of its output against the first config's: a bf16 ulp for P, else fp32's)
        "P stored": (lambda cfg: (triton_gemm.head_gemm_stats(hc, w, z, 1.0, False, mref=mref, config=cfg), z),
                     2.0**-7),
        "scoring + entropy": (lambda cfg: (triton_gemm.head_gemm_stats(hc, w, None, 1.0, True, tc, tz, config=cfg),
                                           tz), 1e-5),
    }  # fmt: skip
    fl = 2 * c * h_size * vocab
    ms = do_bench_ms(lambda: torch.mm(hc, w.T, out=z), rep_ms=200)
    print(f"{tag} chunk {c}: cuBLAS head GEMM {ms:.3f} ms  {fl / (ms * 1e-3) / 1e12 / peak:.3f} of peak", flush=True)
    for use, (fn, tol) in uses.items():
        ref = None
        for cfg in triton_gemm.CANDIDATES:
            part, out = fn(cfg)
            if ref is None:
                ref = part.clone(), out.clone()
            # P / the targets' logits always; the fp32 partials where the tiles agree (BN)
            err = relative_error(out.float(), ref[1].float())
            err_part = relative_error(part[:2], ref[0][:2]) if part.shape == ref[0].shape else 0.0
            ms = do_bench_ms(lambda cfg=cfg: fn(cfg), rep_ms=200)
            print(f"{tag} {use:<18} {cfg.kwargs} w={cfg.num_warps} s={cfg.num_stages}: {ms:.3f} ms  "
                  f"{fl / (ms * 1e-3) / 1e12 / peak:.3f} of peak  vs the first {err:.1e} / partials {err_part:.1e}"
                  f"{'' if err <= tol and err_part <= 1e-5 else '  WRONG'}", flush=True)  # fmt: skip


def floor_call(h: torch.Tensor, w: torch.Tensor):
    """The yardstick: three bare GEMMs of the head's shapes (z = h W^T, z W, z^T h), with full [N, V] logits (held
    by the returned callable)."""
    h, w = h.detach(), w.detach()
    zf = torch.empty((h.shape[0], w.shape[0]), device=h.device, dtype=h.dtype)

    def floor():
        torch.mm(h, w.T, out=zf)
        torch.mm(zf, w)
        torch.mm(zf.T, h)

    return floor


def chunk_sweep(n: int, h_size: int, vocab: int, chunks: list[int]) -> None:
    """The CE forward + backward (mean over non-ignored tokens, dh and dW) with the chunk forced to each size."""
    x = head_inputs(n, grad=True, hidden_size=h_size, vocab=vocab)
    h, w, t = x["hidden"], x["weight"], x["targets"]
    hd, wd = h.detach(), w.detach()
    tag = f"N={n:6d} H={h_size} V={vocab}"
    valid = (t != -100).float()
    g = valid / valid.sum()

    def ours(chunk=None):
        if chunk is None:
            return torch.autograd.grad(linear_cross_entropy(h, w, t), [h, w])
        out = chunked.lmhead_chunked(hd, wd, t, None, temperature=1.0, ignore_index=-100, loss=triton_rows.LOSS_NLL,
                                     g_logp=g, chunk=chunk)  # fmt: skip
        return out[3], out[4]

    def extra_gib(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30

    ref = ours()
    rows = {f"default (chunk {chunked.chunk_rows(n, vocab, 2, dw_hidden=h_size)})": ours}
    rows.update({f"chunk {c:5d} ({n / c:5.1f} chunks)": (lambda c=c: ours(c)) for c in chunks if c <= n})
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger

        rows["Liger-Kernel"] = lambda: torch.autograd.grad(liger(h, w, t), [h, w])
    except ImportError as exc:
        print(f"{tag} Liger-Kernel not run: {exc}")
    checked = {}
    for name, fn in rows.items():
        err = max(relative_error(a.float(), b.float()) for a, b in zip(fn(), ref))
        checked[name] = (err, extra_gib(fn))
    ms = interleaved_ms({"floor": floor_call(h, w), **rows}, rounds=ROUNDS)  # the floor's logits are held from here
    fl = ms.pop("floor")
    print(f"{tag} three bare GEMMs (floor) {fl:.2f} ms  (medians of {ROUNDS} interleaved rounds)", flush=True)
    for name, (err, extra) in checked.items():
        print(f"{tag} {name:<26} {ms[name]:8.2f} ms  {ms[name] / fl:.3f}x floor  extra {extra:.2f} GiB  vs default "
              f"{err:.1e}{'' if err <= 1e-2 else '  WRONG'}", flush=True)  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--train-only", action="store_true", help="only the training path's sweep (train_sweep)")
    ap.add_argument("--head", nargs="+", choices=sorted(HEADS), default=["qwen"])
    ap.add_argument("--chunks", type=int, nargs="+", help="only the chunk-size sweep (chunk_sweep) at these sizes")
    ap.add_argument("--configs", action="store_true", help="only the fused head GEMM's configs (config_sweep)")
    args = ap.parse_args(argv)
    if args.chunks:
        for head in args.head:
            for n in args.n:
                chunk_sweep(n, *HEADS[head], args.chunks)
                torch.cuda.empty_cache()
        return
    peak = peak_matmul_tflops()
    print(f"peak {peak:.1f} TFLOP/s")
    if args.train_only or args.configs:
        sweep = config_sweep if args.configs else train_sweep
        for head in args.head:
            for n in args.n:
                sweep(n, *HEADS[head], peak)
                torch.cuda.empty_cache()
        return
    for n in args.n:
        x = head_inputs(n)
        h, w, t = x["hidden"], x["weight"], x["targets"]
        ref = linear_logprob(h.float(), w.float(), t, backend="torch")
        frac = lambda ms, passes=1: passes * 2 * n * H * V / (ms * 1e-3) / 1e12 / peak

        def report(name, fn, passes=1):
            out = fn()
            err = relative_error(out[0] if isinstance(out, tuple) else out, ref) if out is not None else 0.0
            ms = do_bench_ms(fn, rep_ms=300)
            print(f"N={n:6d} {name:<34} {ms:8.2f} ms  {frac(ms, passes):.3f} of peak  err {err:.1e}"
                  f"{'' if err <= TOL else '  WRONG'}", flush=True)  # fmt: skip

        report("fused triton fwd", lambda: triton_fwd.linear_logprob_fwd(h, w, t, None, 1.0, -100, False))
        print("   best config:", triton_fwd.linear_logprob_fwd_kernel.best_config)
        for splits in (4, 8, 32):
            report(f"fused triton fwd splits={splits}",
                   lambda: triton_fwd.linear_logprob_fwd(h, w, t, None, 1.0, -100, False, splits=splits))
        for tile, br, nw in (((8192, 2048), 4, 8), ((8192, 2048), 1, 4), ((8192, 2048), 2, 4), ((8192, 2048), 8, 4),
                             ((8192, 2048), 16, 8), ((16384, 2048), 2, 4), ((16384, 1024), 4, 4)):
            report(f"tiled fwd {tile} r={br} w={nw}", lambda: scoring_fwd.linear_logprob_tiled_fwd(
                h, w, t, None, 1.0, -100, False, tile=tile, block_r=br, num_warps=nw))
        for chunk, nw, bv in ((1024, 4, 1024), (2048, 4, 1024), (4096, 4, 1024), (8192, 4, 1024), (4096, 2, 1024),
                              (4096, 4, 2048), (4096, 8, 1024)):
            report(f"rowchunk fwd c={chunk} w={nw} bv={bv}", lambda: scoring_fwd.linear_logprob_chunked_fwd(
                h, w, t, None, 1.0, -100, False, chunk=chunk, num_warps=nw, block_v=bv))
        report("head GEMM only (bf16 out)", lambda: (h @ w.T, None)[1])
        ws = torch.empty(8192 * 2048, device="cuda", dtype=torch.bfloat16).view(8192, 2048)
        report("tiled GEMMs only (8192, 2048)", lambda: [torch.mm(h[i : i + 8192], w[j : j + 2048].T,
                                                                    out=ws[: min(8192, n - i), : min(2048, V - j)])
                                                           for i in range(0, n, 8192) for j in range(0, V, 2048)]
               and None)

        c = chunked.chunk_rows(n, V, 2)
        z = torch.empty((c, V), device="cuda", dtype=torch.bfloat16)
        hc = h[:c]
        g = torch.full((c,), 1.0 / n, device="cuda")
        dh = torch.empty_like(hc)
        dw32 = torch.zeros((V, H), device="cuda", dtype=torch.float32)
        per = n / c
        for name, fn, fl in [
            ("chunk: head GEMM", lambda: torch.mm(hc, w.T, out=z), 1),
            ("chunk: row epilogue", lambda: triton_rows.lmhead_row_grad(z, t[:c], None, g, None, 1.0, -100, 1, False),
             0),

            ("chunk: dh GEMM", lambda: torch.mm(z, w, out=dh), 1),
            ("chunk: dW fp32 accumulate", lambda: chunked._accumulate_fp32(dw32, z.T, hc), 1),
        ]:
            ms = do_bench_ms(fn, rep_ms=200)
            extra = f"{fl * 2 * c * H * V / (ms * 1e-3) / 1e12 / peak:.3f} of peak" if fl else \
                f"{3 * c * V * 2 / (ms * 1e-3) / 1e12:.2f} TB/s (2 reads + 1 write)"  # fmt: skip
            print(f"N={n:6d} {name:<34} {ms * per:8.2f} ms  ({c} rows/chunk x {per:.1f})  {extra}", flush=True)
        print("   in-place fp32 addmm available:", chunked._DTYPE_OUT_ADDMM)
        xg = head_inputs(n, grad=True)
        fn = lambda: torch.autograd.grad(linear_cross_entropy(xg["hidden"], xg["weight"], xg["targets"]),
                                         [xg["hidden"], xg["weight"]])  # fmt: skip
        ms = do_bench_ms(fn, rep_ms=600)
        print(f"N={n:6d} {'CE fwd+bwd total':<34} {ms:8.2f} ms  {frac(ms, 3):.3f} of peak", flush=True)


if __name__ == "__main__":
    main()

"""Where the LM-head time goes: per-pass timings and forward-variant sweep (GPU only).

    python -m vibeperf.bench.lmhead_passes [--n 65536]

Prints, for the Qwen2.5-3B head (H = 2048, V = 151,936, bf16): the fused Triton forward (and its autotuned
config), the L2-tiled forward at several tile shapes, and the chunked training path split into its passes
(head GEMM, row epilogue, dh GEMM, fp32 dW accumulation). Every variant is checked against the fp32 reference.
"""

from __future__ import annotations

import argparse

import torch

from vibeperf.kernels import linear_cross_entropy, linear_logprob
from vibeperf.kernels.lmhead import chunked, scoring_fwd, triton_fwd, triton_rows

from .common import do_bench_ms, peak_matmul_tflops, relative_error
from .registry import TOL, H, V, head_inputs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 65536])
    args = ap.parse_args(argv)
    peak = peak_matmul_tflops()
    print(f"peak {peak:.1f} TFLOP/s")
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

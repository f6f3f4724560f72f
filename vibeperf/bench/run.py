"""Registry-driven benchmark runner.

    python -m vibeperf.bench.run --only B1,B2 [--sizes 8192,32768,65536] [--quick] [--tag NAME]

For every benchmark id and token count: inputs are built outside the timed region (random weights of the
Qwen2.5-3B LM head: H = 2048, V = 151,936, bf16), every implementation is run once and checked against an fp32
reference (a wrong result is reported and never timed), warmed up (autotuning included), then timed with
triton.testing.do_bench medians. The peak is a plain 8192^3 bf16 matmul measured in the same run. A short table is
printed last and the full JSON goes to <results dir>/<gpu>_<date>.json
(`common.results_dir()`: benchmarks/results/ in a source checkout, else ./vibeperf-results/).
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from . import registry
from .common import Row, do_bench_ms, extra_memory_gib, format_table, peak_matmul_tflops, write_results


def run_case(bench: registry.Benchmark, n: int, peak: float, quick: bool) -> list[Row]:
    rows = []
    inputs = bench.make_inputs(n)
    ref = bench.reference(inputs)
    for impl_name, impl in bench.impls.items():
        skip = impl.skip(n) if impl.skip else None
        if skip:
            rows.append(Row(bench.id, impl_name, n, None, None, None, False, f"not run: {skip}"))
            continue
        try:
            out, mem = extra_memory_gib(lambda: impl.fn(inputs))
            ok, err_note = bench.check(out, ref)
            del out
        except torch.OutOfMemoryError:
            rows.append(Row(bench.id, impl_name, n, None, None, None, False, "out of memory"))
            gc.collect()
            torch.cuda.empty_cache()
            continue
        if not ok:
            rows.append(Row(bench.id, impl_name, n, None, None, mem, False, f"WRONG: {err_note}"))
            continue
        ms = do_bench_ms(lambda: impl.fn(inputs), rep_ms=200 if quick else bench.rep_ms, warmup_ms=50)
        frac = bench.flops(n) / (ms * 1e-3) / 1e12 / peak
        rows.append(Row(bench.id, impl_name, n, ms, frac, mem, True, err_note))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(registry.BENCHMARKS), help="comma-separated ids, e.g. B1,B2")
    ap.add_argument("--sizes", default=None, help="comma-separated token counts (default: each benchmark's own)")
    ap.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    ap.add_argument("--tag", default=None, help="suffix of the results file name")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    peak = peak_matmul_tflops()
    print(f"peak bf16 matmul (8192^3): {peak:.1f} TFLOP/s", flush=True)
    rows: list[Row] = []
    for bid in args.only.split(","):
        bench = registry.BENCHMARKS[bid]
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else bench.sizes
        for n in sizes:
            rows += run_case(bench, n, peak, args.quick)
    path = write_results(rows, peak, args.tag)
    print(f"\nresults: {path}\npeak {peak:.1f} TFLOP/s\n" + format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

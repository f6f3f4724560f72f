"""B6: CLR aggregation of 4,096 queries x 32 candidates x 5 claims, vectorised vs a plain Python loop.

    python -m vibeperf.bench.b6_clr [--queries 4096] [--no-write]

Checks the vectorised result against the Python reference first, then times: the reference loop (CPU), the
vectorised aggregator on the CPU, and on the GPU when there is one (CUDA-event medians via do_bench). Target:
>= 100x the Python loop and < 1 ms on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vibeperf.clr import clr_aggregate
from vibeperf.reference import clr_aggregate_reference

from .common import Row, format_table, write_results


def _wall_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write a results file")
    args = ap.parse_args(argv)
    q, k, m = args.queries, 32, 5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (q, k), generator=g)
    verdicts = torch.randint(0, 2, (q, k, m), generator=g).double()
    ref, _ = clr_aggregate_reference(ids, verdicts)
    rows = []
    loop_ms = _wall_ms(lambda: clr_aggregate_reference(ids, verdicts), reps=3)
    rows.append(Row("B6", "python-loop", q, loop_ms, None, None, True, "plain Python reference, CPU"))
    cpu_ok = torch.equal(clr_aggregate(ids, verdicts).chosen, ref)
    cpu_ms = _wall_ms(lambda: clr_aggregate(ids, verdicts), reps=20) if cpu_ok else None
    rows.append(Row("B6", "vibeperf-cpu", q, cpu_ms, None, None, cpu_ok,
                    f"{loop_ms / cpu_ms:.0f}x the loop" if cpu_ok else "WRONG"))  # fmt: skip
    if torch.cuda.is_available():
        from .common import do_bench_ms

        ids_d, v_d = ids.cuda(), verdicts.cuda()
        ok = torch.equal(clr_aggregate(ids_d, v_d).chosen.cpu(), ref)
        ms = do_bench_ms(lambda: clr_aggregate(ids_d, v_d), rep_ms=200) if ok else None
        rows.append(Row("B6", "vibeperf-gpu", q, ms, None, None, ok,
                        f"{loop_ms / ms:.0f}x the loop" if ok else "WRONG"))  # fmt: skip
    print(format_table(rows))
    if not args.no_write and torch.cuda.is_available():
        print("results:", write_results(rows, peak=None, tag="B6"))


if __name__ == "__main__":
    main()

"""Does the timing method decide a comparison? The rows of a benchmark timed two ways in one run (GPU only).

    python -m vibeperf.bench.timing_modes [--cases B2:8192 B2-llama3:4096 ...] [--impls vibeperf-triton liger floor]

1. one after another: each implementation in a block of its own (`common.do_bench_ms`, rep_ms of calls), twice
   over, as the committed floors were first measured;
2. interleaved: all together in rotating rounds (`common.interleaved_ms`), as `vibeperf bench` times them now.
Every implementation is first checked against the benchmark's reference (a wrong one is not timed). With
nvidia-smi on the PATH its log of SM clock and board power (every 100 ms) is taken beside the run and averaged over
each block: a GPU held at its power cap runs each block at the clock that block's own power draw allows, while
interleaved calls, each shorter than the power controller's reaction, all run at the clock of their mix.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from . import registry
from .common import do_bench_ms, interleaved_ms

SMI_FIELDS = "timestamp,clocks.sm,power.draw"
STAMP = "%Y/%m/%d %H:%M:%S.%f"  # nvidia-smi's timestamp format


def parse_smi_log(text: str) -> list[tuple[datetime.datetime, float, float]]:
    """(time, SM MHz, W) per line of `nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader`;
    a line that is not such a sample (a header, an [N/A]) is skipped."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            samples.append((datetime.datetime.strptime(parts[0], STAMP), float(parts[1].split()[0]),
                            float(parts[2].split()[0])))  # fmt: skip
        except ValueError:
            continue
    return samples


def block_means(samples, start: datetime.datetime, end: datetime.datetime) -> tuple[float, float] | None:
    """Mean SM clock (MHz) and power (W) of the samples within [start, end]; None when there are none."""
    inside = [(mhz, w) for t, mhz, w in samples if start <= t <= end]
    if not inside:
        return None
    return sum(m for m, _ in inside) / len(inside), sum(w for _, w in inside) / len(inside)


@contextlib.contextmanager
def clock_log():
    """Yields a callable returning the samples so far (empty without nvidia-smi); the logger stops after the block."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        yield lambda: []
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smi.csv"
        with path.open("w") as out:
            proc = subprocess.Popen([smi, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader", "-lms", "100"],
                                    stdout=out, stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                yield lambda: parse_smi_log(path.read_text())
            finally:
                proc.terminate()
                proc.wait()


def compare_case(key: str, n: int, impls: list[str], rep_ms: float, samples) -> None:
    """Checks, then times `impls` of benchmark `key` at n tokens both ways; prints each block and a RESULT line per way
    (the first impl's time over each other one's)."""
    bench = registry.BENCHMARKS[key]
    x = bench.make_inputs(n)
    ref = bench.reference(x)
    fns = {}
    for name in impls:
        skip = bench.impls[name].skip(n) if bench.impls[name].skip else None
        if skip:  # as `vibeperf bench` reports it (a baseline not installed, a size it does not run)
            print(f"{key} N={n} {name}: not run: {skip}", flush=True)
            continue
        ok, note = bench.check(bench.impls[name].fn(x), ref)
        print(f"{key} N={n} {name}: {'checked' if ok else 'WRONG, not timed'} ({note})", flush=True)
        if ok:
            fns[name] = lambda f=bench.impls[name].fn: f(x)
    if not fns:
        return
    blocks = []  # (label, start, end)
    seq = {name: [] for name in fns}
    for rep in range(2):
        for name, fn in fns.items():
            t0 = datetime.datetime.now()
            seq[name].append(do_bench_ms(fn, rep_ms=rep_ms))
            blocks.append((f"one after another #{rep + 1}: {name} {seq[name][-1]:.2f} ms", t0, datetime.datetime.now()))
    t0 = datetime.datetime.now()
    inter = interleaved_ms(fns, rounds=5, rep_ms=rep_ms)
    blocks.append(("interleaved: " + ", ".join(f"{k} {v:.2f} ms" for k, v in inter.items()), t0,
                   datetime.datetime.now()))  # fmt: skip
    log = samples()
    for label, start, end in blocks:
        means = block_means(log, start, end)
        clocks = f"  (SM {means[0]:.0f} MHz, {means[1]:.0f} W)" if means else ""
        print(f"{key} N={n} {label}{clocks}", flush=True)
    first, *others = list(fns)
    seq_ms = {k: sum(v) / len(v) for k, v in seq.items()}
    for way, ms in (("one after another", seq_ms), ("interleaved", inter)):
        ratios = "  ".join(f"{first} / {k} {ms[first] / ms[k]:.3f}" for k in others)
        print(f"RESULT {key} N={n} {way}: {ratios}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["B2:8192", "B2-llama3:4096", "B2:65536"],
                    help="benchmark:tokens")  # fmt: skip
    ap.add_argument("--impls", nargs="+", default=["vibeperf-triton", "liger", "floor"],
                    help="the first is compared with each other one")  # fmt: skip
    ap.add_argument("--rep-ms", type=float, default=1500.0)
    args = ap.parse_args(argv)
    cases = []
    for case in args.cases:
        key, _, n = case.partition(":")
        if key not in registry.BENCHMARKS or not n.isdigit():
            known = ", ".join(registry.BENCHMARKS)
            raise SystemExit(f"--cases: {case!r} is not <benchmark>:<tokens> (benchmarks: {known})")
        unknown = [i for i in args.impls if i not in registry.BENCHMARKS[key].impls]
        if unknown:
            raise SystemExit(f"--impls: {key} has no {', '.join(unknown)}")
        cases.append((key, int(n)))
    if not torch.cuda.is_available():
        raise SystemExit("timing_modes needs a CUDA GPU")
    with clock_log() as samples:
        for key, n in cases:
            compare_case(key, n, args.impls, args.rep_ms, samples)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

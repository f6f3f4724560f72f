"""Shared pieces of the benchmark suite: machine tags, the peak matmul, timing, memory and result rows."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def results_dir() -> Path:
    """Where results JSON goes by default: $VIBEPERF_RESULTS_DIR, else the checkout's committed `benchmarks/results/`
    when this package runs from a source checkout, else `vibeperf-results/` in the current directory."""
    if os.environ.get("VIBEPERF_RESULTS_DIR"):
        return Path(os.environ["VIBEPERF_RESULTS_DIR"])
    checkout = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    return checkout if checkout.is_dir() else Path.cwd() / "vibeperf-results"


def machine_info() -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or "unknown"  # fmt: skip
    except OSError:
        commit = "unknown"
    commit = os.environ.get("VIBEPERF_COMMIT", commit)
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }


def do_bench_ms(fn, *, rep_ms: float = 400.0, warmup_ms: float = 100.0, slow_ms: float = 1000.0) -> float:
    """Median time of fn() in ms on the GPU (events; triton's do_bench clears L2 between runs).

    A function slower than slow_ms per call (one call, timed after a warm-up call) is timed by the median of three
    more calls instead: do_bench would run it at least eight times (five of them for its own estimate)."""
    import triton.testing

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) > slow_ms:
        times = []
        for _ in range(3):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return float(sorted(times)[1])
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def cpu_bench_ms(fn, *, rep_ms: float = 400.0, warmup_ms: float = 100.0) -> float:
    """Median wall time of fn() in ms on the CPU (perf_counter), over about rep_ms of calls and at least 5."""
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], device: str = "cuda", *, rounds: int = 10,
                   rep_ms: float | None = None) -> dict[str, float]:  # fmt: skip
    """Median ms per call of each of `fns`, timed in rounds that call every one once, in an order shuffled anew each
    round (seeded), after one warm-up round. A drift of the clocks or the temperature during the run then falls on all
    of them alike, which timing them one after another does not give (on the H200 two timings of the same op, one
    after the other, have differed by 4%). The order is shuffled because a call starts at the clock its predecessor
    left: on a GPU at its power cap, after a low-power call (Liger's loss at 8K tokens, ~1,850 MHz on the H200) faster
    than after three bare GEMMs (~1,420 MHz); the rotation used before (A B C, B C A, ...) gave every function the same
    predecessor in every round (B2's floor always followed Liger's loss: benchmarks/NOTES.md). `rounds` is the least
    number of rounds; with `rep_ms`, as many more as give each function about rep_ms of timed calls (the warm-up
    round's time the estimate; at most 1,000). CUDA: a pair of events around each call, the L2 cache cleared before
    it (as triton's do_bench); CPU: perf_counter."""
    names = list(fns)
    if not names or rounds < 1:
        raise ValueError(f"interleaved_ms needs at least one function and one round, got {len(names)} and {rounds}")
    t0 = time.perf_counter()
    for name in names:
        fns[name]()
    if device == "cuda":
        torch.cuda.synchronize()
    if rep_ms is not None:
        round_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        rounds = min(1_000, max(rounds, math.ceil(rep_ms * len(names) / round_ms)))
    times: dict[str, list[float]] = {name: [] for name in names}
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if device == "cuda" else None
    events = []  # CUDA: read after the last round, so the host queues ahead as in training (no sync between calls)
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            if flush is None:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
                continue
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            events.append((name, start, end))
    if events:
        torch.cuda.synchronize()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(v) for name, v in times.items()}


def time_ms(fn, device: str, *, rep_ms: float = 400.0, warmup_ms: float = 100.0) -> float:
    """The median time of fn() in ms: `do_bench_ms` on CUDA, `cpu_bench_ms` on the CPU."""
    bench = do_bench_ms if device == "cuda" else cpu_bench_ms
    return bench(fn, rep_ms=rep_ms, warmup_ms=warmup_ms)


def peak_matmul_tflops(size: int = 8192, device: str = "cuda") -> float:
    """A plain size^3 matmul through torch (bf16 on cuBLAS; fp32 on the CPU, at size 1024): the 'peak' all
    fractions are measured against."""
    size, dtype = (size, torch.bfloat16) if device == "cuda" else (min(size, 1024), torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    time_ms(lambda: a @ b, device, rep_ms=2000 if device == "cuda" else 300)  # let the clocks settle first
    ms = time_ms(lambda: a @ b, device, rep_ms=1000 if device == "cuda" else 300)
    return 2 * size**3 / ms / 1e9


def extra_memory_gib(fn, device: str = "cuda") -> tuple[object, float | None]:
    """Runs fn() once; returns its result and the peak memory it allocated above what was already held (None on
    the CPU, where torch keeps no such count)."""
    if device != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - base) / 2**30


@dataclasses.dataclass
class Row:
    id: str
    impl: str
    n_tokens: int
    ms: float | None
    frac_of_peak: float | None
    extra_mem_gib: float | None
    correct: bool
    note: str = ""
    hidden: int | None = None
    vocab: int | None = None


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (inf when out has a NaN)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def write_results(rows: list[Row], peak: float | None, tag: str | None = None, path: Path | None = None) -> Path:
    info = machine_info()
    if path is None:
        gpu = info["gpu"].replace(" ", "-").replace("/", "-")
        path = results_dir() / f"{gpu}_{info['date']}{'_' + tag if tag else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "peak_tflops": peak, "results": [dataclasses.asdict(r) for r in rows]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def format_table(rows: list[Row]) -> str:
    lines = [f"{'id':<4} {'impl':<16} {'N':>7} {'ms':>9} {'of peak':>8} {'extra GiB':>10} {'ok':>3}  note"]
    for r in rows:
        ms = f"{r.ms:9.2f}" if r.ms is not None else f"{'-':>9}"
        frac = f"{r.frac_of_peak:8.3f}" if r.frac_of_peak is not None else f"{'-':>8}"
        mem = f"{r.extra_mem_gib:10.3f}" if r.extra_mem_gib is not None else f"{'-':>10}"
        ok = "y" if r.correct else "n"
        lines.append(f"{r.id:<4} {r.impl:<16} {r.n_tokens:>7} {ms} {frac} {mem} {ok:>3}  {r.note}")
    return "\n".join(lines)


def write_results_extra(rows: list[Row], peak: float | None, extra: dict, tag: str | None = None) -> Path:
    """`write_results` plus an "extra" section (run settings, per-method details) in the same JSON document."""
    path = write_results(rows, peak, tag)
    doc = json.loads(path.read_text())
    doc["extra"] = extra
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path

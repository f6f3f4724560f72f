"""Registry-driven benchmark runner: `vibeperf bench` (also `python -m vibeperf.bench.run`).

    vibeperf bench --only B1,B2 [--sizes 8192,32768,65536] [--quick] [--save [results.json]]
    vibeperf bench --compare [baseline.json] [--tolerance 5%]

For every benchmark id and token count: inputs are built outside the timed region (random weights of the
Qwen2.5-3B LM head: H = 2048, V = 151,936, bf16; B2-llama3 the Llama-3 head, H = 4,096, V = 128,256), every
implementation is run once and checked against an fp32 reference (a wrong result is reported and never timed),
warmed up (autotuning included), then all of a case's implementations are timed together in interleaved rounds
(`common.interleaved_ms`: medians, the L2 cleared before each call). The peak is a plain 8192^3 bf16
matmul measured in the same run. A short table is printed last and the full JSON goes to --save PATH, else
<results dir>/<gpu>_<date>.json (`common.results_dir()`: benchmarks/results/ in a source checkout, else
./vibeperf-results/; a --compare run only with --save). `--save` with no path saves this GPU's baseline for later
`--compare` runs (`compare.user_baseline_path`). Without a GPU the same runner runs B1 and B2 at a CPU size
(`cpu_cases.py`), timed with perf_counter medians.

--compare reruns the cases of a baseline (a saved run, a floors file, or with no file this GPU's committed floors,
else its saved baseline: `compare.default_baseline`), prints old / new / ratio per case and exits 1 on a regression
(slower than the old time by more than --tolerance, below a floor, or a case that no longer runs correctly).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

import torch

from . import compare
from .common import Row, extra_memory_gib, format_table, interleaved_ms, peak_matmul_tflops, write_results


def benchmarks(device: str) -> dict:
    """The benchmark registry for `device`: the GPU cases, or their CPU-sized versions."""
    if device == "cuda":
        from . import registry

        return registry.BENCHMARKS
    from . import cpu_cases

    return cpu_cases.BENCHMARKS


def run_case(bench, n: int, peak: float, quick: bool) -> list[Row]:
    """Every implementation of `bench` at `n` tokens: checked against the reference (its extra memory taken then);
    those that pass are then timed together in interleaved rounds (`common.interleaved_ms`), never one that is
    wrong, so that the ratios between them (ours against the floor and the baselines) come from the same moments."""
    rows: list[Row | None] = []
    dev = bench.device
    shape = {"hidden": bench.hidden, "vocab": bench.vocab}
    inputs = bench.make_inputs(n)
    ref = bench.reference(inputs)
    passed = {}  # impl name -> (index in rows, extra memory, check note)
    for impl_name, impl in bench.impls.items():
        skip = impl.skip(n) if impl.skip else None
        if skip:
            rows.append(Row(bench.id, impl_name, n, None, None, None, False, f"not run: {skip}", **shape))
            continue
        try:
            out, mem = extra_memory_gib(lambda: impl.fn(inputs), dev)
            ok, err_note = bench.check(out, ref)
            del out
        except torch.OutOfMemoryError:
            rows.append(Row(bench.id, impl_name, n, None, None, None, False, "out of memory", **shape))
            _free(dev)
            continue
        if not ok:
            rows.append(Row(bench.id, impl_name, n, None, None, mem, False, f"WRONG: {err_note}", **shape))
            continue
        passed[impl_name] = (len(rows), mem, err_note)
        rows.append(None)
        _free(dev)
    fns = {name: (lambda impl=bench.impls[name]: impl.fn(inputs)) for name in passed}
    timing = {"rounds": 3, "rep_ms": min(200, bench.rep_ms)} if quick else {"rounds": 5, "rep_ms": bench.rep_ms}
    try:
        times = interleaved_ms(fns, dev, **timing) if fns else {}
    except torch.OutOfMemoryError:  # together they fragment the memory more than one at a time: time them alone
        _free(dev)
        times = {}
        for name, fn in fns.items():
            times[name] = interleaved_ms({name: fn}, dev, **timing)[name]
            _free(dev)
    for name, (i, mem, err_note) in passed.items():
        ms = times[name]
        rows[i] = Row(bench.id, name, n, ms, bench.flops(n) / (ms * 1e-3) / 1e12 / peak, mem, True, err_note, **shape)
    for row in rows:
        print(format_table([row]).splitlines()[-1], flush=True)
    _free(dev)
    return rows


def _free(dev: str) -> None:
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def run_selected(device: str, plan: dict[str, dict[int, set[str] | None]], quick: bool) -> tuple[dict, float]:
    """Runs plan = {registry key: {n_tokens: implementations (None: all)}}; returns {key: rows} and the peak."""
    registry = benchmarks(device)
    unknown = sorted(set(plan) - set(registry))
    if unknown:
        raise ValueError(f"unknown benchmark id(s) {', '.join(unknown)} on {device} (known: {', '.join(registry)})")
    peak = peak_matmul_tflops(device=device)
    print(f"peak {'bf16' if device == 'cuda' else 'fp32'} matmul: {peak:.2f} TFLOP/s", flush=True)
    rows: dict[str, list[Row]] = {}
    for key, sizes in plan.items():
        for n, impls in sizes.items():
            bench = registry[key]
            if impls is not None:
                bench = dataclasses.replace(bench, impls={k: v for k, v in bench.impls.items() if k in impls})
            rows.setdefault(key, []).extend(run_case(bench, n, peak, quick))
    return rows, peak


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--only", default=None, help="comma-separated ids, e.g. B1,B2 (default: all, or the baseline's)")
    ap.add_argument("--sizes", default=None, help="comma-separated token counts (default: each benchmark's own)")
    ap.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    ap.add_argument("--tag", default=None, help="suffix of the results file name")
    ap.add_argument("--save", nargs="?", const="", default=None, metavar="PATH",
                    help="write the results JSON here (no PATH: this GPU's baseline for --compare)")  # fmt: skip
    ap.add_argument("--compare", nargs="?", const="", default=None, metavar="BASELINE",
                    help="rerun the baseline's cases and fail on a regression (no file: this GPU's committed "
                         "floors, else its saved baseline)")  # fmt: skip
    ap.add_argument("--tolerance", default="5%", help="allowed slow-down against a saved run (default 5%%)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: the GPU when there is one, else the CPU-sized cases")  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU here", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    only = args.only.split(",") if args.only else None
    expectations, source = [], ""
    if args.compare is not None:
        try:
            tolerance = compare.parse_tolerance(args.tolerance)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        found = (compare.load(args.compare, gpu, tolerance) if args.compare
                 else compare.default_baseline(gpu, tolerance))  # fmt: skip
        if found is None:
            where = compare.user_baseline_path(gpu)
            print(f"error: no baseline for {gpu}: no committed floors and no saved run at {where}; make one with "
                  "`vibeperf bench --save`", file=sys.stderr)  # fmt: skip
            return 2
        expectations, source = found
        expectations = compare.resolve_keys(expectations, benchmarks(device))
        expectations = [e for e in expectations if only is None or e.id in only or e.bench in only]
        if not expectations:
            print(f"error: {source} has no case to compare{' among ' + args.only if only else ''}", file=sys.stderr)
            return 2
        plan = {bid: dict(by_n) for bid, by_n in compare.cases(expectations).items()}
    else:
        registry = benchmarks(device)
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
        plan = {bid: dict.fromkeys(sizes or (registry[bid].sizes if bid in registry else [])) for bid in
                only or list(registry)}  # fmt: skip
    torch.manual_seed(0)
    try:
        by_key, peak = run_selected(device, plan, args.quick)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [r for key_rows in by_key.values() for r in key_rows]
    save = compare.user_baseline_path(gpu) if args.save == "" else args.save
    # A comparison rerun (a subset of implementations) is written only where --save says, never as the newest
    # committed results of a checkout (the README's tables are generated from those).
    path = write_results(rows, peak, args.tag, Path(save) if save else None) if save or not expectations else None
    print(f"\nresults: {path or 'not saved (--save PATH)'}\npeak {peak:.2f} TFLOP/s\n" + format_table(rows))
    if not expectations:
        return 0
    verdicts = compare.evaluate(expectations, by_key)
    print(f"\ncompared with {source}\n" + compare.format_verdicts(verdicts))
    bad = [v for v in verdicts if not v.ok]
    print(f"{len(bad)} regression(s) in {len(verdicts)} checks" if bad else f"no regression in {len(verdicts)} checks")
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run_cli(parser.parse_args()))

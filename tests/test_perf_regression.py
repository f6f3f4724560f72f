"""Performance regression tests (GPU): in one run, our fraction of peak and our speed ratio against the best
baseline measured beside it must stay at or above the floors committed for this GPU in benchmarks/floors.json.
A slower commit fails here loudly. Floors are set from committed benchmark results, a little below them so that
run-to-run noise (a few percent on the lent machines) does not trip them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FLOORS = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "floors.json").read_text())
CASES = [(gpu, bid) for gpu, by_id in FLOORS.items() if not gpu.startswith("_") for bid in by_id]


@pytest.mark.gpu
@pytest.mark.parametrize("gpu, bid", CASES, ids=[f"{b}-{g.replace(' ', '_')}" for g, b in CASES])
def test_performance_floor(gpu, bid):
    if torch.cuda.get_device_name() != gpu:
        pytest.skip(f"floors are for {gpu}, this is {torch.cuda.get_device_name()}")
    from vibeperf.bench import registry
    from vibeperf.bench.common import peak_matmul_tflops
    from vibeperf.bench.run import run_case

    floor = FLOORS[gpu][bid]
    bench = registry.BENCHMARKS[bid]
    keep = {floor["impl"], *floor["baselines"]}
    bench = registry.Benchmark(**{**bench.__dict__, "impls": {k: v for k, v in bench.impls.items() if k in keep}})
    rows = {r.impl: r for r in run_case(bench, floor["n_tokens"], peak_matmul_tflops(), quick=True)}
    ours = rows[floor["impl"]]
    assert ours.correct, ours.note
    best = min(rows[b].ms for b in floor["baselines"] if rows[b].correct)
    assert ours.frac_of_peak >= floor["min_frac_of_peak"], (ours.frac_of_peak, floor)
    assert best / ours.ms >= floor["min_speedup_vs_best_baseline"], (best / ours.ms, floor)

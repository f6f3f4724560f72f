"""Performance regression tests (GPU), through the same compare code as `vibeperf bench --compare`
(vibeperf/bench/compare.py): on a GPU with committed floors (vibeperf/bench/floors.json), our fraction of peak and
our speed ratio against the best baseline measured beside it must stay at or above them; on any other GPU the run is
compared with the user's own saved baseline for it (`vibeperf bench --save`), within 5%. A slower commit fails here
loudly. Floors are set from committed benchmark results, a little below them so that run-to-run noise (a few
percent on the lent machines) does not trip them."""

from __future__ import annotations

import pytest
import torch

TOLERANCE = 0.05


def _expectations():
    from vibeperf.bench import compare

    if not torch.cuda.is_available():
        return [], "no GPU"
    gpu = torch.cuda.get_device_name()
    found = compare.default_baseline(gpu, TOLERANCE)
    if found is None:
        return [], (f"no committed floors for {gpu} and no saved baseline at {compare.user_baseline_path(gpu)}: "
                    "run `vibeperf bench --save` once on a known-good commit")  # fmt: skip
    return found


EXPECTATIONS, SOURCE = _expectations()
BIDS = sorted({e.key or e.id for e in EXPECTATIONS}) or ["none"]  # registry keys: B1, B2, B3, B3-policy


@pytest.mark.gpu
@pytest.mark.parametrize("bid", BIDS)
def test_performance_against_baseline(bid):
    if not EXPECTATIONS:
        pytest.skip(SOURCE)
    from vibeperf.bench import compare
    from vibeperf.bench.common import peak_matmul_tflops
    from vibeperf.bench.run import benchmarks, run_case

    exp = [e for e in compare.resolve_keys(EXPECTATIONS, benchmarks("cuda")) if e.bench == bid]
    rows = []
    peak = peak_matmul_tflops()
    for n, impls in compare.cases(exp)[bid].items():
        bench = benchmarks("cuda")[bid]
        bench = type(bench)(**{**bench.__dict__, "impls": {k: v for k, v in bench.impls.items() if k in impls}})
        rows += run_case(bench, n, peak, quick=True)
    verdicts = compare.evaluate(exp, {bid: rows})
    assert all(v.ok for v in verdicts), f"against {SOURCE}:\n" + compare.format_verdicts(verdicts)

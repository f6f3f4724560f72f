"""The microbenchmark suite, installed with the package so any user can run it (`vibeperf bench`).

`registry` holds B1-B3 (ids, shapes, inputs, fp32 references, correctness checks, every implementation timed),
`cpu_cases` B1-B2 at a CPU size, `run` the runner (`vibeperf bench`), `compare` the regression check against a saved
run or the committed floors (`floors.json`), `common` timing, memory, machine tags and result rows; `b4_sft`,
`b5_score`, `b6_clr`, `profile_backends`, `lmhead_passes` and `dist_check` are whole-model, per-kernel and multi-GPU
benchmarks run as `python -m vibeperf.bench.<name>`. Results JSON goes to `common.results_dir()`: the checkout's
committed `benchmarks/results/` when run from a source checkout, else `./vibeperf-results/` (or
$VIBEPERF_RESULTS_DIR).
"""

#!/usr/bin/env bash
# Everything that needs the GPU machine, in one call: set-up and build, GPU tests, benchmarks.
#   bash scripts/gpu_all.sh [STEP[=SECONDS]...] [-- extra benchmark args]
# Steps (run in the order given; default `all` = build test bench):
#   build     set-up + build of vibeperf._C (always run first, whatever the list says)
#   cuda      backend="cuda" GPU tests + compute-sanitizer memcheck over the CUDA path
#   test      every `-m gpu` test (perf-regression floors included)
#   bench     B1-B3 (vibeperf.bench.run, extra args passed on) + B6 (CLR aggregator)
#   compare   `vibeperf bench --compare --quick` against this GPU's committed floors (or its saved baseline), saved
#             to $OUT/baseline.json, then the same cases rerun and compared with that file (5% tolerance)
#   model     B4 (packed SFT step, 3B shape: defaults vs TRL; 64K/128K rows planned for 80 GB) + B5 (64K-token
#             scoring) + B7 (RL update, 3B shape, reduced; a 64K-token case planned for 80 GB): about 15 minutes
#   dist      multi-GPU checks (vibeperf.bench.dist_check: FSDP2 SFT/RL 2 GPUs vs 1, resume 2 -> 1, scaling)
#   profile   per-kernel device time of the Triton and CUDA backends (vibeperf.bench.profile_backends)
#   lmhead    the LM-head engine's variants: their full-vocabulary GPU gradient tests, then the training path's passes
#             and whole-op variants against three bare GEMMs at both heads (vibeperf.bench.lmhead_passes --train-only)
#   timing    B2's rows (ours, the floor, Liger, the bf16 dW sum) timed one after another and interleaved, with the SM
#             clock and power of each block (vibeperf.bench.timing_modes)
# Each step runs under its own time limit (=SECONDS, default 600) so one hang does not take the call's other steps
# with it. Baseline wheels (Liger-Kernel 0.8.5, Cut Cross-Entropy 25.1.1) are taken from .whl/ when present.
# Logs and results JSON go to $OUT (the device tool's output folder) when it is set. Exit status: non-zero when any
# step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps=(); bench_args=()
while (($#)); do
  if [[ "$1" == -- ]]; then shift; bench_args=("$@"); break; fi
  steps+=("$1"); shift
done
((${#steps[@]})) || steps=(all)
expanded=(); for spec in "${steps[@]}"; do  # all = test + bench (with all's time limit, if it has one)
  if [[ "${spec%%=*}" == all ]]; then expanded+=("test${spec#all}" "bench${spec#all}"); else expanded+=("$spec"); fi
done; steps=("${expanded[@]}")
OUT="${OUT:-/tmp/vibeperf-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
export MAX_JOBS="${MAX_JOBS:-16}"
source scripts/setup_env.sh 2>&1 | tee "$OUT/setup.log"
echo "[gpu_all] setup+build: $(( $(date +%s) - t0 )) s"
[[ -f build/setup-build.log ]] && cp build/setup-build.log "$OUT/" 2>/dev/null
python3 -c "import vibeperf._ext as e; print('extension:', e.HAS_EXT, 'cuda part:', e.HAS_CUDA_EXT, e.EXT_ERROR or '')"

rc=0
run_step() {  # run_step SECONDS LOG CMD...   (appends to $OUT/LOG)
  local secs="$1" log="$2"; shift 2
  echo "[gpu_all] $* (limit ${secs} s)" | tee -a "$OUT/$log"
  local s=$(date +%s)
  timeout --signal=INT --kill-after=20 "$secs" "$@" 2>&1 | tee -a "$OUT/$log"
  local r=${PIPESTATUS[0]}
  echo "[gpu_all] exit $r after $(( $(date +%s) - s )) s: $*" | tee -a "$OUT/$log"
  rc=$(( rc | (r != 0) ))
  return "$r"
}
backtrace() {  # backtrace LOG CMD...: the command under cuda-gdb, printing the host and device stacks where it crashes
  echo "[gpu_all] cuda-gdb backtrace of: $*" | tee -a "$OUT/$1"
  local log="$1"; shift
  timeout 300 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt -ex "info cuda kernels" --args "$@" 2>&1 \
    | tail -80 | tee -a "$OUT/$log"
}
for spec in "${steps[@]}"; do
  name="${spec%%=*}"; secs=600; [[ "$spec" == *=* ]] && secs="${spec#*=}"
  case "$name" in
    build) ;;
    cuda) run_step "$secs" cuda.log python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_backend.py \
            tests/test_linear_logprob.py tests/test_mgpo_kernel.py -rf -k "cuda and not torch_checks"
          run_step 120 cuda.log python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_backend.py \
            -k torch_checks || backtrace cuda.log python3 -m pytest -q -p no:cacheprovider -m gpu \
            tests/test_cuda_backend.py -k torch_checks
          run_step "$secs" cuda.log bash scripts/sanitize_cuda.sh memcheck ;;
    test) run_step "$secs" gpu_tests.log python3 -m pytest -q -p no:cacheprovider -m gpu tests/ ;;
    bench) run_step "$secs" bench.log python3 -m vibeperf.bench.run "${bench_args[@]}"
           run_step "$secs" bench.log python3 -m vibeperf.bench.b6_clr ;;
    compare) run_step "$secs" compare.log python3 -m vibeperf bench --compare --quick --save "$OUT/baseline.json" \
               "${bench_args[@]}"
             run_step "$secs" compare.log python3 -m vibeperf bench --compare "$OUT/baseline.json" --quick \
               --tolerance 5% --save "$OUT/rerun.json" ;;
    model) run_step "$secs" model.log python3 -m vibeperf.bench.b4_sft --samples 8 --stage2-samples 2 --steps 2 \
               --methods packed-default,trl-padding-free-liger --profile packed-default
           run_step "$secs" model.log python3 -m vibeperf.bench.b4_sft --mixes none --methods packed --steps 1 \
               --tag B4-long --memory-budget 74 --long 65536:auto,131072:auto
           run_step "$secs" model.log python3 -m vibeperf.bench.b5_score
           run_step "$secs" model.log python3 -m vibeperf.bench.b7_rl --prompts 8 --group 8 --min-len 1024 \
               --max-len 4096 --long 16384 --steps 2
           run_step "$secs" model.log python3 -m vibeperf.bench.b7_rl --prompts 1 --group 2 --min-len 1024 \
               --max-len 1024 --long 65536 --memory-budget 74 --steps 1 --tag B7-long ;;
    dist) run_step "$secs" dist.log python3 -m vibeperf.bench.dist_check ;;
    profile) run_step "$secs" profile.log python3 -m vibeperf.bench.profile_backends ;;
    lmhead) run_step "$secs" lmhead.log python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_linear_logprob.py \
              -rf -k full_vocab
            run_step "$secs" lmhead.log python3 -m vibeperf.bench.lmhead_passes --train-only --n 8192 65536 \
              --head qwen llama3 ;;
    timing) run_step "$secs" timing.log python3 -m vibeperf.bench.timing_modes \
              --impls vibeperf-triton floor liger vibeperf-bf16acc ;;
    *) echo "[gpu_all] unknown step '$name' (build, cuda, test, bench, compare, model, dist, profile, lmhead, timing,"\
            "all)"
       rc=1 ;;
  esac
done
# The device tool returns at most 8 files: everything goes back as one archive (new results + logs).
mkdir -p "$OUT/results"
find benchmarks/results -newer "$OUT/gpu.txt" -type f -exec cp {} "$OUT/results/" \;
tar czf /tmp/vibeperf-out.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/vibeperf-out.tgz "$OUT/"
exit $rc

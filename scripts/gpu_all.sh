#!/usr/bin/env bash
# Everything that needs the GPU machine, in one call: set-up and build, GPU tests, benchmarks.
#   bash scripts/gpu_all.sh [all|build|test|bench|model] [extra benchmark args...]
# all = build + `-m gpu` tests (perf floors included) + B1-B3 (benchmarks.run) + B6; model = B4 (SFT step) and B5
# (64K scoring) through the 3B-shaped model, plus compute-sanitizer on the CUDA path.
# Baseline wheels (Liger-Kernel 0.8.5, Cut Cross-Entropy 25.1.1) are taken from .whl/ when present.
# Writes logs and results JSON under $OUT (the device tool's output folder) when it is set.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what="${1:-all}"; shift || true
OUT="${OUT:-/tmp/vibeperf-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
source scripts/setup_env.sh 2>&1 | tee "$OUT/setup.log"
echo "[gpu_all] setup+build: $(( $(date +%s) - t0 )) s"
python3 -c "import vibeperf._ext as e; print('extension:', e.HAS_EXT, 'cuda part:', e.HAS_CUDA_EXT, e.EXT_ERROR or '')"
rc=0
if [[ "$what" == all || "$what" == test ]]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log"; rc=$(( rc | PIPESTATUS[0] ))
fi
if [[ "$what" == all || "$what" == bench ]]; then
  python3 -m benchmarks.run "$@" 2>&1 | tee "$OUT/bench.log"; rc=$(( rc | PIPESTATUS[0] ))
  python3 -m benchmarks.b6_clr 2>&1 | tee -a "$OUT/bench.log"; rc=$(( rc | PIPESTATUS[0] ))
fi
if [[ "$what" == model ]]; then
  python3 -m benchmarks.b4_sft 2>&1 | tee "$OUT/b4.log"; rc=$(( rc | PIPESTATUS[0] ))
  python3 -m benchmarks.b5_score 2>&1 | tee "$OUT/b5.log"; rc=$(( rc | PIPESTATUS[0] ))
  bash scripts/sanitize_cuda.sh memcheck 2>&1 | tee "$OUT/sanitize.log"; rc=$(( rc | PIPESTATUS[0] ))
fi
cp benchmarks/results/*.json "$OUT/" 2>/dev/null || true
exit $rc

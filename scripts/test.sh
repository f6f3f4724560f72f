#!/usr/bin/env bash
# The README's test command: sets everything up (reusing a complete environment) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m gpu` on a GPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
if [[ $# -eq 0 ]]; then set -- -m "not gpu"; fi
exec "$VIBEPERF_PYTHON" -m pytest -q -p no:cacheprovider "$@"

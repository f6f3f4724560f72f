#!/usr/bin/env bash
# The README's main command: sets everything up (reusing a complete environment) and runs the main job on its
# embedded default. Extra arguments go to `vibeperf demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
exec "$VIBEPERF_PYTHON" -m vibeperf demo "$@"

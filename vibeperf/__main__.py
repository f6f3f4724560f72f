"""`python -m vibeperf ...`: the command line of `vibeperf.cli`."""

import sys

from vibeperf import cli

# The guard keeps spawned worker processes (e.g. `reward.workers` of `vibeperf rl`) from re-running the command.
if __name__ == "__main__":
    sys.exit(cli.main())

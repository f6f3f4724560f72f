"""`python -m vibeperf ...`: the command line of `vibeperf.cli`."""

import sys

from vibeperf import cli

sys.exit(cli.main())

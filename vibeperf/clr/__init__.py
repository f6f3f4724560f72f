"""CLR (claim-level reliability) inference: the vectorised aggregator, and the `vibeperf clr` pipeline around it
(candidates, claim extraction and verification by the same model, equivalence clustering): see
`vibeperf.clr.pipeline`."""

from .aggregate import CLRResult, clr_aggregate


def run_cli(args) -> int:
    """The `vibeperf clr` subcommand; imports the pipeline (math-verify, the rollout engines) only when it runs."""
    from .pipeline import run_cli as run

    return run(args)


__all__ = ["CLRResult", "clr_aggregate", "run_cli"]

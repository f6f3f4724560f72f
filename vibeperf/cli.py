"""The `vibeperf` command line: one subcommand per job, each registered in `SUBCOMMANDS` with one line.

    vibeperf sft RECIPE [key=value ...]       packed-sequence SFT (python -m vibeperf sft ...)
    vibeperf sft --describe                   every config key with its type, default and meaning

The convention: a subcommand is `Subcommand(help, module, recipe)`, and `module` defines `run_cli(args) -> int`,
which does the work and returns the exit status. A recipe subcommand (`recipe=True`) takes the shared recipe
arguments (a recipe file, `key=value` overrides, `--describe`, `--print-config`, `--recipe-list`); any other defines
`add_arguments(parser)` too. The module is imported only when its subcommand runs (or, without a recipe, when the
parser is built). Adding one is one line in `SUBCOMMANDS`.
Every failure a user can act on (`vibeperf.errors.UserError`: recipe, data, model directory, device, resume, a run
stopped by a named fault; or an OSError such as a full disk) prints one line `error: ...` on stderr and exits with
status 2; `--verbose` (or VIBEPERF_DEBUG=1) prints the traceback too. Output: the run's progress goes to stderr
(logging, progress bars), its final summary to stdout; vLLM and transformers log to stderr at WARNING and above
unless `--verbose`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its one-line help, the module that implements it, and whether it takes a recipe."""

    help: str
    module: str
    recipe: bool = False

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        (recipe_arguments if self.recipe else self.load().add_arguments)(parser)

    def run(self, args: argparse.Namespace) -> int:
        return self.load().run_cli(args)


def recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every recipe subcommand takes."""
    parser.add_argument("recipe", nargs="?", help="recipe file (.toml or .json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-5")
    parser.add_argument("--describe", action="store_true", help="list every config key and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--recipe-list", action="store_true", help="list the recipes shipped with vibeperf and exit")


SUBCOMMANDS: dict[str, Subcommand] = {
    "sft": Subcommand("packed-sequence SFT with a curriculum of stages", "vibeperf.sft", recipe=True),
    "demo": Subcommand("the end-to-end job on the tiny local model (see vibeperf/demo/)", "vibeperf.demo"),
    "rl": Subcommand("MGPO RL in phases", "vibeperf.rl", recipe=True),
    "clr": Subcommand("CLR answer selection", "vibeperf.clr", recipe=True),
    "eval": Subcommand("pass@k evaluation per domain and subdomain", "vibeperf.eval.passk", recipe=True),
    "spectrum": Subcommand("probe checkpoints per subdomain, keep the best by pass@k, merge them",
                           "vibeperf.eval.spectrum", recipe=True),
    "distill": Subcommand("offline self-distillation: rejection sampling, learning-potential weights",
                          "vibeperf.distill.run", recipe=True),
    "bench": Subcommand("microbenchmarks: check, time, save, and --compare against a baseline (see vibeperf/bench/)",
                        "vibeperf.bench.run"),
    "env": Subcommand("versions, GPUs, the extension and which backend each `auto` picks here (for bug reports)",
                      "vibeperf.env"),
    "score": Subcommand("NLL, log-probs and entropy of texts (JSONL in, JSONL out; 64K-token sequences)",
                        "vibeperf.score"),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vibeperf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=__import__("vibeperf.env").env.version_line())
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        cmd.add_arguments(p)
    return parser


def configure_logging(verbose: bool) -> None:
    """vibeperf's own loggers at INFO (DEBUG with `verbose`) on stderr; vLLM and transformers at WARNING on stderr,
    transformers' weight loading / saving progress bars off, unless `verbose` (vLLM and huggingface_hub read these
    settings from the environment when first imported, so this runs before them)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "warning")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "0" if verbose else "1")
    if "transformers" in sys.modules:  # imported already (in-process callers): its progress-bar switch is read then
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar() if verbose else hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="[%(name)s] %(message)s",
                        stream=sys.stderr)  # fmt: skip
    if not verbose:
        for name in ("vllm", "transformers", "torch", "filelock", "urllib3", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)


def error_line(e: BaseException) -> str:
    """`error: <message>` on one line (a multi-line message is joined with spaces)."""
    return "error: " + (" ".join(str(e).split()) or type(e).__name__)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the subcommand, return its exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Flags may come after the overrides (`sft recipe.toml a=1 --print-config b=2`): argparse leaves the rest here.
    if any(e.startswith("-") for e in extra) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    configure_logging(args.verbose)
    from vibeperf.errors import UserError

    try:
        return SUBCOMMANDS[args.command].run(args)
    except (UserError, OSError) as e:
        if args.verbose or os.environ.get("VIBEPERF_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose or os.environ.get("VIBEPERF_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130

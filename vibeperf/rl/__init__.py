"""MGPO reinforcement learning on verifiable prompts: config, data side, trainer and the tiny synthetic task.

    python -m vibeperf rl recipes/rl_tiny.toml [key=value ...]
    from vibeperf.config import load_config
    from vibeperf.rl.config import RLConfig
    from vibeperf.rl.trainer import train
    result = train(load_config(RLConfig, "recipes/rl_tiny.toml", ["train.max_steps=5"]))

Importing this package is light (the config only); `run_cli` imports the trainer when it runs.
"""

from __future__ import annotations

import argparse

from vibeperf.rl.config import RLConfig

__all__ = ["RLConfig", "run_cli"]


def run_cli(args: argparse.Namespace) -> int:
    """`vibeperf rl RECIPE [key=value ...] [--describe | --print-config]`."""
    import json

    from vibeperf.config import config_to_dict, describe_config, load_config

    if args.describe:
        print("\n".join(describe_config(RLConfig)))
        return 0
    if args.recipe is None:
        raise SystemExit("vibeperf rl: a recipe file is needed (e.g. recipes/rl_tiny.toml)")
    cfg = load_config(RLConfig, args.recipe, args.overrides)
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return 0
    from vibeperf.rl.trainer import train

    result = train(cfg)
    last = result.last_metrics or {}
    print(f"rl: {result.steps} steps with the {result.engine} engine, last reward {last.get('reward_mean')}, "
          f"output {result.output_dir}, checkpoint {result.last_checkpoint}")  # fmt: skip
    return 0

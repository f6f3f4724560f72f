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
    from vibeperf.config import run_recipe_command

    def run(cfg: RLConfig) -> int:
        from vibeperf.rl.trainer import train
        from vibeperf.train import stopped_note

        result = train(cfg)
        last = result.last_metrics or {}
        print(f"rl: {result.steps} steps with the {result.engine} engine, last reward {last.get('reward_mean')}, "
              f"output {result.output_dir}, checkpoint {result.last_checkpoint}"
              f"{stopped_note(result.stopped_by)}")  # fmt: skip
        return 0

    return run_recipe_command(RLConfig, args, run, "rl")

"""Packed-sequence SFT: the curriculum's data (`data`), the step's loss over packed rows and the loop (`trainer`).

    from vibeperf.config import load_config
    from vibeperf.sft.config import SFTConfig
    from vibeperf.sft import train
    result = train(load_config(SFTConfig, "recipes/sft_tiny.toml", ["train.max_steps=10"]))

The model side (loading, varlen attention, packed rows, the fused loss) is `vibeperf.model`; optimizer, schedule,
checkpoints and metrics are `vibeperf.train`.
"""

import argparse

from vibeperf.sft.data import StageData, prepare_stages
from vibeperf.sft.trainer import TrainResult, forward_backward, train

__all__ = ["StageData", "TrainResult", "forward_backward", "prepare_stages", "run_cli", "train"]


def run_cli(args: argparse.Namespace) -> int:
    """`vibeperf sft RECIPE [key=value ...] [--describe | --print-config]`."""
    from vibeperf.config import run_recipe_command
    from vibeperf.sft.config import SFTConfig
    from vibeperf.train import stopped_note

    def run(cfg: SFTConfig) -> int:
        result = train(cfg)
        print(f"sft: {result.steps} steps, last loss {result.last_loss}, output {result.output_dir}, "
              f"checkpoint {result.last_checkpoint}, attention {result.attention}"
              f"{stopped_note(result.stopped_by)}")  # fmt: skip
        return 0

    return run_recipe_command(SFTConfig, args, run, "sft")

"""Packed-sequence SFT: the curriculum's data (`data`), the step's loss over packed rows and the loop (`trainer`).

    from vibeperf.config import load_config
    from vibeperf.sft.config import SFTConfig
    from vibeperf.sft import train
    result = train(load_config(SFTConfig, "recipes/sft_tiny.toml", ["train.max_steps=10"]))

The model side (loading, varlen attention, packed rows, the fused loss) is `vibeperf.model`; optimizer, schedule,
checkpoints and metrics are `vibeperf.train`.
"""

from vibeperf.sft.data import StageData, prepare_stages
from vibeperf.sft.trainer import TrainResult, forward_backward, train

__all__ = ["StageData", "TrainResult", "forward_backward", "prepare_stages", "train"]

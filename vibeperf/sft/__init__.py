"""Packed-sequence SFT: tokenisation and packing, varlen attention, the fused-loss patch and the trainer.

    from vibeperf.config import SFTConfig, load_config
    from vibeperf.sft import train
    result = train(load_config(SFTConfig, "recipes/sft_tiny.toml", ["train.max_steps=10"]))

Importing this package registers the varlen attention implementations with transformers.
"""

from vibeperf.sft.attention import ATTENTION_CALLS, resolve_attention, use_varlen_attention
from vibeperf.sft.data import StageData, prepare_stages
from vibeperf.sft.packing import PackedRow, Sample, make_row, pack_rows, tokenize_records, truncate
from vibeperf.sft.patch import patch_causal_lm, unpatch_causal_lm
from vibeperf.sft.trainer import TrainResult, forward_backward, train

__all__ = [
    "ATTENTION_CALLS",
    "PackedRow",
    "Sample",
    "StageData",
    "TrainResult",
    "forward_backward",
    "make_row",
    "pack_rows",
    "patch_causal_lm",
    "prepare_stages",
    "resolve_attention",
    "tokenize_records",
    "train",
    "truncate",
    "unpatch_causal_lm",
    "use_varlen_attention",
]

"""Local training data: JSONL readers for SFT and RL records, and an atomic JSONL writer."""

from vibeperf.data.jsonl import (
    CodeTest,
    DataError,
    Message,
    RLRecord,
    SFTRecord,
    read_rl_jsonl,
    read_sft_jsonl,
    write_jsonl,
)

__all__ = [
    "CodeTest",
    "DataError",
    "Message",
    "RLRecord",
    "SFTRecord",
    "read_rl_jsonl",
    "read_sft_jsonl",
    "write_jsonl",
]

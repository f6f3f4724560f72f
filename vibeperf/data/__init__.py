"""Local training data: readers of SFT and RL records (JSONL, JSONL.gz, parquet; columns mapped per file by a
`DataFile`), the code test formats datasets ship, and an atomic JSONL writer."""

from vibeperf.config import DataFile
from vibeperf.data.jsonl import (
    CodeTest,
    DataError,
    Message,
    RLRecord,
    SFTRecord,
    read_lines,
    read_rl_jsonl,
    read_sft_jsonl,
    write_jsonl,
)
from vibeperf.data.sources import DataSource, read_rl, read_sft, resolve_path

__all__ = [
    "CodeTest",
    "DataFile",
    "DataSource",
    "DataError",
    "Message",
    "RLRecord",
    "SFTRecord",
    "read_rl",
    "read_lines",
    "read_rl_jsonl",
    "read_sft",
    "read_sft_jsonl",
    "resolve_path",
    "write_jsonl",
]

"""Data files in the formats datasets arrive in: parquet beside JSONL for SFT, RL and eval data."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vibeperf.data import CodeTest, DataError, Message, RLRecord, SFTRecord, read_rl_jsonl, read_sft_jsonl


def write_parquet(path, rows: list[dict], schema: pa.Schema | None = None, row_group_size: int | None = None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def test_parquet_reads_like_jsonl(tmp_path):
    """The same records from a parquet file and a JSONL file; nulls are absent fields; row groups are crossed."""
    rl_rows = [
        {"prompt": "1+1?", "domain": "math", "answer": "2", "id": None, "subdomain": "arith", "input_output": None},
        {"prompt": "q", "domain": "code", "answer": None, "id": "7", "subdomain": None,
         "input_output": json.dumps({"inputs": ["1\n"], "outputs": ["1\n"]})},
    ] * 3  # fmt: skip
    path = write_parquet(tmp_path / "rl.parquet", rl_rows, row_group_size=2)
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                               for r in rl_rows))  # fmt: skip
    records = read_rl_jsonl(path)
    assert records == read_rl_jsonl(tmp_path / "rl.jsonl")
    assert records[:2] == [
        RLRecord("1+1?", "math", answer="2", subdomain="arith"),
        RLRecord("q", "code", tests=(CodeTest("1\n", "1\n"),), id="7"),
    ]
    sft_rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                 "weight": 0.5}]  # fmt: skip
    sft = read_sft_jsonl(write_parquet(tmp_path / "sft.parquet", sft_rows))
    assert sft == [SFTRecord((Message("user", "hi"), Message("assistant", "yo")), 0.5)]


def test_parquet_errors_name_file_row_and_field(tmp_path):
    rows = [{"prompt": "a", "domain": "math", "answer": "1"}, {"prompt": "b", "domain": "math", "answer": 2},
            {"prompt": "c", "domain": "math", "answer": None}]  # fmt: skip
    schema = pa.schema([("prompt", pa.string()), ("domain", pa.string()), ("answer", pa.int64())])
    path = write_parquet(tmp_path / "bad.parquet", [{**r, "answer": 1 if r["answer"] else None} for r in rows], schema)
    with pytest.raises(DataError, match=r"bad\.parquet:row 2: field 'answer': missing"):
        read_rl_jsonl(path)
    messages = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}] * 2
    messages.append({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]})
    with pytest.raises(DataError, match=r"sft\.parquet:row 2: field 'messages\[1\]\.role': expected one of"):
        read_sft_jsonl(write_parquet(tmp_path / "sft.parquet", messages))
    (tmp_path / "fake.parquet").write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable parquet file"):
        read_rl_jsonl(tmp_path / "fake.parquet")
    empty = pa.schema([("prompt", pa.string())])
    with pytest.raises(DataError, match=r"empty\.parquet: no records"):
        read_rl_jsonl(write_parquet(tmp_path / "empty.parquet", [], empty))

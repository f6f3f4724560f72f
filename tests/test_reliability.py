"""Bad inputs and faults as a new user or an adversary would meet them: every failure one line `error: ...` on stderr
with exit status 2, checked before any output folder exists; readers with a per-line cap.

Each case names the defect of issue 20 it covers; on the code before that issue these raised tracebacks.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from vibeperf import cli
from vibeperf.data import DataError, read_lines, read_sft_jsonl
from vibeperf.sft.synthetic import synthetic_records
from vibeperf.tiny_model import get_tiny_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CPU = ["train.device=cpu", "logging.progress=false", "logging.plot=false"]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """An empty directory, a copy of the tiny model whose config.json has a field of the wrong type, a text file."""
    root = tmp_path_factory.mktemp("models")
    (root / "empty").mkdir()
    shutil.copytree(get_tiny_model(), root / "badfield")
    cfg = json.loads((root / "badfield" / "config.json").read_text())
    cfg["hidden_size"] = "big"
    (root / "badfield" / "config.json").write_text(json.dumps(cfg))
    (root / "texts.jsonl").write_text('{"text": "one two three"}\n')
    return root


def _run(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


# (id, argv builder(tmp, models) -> argv, substrings of the error line); every case must fail before writing `out`
BAD_INPUTS = [
    ("sft-data-is-dir", lambda t, m: ["sft", f"{RECIPES}/sft_tiny.toml", f"stages.0.data=['{t}']"],
     ["a_directory: is a directory"]),
    ("rl-data-is-dir", lambda t, m: ["rl", f"{RECIPES}/rl_tiny.toml", "model.path=tiny",
                                     f"phases.0.sources.0.files=['{t}']"], ["is a directory"]),
    ("sft-empty-model-dir", lambda t, m: ["sft", f"{RECIPES}/sft_tiny.toml", f"model.path={m / 'empty'}"],
     ["model.path=", "no config.json"]),
    ("sft-bad-config-field", lambda t, m: ["sft", f"{RECIPES}/sft_tiny.toml", f"model.path={m / 'badfield'}"],
     ["model.path=", "hidden_size"]),
    ("rl-bad-config-field", lambda t, m: ["rl", f"{RECIPES}/rl_tiny.toml", f"model.path={m / 'badfield'}"],
     ["model.path=", "hidden_size"]),
    ("eval-empty-model-dir", lambda t, m: ["eval", f"{RECIPES}/eval_tiny.toml", f"model={m / 'empty'}"],
     ["model=", "no config.json"]),
    ("eval-data-is-dir", lambda t, m: ["eval", f"{RECIPES}/eval_tiny.toml", f"data=['{t}']"], ["is a directory"]),
    ("distill-data-is-dir", lambda t, m: ["distill", f"{RECIPES}/distill_tiny.toml", "generators=['tiny']",
                                          f"data=['{t}']"], ["is a directory"]),
    ("clr-bad-config-field", lambda t, m: ["clr", f"{RECIPES}/clr_tiny.toml", f"model.path={m / 'badfield'}"],
     ["model.path=", "hidden_size"]),
    ("spectrum-empty-checkpoint", lambda t, m: ["spectrum", f"{RECIPES}/spectrum_tiny.toml",
                                                f"checkpoints=['{m / 'empty'}']"], ["empty: not a checkpoint"]),
    ("score-input-is-dir", lambda t, m: ["score", "--model", "tiny", "--input", str(t), "--output", f"{t}/o.jsonl"],
     ["is a directory"]),
    ("score-empty-model-dir", lambda t, m: ["score", "--model", str(m / "empty"), "--input",
                                            str(m / "texts.jsonl"), "--output", f"{t}/o.jsonl"],
     ["model=", "no config.json"]),
]  # fmt: skip


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in BAD_INPUTS])
def test_bad_input_is_one_line_error_and_leaves_nothing(tmp_path, capsys, bad_models, argv, needles):
    data_dir = tmp_path / "a_directory"
    data_dir.mkdir()
    out = tmp_path / "out"
    args = argv(data_dir, bad_models)
    if args[0] != "score":
        args.append(f"output_dir={out}")
    code, stdout, err = _run(capsys, args)
    assert code == 2, err
    assert len(err) >= 1 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert all(n in err[-1] for n in needles), err[-1]
    assert not out.exists() and not (data_dir / "o.jsonl").exists()
    assert stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of cuda on a machine without it")
@pytest.mark.parametrize("command, recipe", [("sft", "sft_tiny"), ("rl", "rl_tiny")])
def test_cuda_device_without_cuda_is_refused_up_front(tmp_path, capsys, command, recipe):
    code, _, err = _run(capsys, [command, f"{RECIPES}/{recipe}.toml", "train.device=cuda",
                                 f"output_dir={tmp_path / 'out'}"])  # fmt: skip
    assert (
        code == 2 and err[-1] == "error: train.device='cuda': CUDA is not available on this machine (use auto or cpu)"
    )
    assert not (tmp_path / "out").exists()


def test_verbose_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VIBEPERF_DEBUG", "1")
    code, _, err = _run(capsys, ["sft", f"{RECIPES}/sft_tiny.toml", f"stages.0.data=['{tmp_path}']"])
    assert code == 2 and "Traceback (most recent call last):" in err and err[-1].startswith("error: ")


def _long_prompt_data(tmp_path, n_short=3):
    long = {"prompt": "Repeat: " + " ".join(["word"] * 300), "domain": "math", "answer": "1"}
    short = [{"prompt": f"Repeat the digit {d}.", "domain": "math", "answer": str(d)} for d in range(n_short)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*short[:1], long, *short[1:]]))
    return path


def test_rl_long_prompt_refused_before_the_model_loads(tmp_path, capsys):
    """Issue 20 defect 1: a prompt longer than engine.max_model_len ended the run with an 80-line vLLM traceback
    and left config.json and an empty metrics.jsonl."""
    data = _long_prompt_data(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run(capsys, ["rl", f"{RECIPES}/rl_tiny.toml", "model.path=tiny", "train.max_steps=1",
                                 f"phases.0.sources.0.files=['{data}']", f"output_dir={out}", *CPU])  # fmt: skip
    assert code == 2 and err[-1].startswith(f"error: {data}: record 2: the prompt is ")
    assert "engine.max_model_len=256" in err[-1] and "rollout.long_prompts=skip" in err[-1]
    assert not out.exists()


def test_rl_long_prompt_skipped_and_counted(tmp_path, caplog):
    from transformers import AutoTokenizer

    from vibeperf.config import load_config
    from vibeperf.rl.config import RLConfig
    from vibeperf.rl.data import fit_prompts, load_phase

    data = _long_prompt_data(tmp_path)
    cfg = load_config(RLConfig, RECIPES / "rl_tiny.toml", [f"phases.0.sources.0.files=['{data}']"])
    phase = load_phase(cfg.phases[0])
    tok = AutoTokenizer.from_pretrained(get_tiny_model())
    assert fit_prompts(phase, tok, max_tokens=8, limit=256, limit_name="rollout.max_model_len", policy="skip") == 1
    src = phase.sources[0]
    assert [r.answer for r in src.records] == ["0", "1", "2"] and src.kept == [0, 1, 2]
    assert src.origins == [f"{data}: record 1", f"{data}: record 3", f"{data}: record 4"]
    needle = f"1 prompt(s) longer than rollout.max_model_len=256 minus max_tokens=8 dropped (first: {data}: record 2)"
    assert needle in caplog.text


def test_resume_refused_after_global_batch_changed_is_one_line(tmp_path, capsys):
    data = tmp_path / "copy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(16, task="copy")))
    overrides = [f"stages.0.data=['{data}']", f"output_dir={tmp_path / 'run'}", "stages.0.token_budget=128",
                 "train.global_batch=8", "train.loss_backend=torch", *CPU]  # fmt: skip
    from vibeperf.config import load_config
    from vibeperf.sft.config import SFTConfig
    from vibeperf.sft.trainer import train

    train(load_config(SFTConfig, RECIPES / "sft_tiny.toml", [*overrides, "train.max_steps=1"]))
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    code, _, err = _run(capsys, ["sft", f"{RECIPES}/sft_tiny.toml", *overrides, "train.global_batch=4",
                                 "checkpoint.resume=latest"])  # fmt: skip
    assert code == 2 and "Traceback" not in "\n".join(err) and not any("Loading weights" in e for e in err)
    assert err[-1].startswith("error: checkpoint.resume: ") and "batch size, seed or stages changed" in err[-1]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_logging_goes_to_stderr_and_quiet_libraries(monkeypatch):
    import logging

    for key in ("VLLM_LOGGING_STREAM", "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(key, raising=False)
    cli.configure_logging(verbose=False)
    import os

    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr" and os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert logging.getLogger("vllm").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("transformers").getEffectiveLevel() == logging.WARNING


def test_reader_refuses_a_line_over_the_cap_before_parsing(tmp_path, monkeypatch):
    """Issue 20 defect 4: a 20 MB line was tokenised whole (5.2 GB peak); now refused with file:line, read no further
    than the cap."""
    path = tmp_path / "big.jsonl"
    ok = json.dumps({"prompt": "p", "response": "r"})
    big = json.dumps({"prompt": "p", "response": "x" * 5000})
    path.write_text(f"{ok}\n{big}\n{ok}\n")
    with pytest.raises(DataError, match=rf"^{path}:2: line longer than 4096 bytes"):
        list(read_lines(path, max_bytes=4096))
    monkeypatch.setenv("VIBEPERF_MAX_LINE_MB", str(4096 / 2**20))
    with pytest.raises(DataError, match=rf"^{path}:2: line longer than 4096 bytes .*VIBEPERF_MAX_LINE_MB"):
        read_sft_jsonl(path)
    monkeypatch.setenv("VIBEPERF_MAX_LINE_MB", "1")
    assert len(read_sft_jsonl(path)) == 3
    exact = tmp_path / "exact.jsonl"
    exact.write_bytes(ok.encode() + b"\n" + ok.encode())  # a line of exactly the cap, with and without newline
    assert [n for n, _ in read_lines(exact, max_bytes=len(ok))] == [1, 2]
    with pytest.raises(DataError, match=":1: line longer than"):
        list(read_lines(exact, max_bytes=len(ok) - 1))
    monkeypatch.setenv("VIBEPERF_MAX_LINE_MB", "lots")
    with pytest.raises(DataError, match="VIBEPERF_MAX_LINE_MB='lots'"):
        read_sft_jsonl(path)


@pytest.mark.parametrize(
    "tests, message",
    [
        pytest.param(5, "tests: expected a list of tests (CodeTests or mappings), got int", id="not-a-list"),
        pytest.param("1 2", "tests: expected a list of tests (CodeTests or mappings), got str", id="a-string"),
        pytest.param({"input": "1", "output": "2"}, "tests: expected a list of tests", id="one-mapping"),
        pytest.param([None], "tests[0]: expected a CodeTest or a mapping, got NoneType", id="none-entry"),
        pytest.param(
            [{"input": "1", "output": "1"}, "x"], "tests[1]: expected a CodeTest or a mapping", id="str-entry"
        ),
        pytest.param([{"input": "1"}], "tests[0]: a stdin test needs string 'input' and 'output'", id="no-output"),
        pytest.param([{"input": 1, "output": "2"}], "tests[0]: a stdin test needs string", id="int-input"),
        pytest.param([], "tests: code_reward needs at least one test", id="empty"),
    ],
)
def test_code_reward_validates_tests_first(tests, message):
    """Issue 20 defect 2: malformed `tests` from the library API raised AttributeError / KeyError / TypeError; now a
    one-line DataError (a ValueError) naming the entry, before the completion is looked at."""
    from vibeperf.rewards import code_reward

    with pytest.raises(DataError, match=f"^{re.escape(message)}"):
        code_reward(tests, "no code block here")

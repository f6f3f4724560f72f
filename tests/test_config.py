"""Typed config: recipes load, overrides apply, every bad value is a ConfigError naming the file and the key."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from vibeperf import cli
from vibeperf.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    describe_config,
    field_docs,
    load_config,
)
from vibeperf.sft.config import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "sft_tiny.toml"
PAPER = ROOT / "recipes" / "sft_vibethinker.toml"


def test_recipes_load():
    tiny = load_config(SFTConfig, TINY)
    assert [s.name for s in tiny.stages] == ["broad", "long-hard"]
    assert tiny.model.path == "tiny" and tiny.stages[1].difficulty.num_samples == 8
    paper = load_config(SFTConfig, PAPER)
    assert paper.train.global_batch == 128
    assert (paper.optim.lr, paper.optim.min_lr, paper.optim.warmup_frac) == (5e-5, 8e-8, 0.05)
    assert [s.token_budget for s in paper.stages] == [16384, 65536]
    long = paper.stages[1]
    assert long.min_tokens == 5000 and long.difficulty.num_samples == 8 and long.difficulty.min_error_rate == 0.75
    assert paper.model.activation_checkpointing


def test_overrides_apply():
    cfg = load_config(SFTConfig, TINY, [
        "optim.lr=1e-4", "optim.min_lr=1e-5", "stages.1.min_tokens=70", "stages[0].epochs=3", "train.device=cpu",
        "model.path=/ckpt/q", 'stages.0.data=["a.jsonl", "b.jsonl"]', "logging.progress=false",
        "stages.1.difficulty=none", "stages.0.lr=2e-3", "checkpoint.resume=latest",
    ])  # fmt: skip
    assert cfg.optim.lr == 1e-4 and cfg.optim.min_lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.stages[1].min_tokens == 70 and cfg.stages[0].epochs == 3
    assert cfg.train.device == "cpu" and cfg.model.path == "/ckpt/q"
    assert cfg.stages[0].data == ["a.jsonl", "b.jsonl"] and cfg.logging.progress is False
    assert cfg.stages[1].difficulty is None and cfg.stages[0].lr == 2e-3
    assert cfg.checkpoint.resume == "latest"


def test_override_creates_missing_optional_section():
    cfg = load_config(SFTConfig, TINY, ["stages.0.difficulty.verdicts=v.jsonl", "stages.0.difficulty.num_samples=4"])
    assert cfg.stages[0].difficulty.verdicts == "v.jsonl" and cfg.stages[0].difficulty.num_samples == 4


# (id, overrides, substrings of the error)
BAD_OVERRIDES = [
    ("unknown-key", ["optim.lrr=1"], ["optim.lrr: unknown key", "lr, min_lr"]),
    ("unknown-section", ["optimizer.lr=1"], ["optimizer: unknown key"]),
    ("not-a-number", ["optim.lr=fast"], ["optim.lr: expected a number, got string 'fast'"]),
    ("float-for-int", ["train.global_batch=1.5"], ["train.global_batch: expected an integer"]),
    ("int-for-bool", ["model.liger=1"], ["model.liger: expected true or false"]),
    ("literal", ["model.attention=fast"], ["model.attention: expected one of", "'varlen'"]),
    ("min-lr-above-lr", ["optim.min_lr=1.0"], ["optim.min_lr: must be in [0, lr="]),
    ("negative-lr", ["optim.lr=-1e-5"], ["optim.lr: must be > 0"]),
    ("warmup", ["optim.warmup_frac=1.0"], ["optim.warmup_frac: must be in [0, 1)"]),
    ("stage-index", ["stages.5.epochs=1"], ["stages.5: no item 5 (the list has 2)"]),
    ("nested-check", ["stages.1.difficulty.min_error_rate=1.5"], ["stages[1].difficulty.min_error_rate: must be in"]),
    ("stage-check", ["stages.0.token_budget=1"], ["stages[0].token_budget: must be >= 2"]),
    ("min-tokens-over-budget", ["stages.1.min_tokens=5000"], ["stages[1].min_tokens: 5000 exceeds token_budget"]),
    ("device", ["train.device=gpu"], ["train.device: expected auto, cpu, cuda or cuda:N"]),
    ("no-equals", ["optim.lr"], ["expected key=value"]),
    ("into-a-value", ["optim.lr.x=1"], ["optim.lr is a value"]),
    ("list-type", ["stages.0.data=a.jsonl"], ["stages[0].data: expected a list"]),
    ("empty-data", ["stages.0.data=[]"], ["stages[0].data: must list at least one"]),
    ("duplicate-stage", ["stages.1.name=broad"], ["stages: stage names must be unique"]),
    ("precision", ["train.precision=fp16"], ["train.precision: expected one of"]),
]


@pytest.mark.parametrize("overrides,needles", [c[1:] for c in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES])
def test_bad_overrides(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, TINY, overrides)
    msg = str(e.value)
    assert "sft_tiny.toml" in msg
    for needle in needles:
        assert needle in msg, msg


BAD_FILES = [
    ("toml-syntax", "recipe.toml", "output_dir = \n", ["recipe.toml: invalid TOML"]),
    ("json-syntax", "recipe.json", '{"stages": [}', ["recipe.json: invalid JSON"]),
    ("json-not-object", "recipe.json", "[1]", ["expected a JSON object"]),
    ("suffix", "recipe.yaml", "a: 1", ["must be a .toml or .json file"]),
    ("no-stages", "recipe.toml", 'output_dir = "x"\n', ["recipe.toml: stages: missing"]),
    ("unknown-top", "recipe.toml", 'outdir = "x"\n', ["outdir: unknown key", "output_dir"]),
    ("stage-missing-data", "recipe.toml", '[[stages]]\nname = "a"\n', ["stages[0].data: missing"]),
    ("section-not-table", "recipe.toml", 'model = 3\n[[stages]]\nname = "a"\ndata = ["x"]\n',
     ["model: expected a table"]),
]


@pytest.mark.parametrize("name,text,needles", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_recipe_files(tmp_path, name, text, needles):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, path)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_json_recipe_and_round_trip(tmp_path):
    cfg = load_config(SFTConfig, TINY)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(config_to_dict(cfg)))
    assert load_config(SFTConfig, path) == cfg
    assert config_from_dict(SFTConfig, config_to_dict(cfg)) == cfg


def _config_classes(cls, seen=None):
    seen = seen if seen is not None else []
    if cls in seen:
        return seen
    seen.append(cls)
    for tp in typing.get_type_hints(cls).values():
        for arg in (tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in typing.get_args(t))):
            if dataclasses.is_dataclass(arg):
                _config_classes(arg, seen)
    return seen


def test_every_field_has_a_docstring():
    classes = _config_classes(SFTConfig)
    assert len(classes) >= 8
    missing = [f"{c.__name__}.{k}" for c in classes for k, doc in field_docs(c).items() if not doc]
    assert not missing


def test_describe_lists_nested_keys():
    lines = describe_config(SFTConfig)
    assert any(line.startswith("stages.N.difficulty.min_error_rate: float = 0.75") for line in lines)
    assert any(line.startswith("optim.lr: float = 5e-05  Peak learning rate.") for line in lines)


def test_cli_print_config_and_errors(capsys):
    assert cli.main(["sft", str(TINY), "--print-config", "optim.lr=1e-4", "optim.min_lr=0"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 1e-4
    assert cli.main(["sft", str(TINY), "optim.lr=fast"]) == 2
    assert "optim.lr: expected a number" in capsys.readouterr().err
    assert cli.main(["sft", "--describe"]) == 0
    assert "stages.N.min_tokens" in capsys.readouterr().out


def test_stages_share_one_vocabulary():
    """Engine, sampling and reward sections are the same classes in every stage that has them; loss backends and
    devices take the same values everywhere."""
    from vibeperf.config import EngineConfig, LossBackend, RewardConfig, SamplingConfig
    from vibeperf.distill.config import DistillConfig, ScoringConfig
    from vibeperf.eval.config import EvalConfig, SpectrumConfig
    from vibeperf.rl.config import LossConfig, RLConfig
    from vibeperf.sft.config import SFTTrainConfig

    for cls in (RLConfig, EvalConfig, SpectrumConfig, DistillConfig):
        hints = typing.get_type_hints(cls)
        assert (hints["engine"], hints["sampling"], hints["reward"]) == (EngineConfig, SamplingConfig, RewardConfig)
    for cls, name in ((SFTTrainConfig, "loss_backend"), (LossConfig, "backend"), (ScoringConfig, "backend")):
        assert typing.get_type_hints(cls)[name] == LossBackend and "cuda" in typing.get_args(LossBackend)
    missing = [f"{c.__name__}.{k}" for top in (RLConfig, EvalConfig, SpectrumConfig, DistillConfig)
               for c in _config_classes(top) for k, doc in field_docs(c).items() if not doc]  # fmt: skip
    assert not missing


@pytest.mark.parametrize(
    "old,new",
    [("rollout.engine", "engine.kind"), ("rollout.temperature", "sampling.temperature"),
     ("rollout.max_model_len", "engine.max_model_len"), ("filter.batch_prompts", "engine.batch_prompts")],
)  # fmt: skip
def test_renamed_keys_name_the_new_key(tmp_path, old, new):
    from vibeperf.rl.config import RLConfig

    section, key = old.split(".")
    path = tmp_path / "old.toml"
    path.write_text(f'[{section}]\n{key} = 1\n[[phases]]\nname = "a"\nsteps = 1\n[[phases.sources]]\nfiles = ["x"]\n')
    with pytest.raises(ConfigError, match=f"{old}: renamed to {new}"):
        load_config(RLConfig, path)
    with pytest.raises(ConfigError, match=f"{old}: renamed to {new}"):
        load_config(RLConfig, ROOT / "recipes" / "rl_tiny.toml", [f"{old}=1"])

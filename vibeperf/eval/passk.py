"""`vibeperf eval`: unbiased pass@k of one checkpoint, per domain and subdomain.

What a run does:
1. Reads the RL JSONL files (a malformed line stops the run before any model is loaded).
2. Builds the rollout engine (`engine.kind`: vLLM, or transformers generate) and samples n completions per problem
   (`samples.math` for math / STEM domains, `samples.code` for code), temperature and top-p from `sampling`.
3. Verifies every completion: math-verify against the answer, or the sandboxed tests (all must pass).
4. Per problem with c correct of n: pass@k = 1 - C(n - c, k) / C(n, k) for every k <= n (`vibeperf.reference`).
   Per group (each domain, and each domain/subdomain pair when records carry a subdomain): the mean over its
   problems, for k up to the smallest n in the group.
5. Writes output_dir/results.jsonl (one line per problem), summary.json (per group: problems, n, pass@k for every k,
   mean completion tokens, share cut at max_tokens), pass_at_k.png (pass@k against k, one line per group), and prints
   a table of pass@k at k = 1, 2, 4, ... and n.

    python -m vibeperf eval recipes/eval_tiny.toml                                     # CPU, tiny model
    python -m vibeperf eval recipes/eval_vibethinker.toml model=/ckpt/VibeThinker-3B   # one GPU, vLLM
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vibeperf.data import read_rl, write_jsonl
from vibeperf.data.sources import describe
from vibeperf.eval.config import EvalConfig
from vibeperf.eval.sampling import Graded, sample_and_grade, samples_for
from vibeperf.files import save_figure
from vibeperf.rewards import Scorer
from vibeperf.rollout import RolloutEngine, engine_from_config

log = logging.getLogger("vibeperf.eval")


def pass_at_k_curves(n, c, k_max: int) -> np.ndarray:
    """Unbiased pass@k [P, k_max] fp64 for k = 1..k_max of P problems with c[p] correct of n[p] samples (k_max <=
    min n). pass@k = 1 - C(n - c, k) / C(n, k), and the miss probability C(n - c, k) / C(n, k) is the running
    product over i < k of (1 - c / (n - i)), summed as log1p terms and turned back with -expm1 so small values keep
    their digits; it reaches 0 (pass@k = 1) once n - c < k. `vibeperf.reference.pass_at_k` is the oracle."""
    n = np.asarray(n, dtype=np.float64)[:, None]
    c = np.asarray(c, dtype=np.float64)[:, None]
    i = np.arange(k_max, dtype=np.float64)[None, :]
    left = n - i  # [P, k_max]: samples not yet drawn before the (i + 1)-th draw
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(left > c, np.log1p(-c / left), -np.inf)  # a draw that must hit a correct one: miss 0
    log_miss = np.cumsum(terms, axis=1)
    return -np.expm1(log_miss) + 0.0  # + 0.0: no -0.0


def pass_at_k_curve(n: int, c: int) -> list[float]:
    """[pass@1, ..., pass@n] of one problem with c correct of n samples."""
    return [float(x) for x in pass_at_k_curves([n], [c], n)[0]]


@dataclass
class GroupSummary:
    """Mean pass@k of a group of problems."""

    name: str
    problems: int
    n: int
    """Smallest number of samples of a problem in the group: pass@k is reported for k <= n."""
    pass_at_k: list[float]
    """[pass@1, ..., pass@n], means over the group's problems."""
    mean_tokens: float
    truncated: float
    """Share of completions that stopped at max_tokens."""

    def at(self, k: int) -> float | None:
        return self.pass_at_k[k - 1] if 1 <= k <= self.n else None


def group_names(graded: Graded) -> list[str]:
    """The groups a problem counts in: its domain, and domain/subdomain when it has a subdomain."""
    domain = graded.record.domain
    sub = graded.record.subdomain
    return [domain] if sub is None else [domain, f"{domain}/{sub}"]


def summarize(results: Sequence[Graded]) -> list[GroupSummary]:
    """One GroupSummary per group (see `group_names`), domains in order of appearance, each followed by its
    subdomains in order of appearance."""
    members: dict[str, list[Graded]] = {}
    for g in results:
        for name in group_names(g):
            members.setdefault(name, []).append(g)
    domains = [name for name in members if "/" not in name]
    order = [x for d in domains for x in (d, *(name for name in members if name.startswith(d + "/")))]
    out = []
    for name in order:
        group = members[name]
        n_arr = np.array([len(g.rewards) for g in group])
        c_arr = np.array([g.num_correct for g in group])
        n_min = int(n_arr.min())
        curve = pass_at_k_curves(n_arr, c_arr, n_min).mean(axis=0)  # [n_min]
        completions = [c for g in group for c in g.group.completions]
        out.append(GroupSummary(
            name=name, problems=len(group), n=n_min, pass_at_k=[float(x) + 0.0 for x in curve],
            mean_tokens=float(np.mean([len(c.token_ids) for c in completions])),
            truncated=float(np.mean([c.finish_reason == "length" for c in completions])),
        ))  # fmt: skip
    return out


def problem_row(g: Graded, *, completions: bool = False) -> dict:
    """The results.jsonl line of one problem."""
    n, c = len(g.rewards), g.num_correct
    row = {"id": g.key, "domain": g.record.domain, "subdomain": g.record.subdomain, "n": n, "correct": c,
           "pass_at_k": pass_at_k_curve(n, c), "rewards": g.rewards,
           "mean_tokens": float(np.mean([len(x.token_ids) for x in g.group.completions])),
           "truncated": sum(x.finish_reason == "length" for x in g.group.completions)}  # fmt: skip
    if completions:
        row["completions"] = [{"text": x.text, "reward": r, "reason": why, "tokens": len(x.token_ids),
                               "finish_reason": x.finish_reason}
                              for x, r, why in zip(g.group.completions, g.rewards, g.reasons)]  # fmt: skip
    return row


def table_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
    return ks if ks and ks[-1] == n else [*ks, n]


def format_table(summaries: Sequence[GroupSummary]) -> str:
    """pass@k (percent) per group at the k of `table_ks` of the largest n; "-" where k exceeds a group's n."""
    ks = table_ks(max(s.n for s in summaries))
    width = max(12, *(len(s.name) + 2 for s in summaries))
    head = f"{'group':<{width}}{'problems':>9}{'n':>5}" + "".join(f"{'pass@' + str(k):>10}" for k in ks)
    lines = [head, "-" * len(head)]
    for s in summaries:
        cells = "".join(f"{100 * v:>9.1f}%" if (v := s.at(k)) is not None else f"{'-':>10}" for k in ks)
        lines.append(f"{s.name:<{width}}{s.problems:>9}{s.n:>5}{cells}")
    return "\n".join(lines)


def plot_pass_at_k(summaries: Sequence[GroupSummary], path: Path, title: str = "") -> None:
    """pass@k against k (log2 axis), one line per group; written atomically (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for s in summaries:
        ks = np.arange(1, s.n + 1)
        ax.plot(ks, np.asarray(s.pass_at_k) * 100, marker="o" if s.n <= 16 else None, ms=3, lw=1.4,
                ls="--" if "/" in s.name else "-", label=f"{s.name} ({s.problems})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


@dataclass
class EvalResult:
    """What an evaluation produced."""

    summaries: list[GroupSummary]
    results: list[Graded]
    output_dir: Path
    engine: str
    seconds: float


def run_eval(cfg: EvalConfig, *, engine: RolloutEngine | None = None, progress: bool = True) -> EvalResult:
    """Evaluate `cfg.model` (or the given, already built `engine`, which is left open) as the module docstring says."""
    from vibeperf.model import model_path

    t0 = time.perf_counter()
    records = [r for source in cfg.data for r in read_rl(source)]
    if cfg.max_problems:
        records = records[: cfg.max_problems]
    own = engine is None
    if own:
        engine = engine_from_config(cfg.engine, model_path(cfg.model, "model"), seed=cfg.sampling.seed)
    try:
        with Scorer(cfg.reward) as scorer:
            results = sample_and_grade(
                engine, records, n_for=lambda r: samples_for(r, cfg.samples.math, cfg.samples.code),
                sampling=cfg.sampling, scorer=scorer, system_prompt=cfg.system_prompt,
                batch_prompts=cfg.engine.batch_prompts, desc="eval", progress=progress,
            )  # fmt: skip
    finally:
        if own:
            engine.close()
    summaries = summarize(results)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "results.jsonl", [problem_row(g, completions=cfg.save_completions) for g in results])
    seconds = time.perf_counter() - t0
    doc = {"model": cfg.model, "engine": engine.name, "data": [describe(d) for d in cfg.data],
           "seconds": round(seconds, 2),
           "sampling": vars(cfg.sampling), "groups": [vars(s) for s in summaries]}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    if cfg.plot:
        plot_pass_at_k(summaries, out / "pass_at_k.png", f"{cfg.model} (T={cfg.sampling.temperature}, "
                       f"top_p={cfg.sampling.top_p})")  # fmt: skip
    log.info("eval of %s: %d problems in %.1f s with the %s engine; results in %s", cfg.model, len(records), seconds,
             engine.name, out)  # fmt: skip
    return EvalResult(summaries, results, out, engine.name, seconds)


def run_cli(args) -> int:
    """`vibeperf eval RECIPE [key=value ...]`."""
    from vibeperf.config import run_recipe_command

    def run(cfg: EvalConfig) -> int:
        result = run_eval(cfg)
        print(format_table(result.summaries))
        print(f"\neval: {len(result.results)} problems, {result.engine} engine, {result.seconds:.1f} s; "
              f"{result.output_dir / 'results.jsonl'}, summary.json, pass_at_k.png")  # fmt: skip
        return 0

    return run_recipe_command(EvalConfig, args, run, "eval")

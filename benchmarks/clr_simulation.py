"""CLR vs majority vote in simulation: how noisy may the claim judge be before CLR stops paying off?

    python -m benchmarks.clr_simulation [--queries 4000] [--seed 0] [--no-write]

The model of one query (K = 32 candidates, M = 5 claims, as in DESIGN.md section 2):

1. Each candidate is correct with probability p ~ Uniform(0.05, 0.65) drawn per query, so the right answer is often
   a minority. A wrong candidate picks one of 4 wrong answers with probabilities ~ Dirichlet(0.5, ...), so one
   distractor often dominates and beats the right answer in a plain vote.
2. Claims: each claim of a correct candidate is valid with probability 0.9; of a wrong candidate with probability
   0.6 (a wrong answer rests on at least one false step, but most of its steps are fine). So the true answer's claims
   are more often valid.
3. The judge reports each claim's validity and flips it with probability `noise` (0 = a perfect judge, 0.5 = a coin).
4. CLR picks its answer with `vibeperf.clr.clr_aggregate` (r_k = (mean verdict)^M, Score = sum r_k per answer,
   ties to the larger cluster, then the first seen); majority vote is the same with every verdict 1.

Reported per noise level: accuracy of CLR and of majority vote on the same samples, mean pass@1 (share of correct
candidates) and pass@K (a correct candidate exists: the ceiling of any selection rule), each with its standard error.
Writes benchmarks/results/clr_simulation.png and benchmarks/results/simulation/clr_simulation.json, tagged with the
commit and versions (a subfolder: `benchmarks.report` reads every results/*.json as a GPU benchmark file). CPU only,
a few seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from vibeperf.bench.common import machine_info
from vibeperf.clr import clr_aggregate

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NOISE_LEVELS = tuple(round(0.05 * i, 2) for i in range(11))


def sample_queries(queries: int, k: int, m: int, *, num_wrong: int = 4, p_range=(0.05, 0.65), valid_correct=0.9,
                   valid_wrong=0.6, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Answer ids [Q, K] (0 = the right answer, 1..num_wrong wrong ones) and true claim validity [Q, K, M] (bool)."""
    p = rng.uniform(*p_range, size=(queries, 1))  # [Q, 1]
    correct = rng.random((queries, k)) < p  # [Q, K]
    weights = rng.dirichlet([0.5] * num_wrong, size=queries)  # [Q, W]
    wrong = 1 + (rng.random((queries, k, 1)) > weights.cumsum(1)[:, None, :]).sum(-1).clip(max=num_wrong - 1)
    ids = np.where(correct, 0, wrong)
    valid = rng.random((queries, k, m)) < np.where(correct, valid_correct, valid_wrong)[..., None]
    return torch.from_numpy(ids).long(), torch.from_numpy(valid)


def _stderr(acc: float, n: int) -> float:
    return math.sqrt(max(acc * (1 - acc), 0.0) / n)


def simulate(*, queries: int = 4000, k: int = 32, m: int = 5, noise_levels=NOISE_LEVELS, seed: int = 0) -> dict:
    """Accuracy of CLR and majority vote (plus pass@1, pass@K) at each judge noise level, on shared samples."""
    rng = np.random.default_rng(seed)
    ids, valid = sample_queries(queries, k, m, rng=rng)
    num_clusters = int(ids.max()) + 1
    majority = clr_aggregate(ids, torch.ones(queries, k, 1), num_clusters=num_clusters).chosen
    majority_acc = (majority == 0).double().mean().item()
    pass_at_1 = (ids == 0).double().mean().item()
    pass_at_k = (ids == 0).any(1).double().mean().item()
    rows = []
    for noise in noise_levels:
        flips = torch.from_numpy(rng.random((queries, k, m)) < noise)
        verdicts = (valid ^ flips).double()  # [Q, K, M]
        clr = (clr_aggregate(ids, verdicts, num_clusters=num_clusters).chosen == 0).double().mean().item()
        rows.append({"noise": noise, "clr": clr, "clr_se": _stderr(clr, queries), "majority": majority_acc,
                     "majority_se": _stderr(majority_acc, queries)})  # fmt: skip
    return {
        "params": {"queries": queries, "k": k, "m": m, "seed": seed, "num_wrong": 4, "p_correct": [0.05, 0.65],
                   "claim_valid_if_correct": 0.9, "claim_valid_if_wrong": 0.6, "distractor_dirichlet": 0.5},
        "pass_at_1": pass_at_1,
        "pass_at_k": pass_at_k,
        "rows": rows,
        "clr_beats_majority_up_to": max((r["noise"] for r in rows if r["clr"] > r["majority"]), default=None),
    }  # fmt: skip


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["noise"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(x, [r["clr"] for r in rows], yerr=[r["clr_se"] for r in rows], marker="o", label="CLR", capsize=2)
    ax.errorbar(x, [r["majority"] for r in rows], yerr=[r["majority_se"] for r in rows], marker="s", capsize=2,
                label="majority vote")  # fmt: skip
    ax.axhline(result["pass_at_k"], color="grey", linestyle="--", label="pass@K (ceiling)")
    ax.axhline(result["pass_at_1"], color="grey", linestyle=":", label="mean pass@1")
    p = result["params"]
    ax.set_xlabel("judge noise (probability a verdict is flipped)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"CLR vs majority vote, simulated (Q={p['queries']}, K={p['k']}, M={p['m']})")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the PNG goes (the JSON: simulation/)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    result = simulate(queries=args.queries, seed=args.seed)
    print(f"mean pass@1 {result['pass_at_1']:.3f}, pass@K {result['pass_at_k']:.3f}")
    print("noise | CLR            | majority")
    for r in result["rows"]:
        clr, majority = f"{r['clr']:.3f} +- {r['clr_se']:.3f}", f"{r['majority']:.3f} +- {r['majority_se']:.3f}"
        print(f"{r['noise']:.2f}  | {clr} | {majority}")
    print(f"CLR beats majority vote up to noise {result['clr_beats_majority_up_to']}")
    if not args.no_write:
        result = {"machine": machine_info()} | result
        json_path = args.out_dir / "simulation" / "clr_simulation.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print("wrote", plot(result, args.out_dir / "clr_simulation.png"), "and", json_path)
    return result


if __name__ == "__main__":
    main()

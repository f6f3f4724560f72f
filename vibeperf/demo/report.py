"""The demo's report folder: index.md (accuracy table, per-stage links and plots) and the demo's own plots.

The stages write their own metrics and plots (SFT: metrics.jsonl, loss.png; RL: metrics.jsonl, reward.png,
length.png; eval: results.jsonl, summary.json, pass_at_k.png; distill and CLR: JSONL and summary.json). This module
adds accuracy.png (held-out accuracy after each stage), pass_at_k.png (the sampled pass@k curves of every stage on
one plot), clr.png (CLR against majority vote and pass@1/pass@K) and the index that links everything.
"""

from __future__ import annotations

import os
from pathlib import Path

from vibeperf.demo import slug

COLUMNS = (("greedy_accuracy", "greedy accuracy"), ("sampled_accuracy", "pass@1 (T=1)"))


def accuracy_table(evals: list[dict]) -> str:
    """A Markdown table: one row per evaluated stage, held-out greedy accuracy, sampled pass@1 and pass@n."""
    n = len(evals[0]["pass_at_k"]["math"]) if evals and "math" in evals[0]["pass_at_k"] else 0
    head = ["stage", *[name for _, name in COLUMNS], f"math pass@{n} (T=1)", "mean response tokens"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in evals:
        cells = [row["stage"], *[f"{row[key]:.1%}" for key, _ in COLUMNS]]
        cells.append(f"{row['pass_at_k']['math'][-1]:.1%}" if n else "-")
        cells.append(f"{row['mean_tokens']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def domain_table(evals: list[dict]) -> str:
    """A Markdown table of sampled pass@1 (T=1) per domain and subdomain, one row per evaluated stage."""
    groups = list(evals[0]["pass_at_k"]) if evals else []
    lines = ["| stage | " + " | ".join(groups) + " |", "|---" + "|---:" * len(groups) + "|"]
    for row in evals:
        lines.append(f"| {row['stage']} | " + " | ".join(f"{row['pass_at_k'][g][0]:.1%}" for g in groups) + " |")
    return "\n".join(lines)


def rl_phase_lines(metrics_path: Path) -> list[str]:
    """One line per RL phase: reward mean and mean response length at its first and last logged steps."""
    import json

    if not metrics_path.exists():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    lines = []
    for phase in dict.fromkeys(r.get("phase") for r in rows if "reward_mean" in r):
        p = [r for r in rows if r.get("phase") == phase and "reward_mean" in r]
        lines.append(f"- RL phase {phase}: steps {p[0]['step']}-{p[-1]['step']}, training reward "
                     f"{p[0]['reward_mean']:.3f} -> {p[-1]['reward_mean']:.3f}, mean response length "
                     f"{p[0]['response_length_mean']:.1f} -> {p[-1]['response_length_mean']:.1f} tokens")  # fmt: skip
    return lines


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def plot_accuracy(evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = range(len(evals))
    for key, name in COLUMNS:
        ax.plot(xs, [100 * r[key] for r in evals], marker="o", label=name)
    ax.set_xticks(list(xs), [r["stage"] for r in evals])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_pass_at_k(evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for row in evals:
        curve = row["pass_at_k"].get("math", [])
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker="o", label=row["stage"])
    ax.set_xlabel("k")
    ax.set_ylabel("held-out math pass@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_clr(clr: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = clr.get("accuracy") or {}
    names = ("pass_at_1", "majority", "clr", "pass_at_k")
    labels = ("mean pass@1", "majority vote", "CLR", f"pass@{clr['num_candidates']}")
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    bars = ax.bar(labels, [100 * acc.get(n, 0.0) for n in names], color=["#999", "#4c72b0", "#dd8452", "#ccc"])
    ax.bar_label(bars, fmt="%.0f%%")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"CLR vs majority vote: {clr['queries']} queries, K={clr['num_candidates']}, M={clr['num_claims']}")
    _save(fig, path)


def write_report(out: Path, summary: dict) -> Path:
    """Write the plots and index.md into `out`; returns the index's path."""
    evals, clr = summary["evals"], summary["clr"]
    plot_accuracy(evals, out / "accuracy.png")
    plot_pass_at_k(evals, out / "pass_at_k.png")
    plot_clr(clr, out / "clr.png")
    acc = clr.get("accuracy") or {}
    size, timing = summary["size"], summary["timings_s"]
    stages = [
        ("SFT stage 1 (broad: short solutions, some long)", "sft_stage1", ["metrics.jsonl", "loss.png"]),
        ("SFT stage 2 (long samples the stage-1 model fails)", "sft_stage2", ["metrics.jsonl", "loss.png"]),
        ("MGPO RL + Long2Short", "rl", ["metrics.jsonl", "reward.png", "length.png", "static_filter"]),
        ("self-distillation (sampling, selection; seconds include its SFT)", "distill",
         ["candidates.jsonl", "distilled.jsonl", "summary.json"]),
        ("self-distillation SFT", "sft_distill", ["metrics.jsonl", "loss.png"]),
        ("CLR inference", "clr", ["clr.jsonl", "summary.json"]),
    ]  # fmt: skip
    lines = [
        "# vibeperf demo: the VibeThinker recipe on the tiny model", "",
        f"Seed {summary['seed']}, {summary['seconds']:.0f} s in all. Held-out problems: {size['heldout']} "
        "(add / sub / algebra word problems and stdin/stdout code tasks whose prompts never appear in training). "
        f"Greedy accuracy is one greedy answer per problem; pass@1 (T=1) is the mean over {size['eval_samples']} "
        "samples at temperature 1.", "",
        accuracy_table(evals), "",
        "Per domain and subdomain (pass@1, T=1):", "", domain_table(evals), "",
        "![held-out accuracy](accuracy.png)", "", "![pass@k](pass_at_k.png)", "",
        "## Stages", "",
        "| stage | seconds | files |", "|---|---:|---|",
    ]  # fmt: skip
    for title, folder, names in stages:
        links = ", ".join(f"[{n}]({folder}/{n})" for n in names if (out / folder / n).exists())
        secs = {"sft_stage1": "SFT stage 1", "sft_stage2": "SFT stage 2", "rl": "MGPO RL",
                "distill": "self-distillation", "clr": "CLR"}.get(folder)  # fmt: skip
        lines.append(f"| {title} | {timing.get(secs, '') if secs else ''} | {links} |")
    links = ", ".join(f"[{r['stage']}](eval/{slug(r['stage'])}/sampled/summary.json)" for r in evals)
    lines += ["", f"Evaluations (each: greedy and sampled results.jsonl, summary.json, pass_at_k.png): {links}", ""]
    lines += [*rl_phase_lines(out / "rl" / "metrics.jsonl"), "",
              "Training rewards are on the prompts the static filter kept (neither always nor never solved). "
              "Long2Short moves the reward of correct answers by at most 0.2 towards the shorter ones of a group; "
              "the tiny model writes one template per subdomain, so the correct answers of a group differ by a few "
              "tokens and the length changes little.", ""]  # fmt: skip
    for title, folder, png in (
        ("SFT loss, stage 1", "sft_stage1", "loss.png"),
        ("SFT loss, stage 2", "sft_stage2", "loss.png"),
        ("RL reward", "rl", "reward.png"),
        ("RL response length", "rl", "length.png"),
    ):
        if (out / folder / png).exists():
            lines += [f"### {title}", "", f"![{title}]({folder}/{png})", ""]
    lines += [
        "## CLR inference vs majority vote", "",
        f"The final model answers {clr['queries']} held-out math problems {clr['num_candidates']} times each, extracts "
        f"{clr['num_claims']} claims per answer and judges them itself (probability verdicts). Accuracy: CLR "
        f"{acc.get('clr', 0):.1%}, majority vote {acc.get('majority', 0):.1%}, mean pass@1 "
        f"{acc.get('pass_at_1', 0):.1%}, pass@{clr['num_candidates']} {acc.get('pass_at_k', 0):.1%}; CLR picked "
        f"another answer than the majority on {clr['clr_differs_from_majority']} queries. The tiny model was never "
        "trained to extract or judge claims, so its verdicts are close to noise: this shows the pipeline, not a gain.",
        "", "![CLR vs majority](clr.png)", "",
        "## Files", "",
        "- final checkpoint (Hugging Face format): [final_checkpoint](final_checkpoint)",
        "- task set: [data](data)", "- everything above as JSON: [summary.json](summary.json)", "",
    ]  # fmt: skip
    index = out / "index.md"
    index.write_text("\n".join(lines))
    return index

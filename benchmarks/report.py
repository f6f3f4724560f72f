"""Turns benchmarks/results/*.json into the README's performance table and PNG plots (never typed by hand).

    python -m benchmarks.report            # rewrite the table between the README markers + plots
    python -m benchmarks.report --check    # exit 1 when the README table is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
TITLES = {
    "B1": "B1 log-prob forward (no grad)",
    "B2": "B2 cross-entropy forward+backward",
    "B2-llama3": "B2 cross-entropy forward+backward at the Llama-3 head (H 4,096, V 128,256)",
    "B3": "B3 policy losses (MGPO and the policy-loss family) forward+backward (16 x 4,096)",
    "B4": "B4 packed SFT step, Qwen2.5-3B shape (vibeperf.bench.b4_sft; on the H200: packed-default = vibeperf's "
          "defaults)",
    "B4-recompiles": "B4 packed SFT step at 20037eb, where Triton compiled kernels again inside it for new token "
                     "counts (fixed in 9e99cb2 and a2c8398; benchmarks/NOTES.md)",
    "B4-eager": "B4 survey of body switches without compile, with TRL and the padded floor",
    "B4-switches": "B4 survey of body switches with compile, with TRL (with and without gradient checkpointing)",
    "B4-long": "B4 one 64K-token row with AdamW state, checkpoint policy auto at a 74 GiB budget (an 80 GB GPU)",
    "B4-long128": "B4 one 128K-token row with AdamW state, checkpoint policy auto at a 74 GiB budget (an 80 GB GPU)",
    "B5": "B5 64K-token NLL scoring",
    "B6": "B6 CLR aggregation",
    "B7": "B7 RL policy update, Qwen2.5-3B shape, on-policy skip vs old-log-prob pass (vibeperf.bench.b7_rl)",
    "B7-long": "B7 with 64K-token completions, checkpoint policy auto at a 74 GiB budget (an 80 GB GPU)",
    "P-forward": "Per-kernel device time, log-prob forward (vibeperf.bench.profile_backends)",
    "P-train": "Per-kernel device time, cross-entropy forward+backward (vibeperf.bench.profile_backends)",
    "P-train-llama3": "Per-kernel device time, cross-entropy forward+backward at the Llama-3 head "
                      "(vibeperf.bench.profile_backends)",
    "P-forward-llama3": "Per-kernel device time, log-prob forward at the Llama-3 head "
                        "(vibeperf.bench.profile_backends)",
    "P-mgpo": "Per-kernel device time, MGPO loss forward+backward (vibeperf.bench.profile_backends)",
    "D4": "D4 Qwen2.5-3B-shaped SFT step under FSDP2, 1 vs 2 GPUs (vibeperf.bench.dist_check)",
}


def _natural(name: str) -> list:
    """A file name's sort key with its digit runs as numbers: tag "train11" after "train9"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every results file, oldest first (by date, then name, its numbers compared as numbers)."""
    docs = [json.loads(p.read_text()) | {"_file": p.name} for p in sorted(results_dir.glob("*.json"))]
    return sorted(docs, key=lambda d: (d["machine"]["date"], _natural(d["_file"])))


def latest_rows(docs: list[dict]) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(gpu, id) -> the newest file's rows for it (a later file replaces a benchmark id's rows as a whole)."""
    out: dict[tuple[str, str], tuple[dict, dict]] = {}
    for doc in docs:
        by_id = defaultdict(list)
        for r in doc["results"]:
            by_id[r["id"]].append(r)
        for bid, rows in by_id.items():
            out[(doc["machine"]["gpu"], bid)] = (doc, rows)
    return out


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def render_table(docs: list[dict]) -> str:
    lines = []
    for (gpu, bid), (doc, rows) in sorted(latest_rows(docs).items()):
        m = doc["machine"]
        peak = f"peak bf16 matmul in the same run {doc['peak_tflops']:.0f} TFLOP/s; " if doc["peak_tflops"] else ""
        note = f". Note: {m['note']}." if m.get("note") else ""
        lines += [
            f"**{TITLES.get(bid, bid)}** on {gpu} ({peak}CUDA {m['cuda']}, torch {m['torch']}, triton {m['triton']}, "
            f"commit {m['commit']}, {m['date']}; `{doc['_file']}`){note}",
            "",
            "| impl | N tokens | ms | fraction of peak | extra memory (GiB) | checked | note |",
            "|---|---:|---:|---:|---:|:-:|---|",
        ]
        for r in sorted(rows, key=lambda r: (r["n_tokens"], r["impl"])):
            lines.append(
                f"| {r['impl']} | {r['n_tokens']:,} | {_fmt(r['ms'], '.2f')} | {_fmt(r['frac_of_peak'], '.3f')} | "
                f"{_fmt(r['extra_mem_gib'], '.3f')} | {'yes' if r['correct'] else 'no'} | {r.get('note', '')} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(docs: list[dict], out_dir: Path = RESULTS_DIR) -> list[Path]:
    """One PNG per (gpu, benchmark id): ms vs N for every implementation that passed its check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (gpu, bid), (_, rows) in sorted(latest_rows(docs).items()):
        series = defaultdict(list)
        for r in rows:
            if r["correct"] and r["ms"] is not None:
                series[r["impl"]].append((r["n_tokens"], r["ms"]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N tokens")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{TITLES.get(bid, bid)}\n{gpu}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        path = out_dir / f"{bid}_{gpu.replace(' ', '-')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def updated_readme(text: str, table: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md lacks the markers {BEGIN} / {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the README table is current")
    args = ap.parse_args(argv)
    docs = load_results()
    text = README.read_text()
    new = updated_readme(text, render_table(docs))
    if args.check:
        if new != text:
            print("README.md's performance table is stale: run `python -m benchmarks.report`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    for p in plot(docs):
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writes the table behind backend="auto" (kernels/lmhead/backend_table.json) from the benchmark results.

    python -m benchmarks.backend_table            # rewrite the table from benchmarks/results/*.json
    python -m benchmarks.backend_table --check    # exit 1 when the committed table is stale (used by the tests)

For every GPU, the newest results of B1 (scoring forward, work "forward"), B2 (cross-entropy forward+backward, work
"train") and B3 (MGPO loss, work "mgpo"): one entry per token count at which both `vibeperf-triton` and
`vibeperf-cuda` ran and passed their correctness check in the same run, with both times and the winner ("cuda" only
when at least `autoselect.CUDA_MARGIN` faster). The rule that reads it: kernels/lmhead/autoselect.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from vibeperf.kernels.lmhead import autoselect

from .report import latest_rows, load_results

WORK_OF = {"B1": "forward", "B2": "train", "B3": "mgpo"}
SHAPE = {"dtype": "bfloat16", "H": 2048, "V": 151_936}  # every B1-B3 input: the Qwen2.5-3B LM head in bf16


def build_table(docs: list[dict]) -> dict:
    entries = []
    for (gpu, bid), (doc, rows) in sorted(latest_rows(docs).items()):
        if bid not in WORK_OF:
            continue
        ok = {(r["impl"], r["n_tokens"]): r["ms"] for r in rows if r["correct"] and r["ms"] is not None}
        for n in sorted({n for impl, n in ok if impl == "vibeperf-cuda"}):
            if ("vibeperf-triton", n) not in ok:
                continue
            triton_ms, cuda_ms = ok[("vibeperf-triton", n)], ok[("vibeperf-cuda", n)]
            winner = "cuda" if cuda_ms <= (1 - autoselect.CUDA_MARGIN) * triton_ms else "triton"
            entries.append({"gpu": gpu, "work": WORK_OF[bid], **SHAPE, "N": n, "triton_ms": round(triton_ms, 3),
                            "cuda_ms": round(cuda_ms, 3), "winner": winner, "source": doc["_file"]})  # fmt: skip
    return {"generated_by": "python -m benchmarks.backend_table", "cuda_margin": autoselect.CUDA_MARGIN,
            "entries": entries}  # fmt: skip


def render(table: dict) -> str:
    return json.dumps(table, indent=1) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when the committed table is stale")
    args = ap.parse_args(argv)
    text = render(build_table(load_results()))
    current = autoselect.TABLE.read_text() if autoselect.TABLE.exists() else ""
    if args.check:
        if current != text:
            print(f"{autoselect.TABLE} is stale: run `python -m benchmarks.backend_table`", file=sys.stderr)
            return 1
        return 0
    autoselect.TABLE.write_text(text)
    for e in json.loads(text)["entries"]:
        print(f"{e['gpu']:<24} {e['work']:<8} N={e['N']:>6}  triton {e['triton_ms']:8.2f} ms  "
              f"cuda {e['cuda_ms']:8.2f} ms  -> {e['winner']}")  # fmt: skip
    print(f"wrote {autoselect.TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regression checks of benchmark runs: what a new run must meet, from a saved run or from the committed floors.

Both inputs become `Expectation`s on cases (id, impl, n_tokens) and one code path checks them:
- a saved results file (`vibeperf bench --save`): every case that ran and passed its correctness check there must
  not be slower now than its old time by more than the tolerance (metric "ms");
- the committed floors (`floors.json` beside this file, per GPU name): our fraction of peak must stay at or above
  the floor ("frac_of_peak") and our speed-up over the best baseline measured in the same run at or above its floor
  ("speedup"); the floors already sit below the committed results by the run-to-run noise, so no tolerance is added.
A case that did not run or failed its correctness check now is a regression whatever its time.

`default_baseline(gpu)` is what `vibeperf bench --compare` (with no file) and tests/test_perf_regression.py use: the
committed floors of this GPU when there are any, else the user's own saved run for it
(`$VIBEPERF_CACHE/bench/<gpu>.json`, written by `vibeperf bench --save` with no file), else nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

FLOORS = Path(__file__).with_name("floors.json")
Metric = Literal["ms", "frac_of_peak", "speedup"]


@dataclasses.dataclass(frozen=True)
class Expectation:
    """One bound a run must meet: `metric` of case (id, impl, n_tokens) against `old` within `tolerance`; `key` is
    the registry entry that runs the case (B3's policy-loss rows have row id "B3" and key "B3-policy")."""

    id: str
    impl: str
    n_tokens: int
    metric: Metric
    old: float
    tolerance: float = 0.0
    baselines: tuple[str, ...] = ()  # for "speedup": the implementations whose best time ours is divided into
    key: str = ""  # "" until resolved: the id itself

    @property
    def bench(self) -> str:
        return self.key or self.id


@dataclasses.dataclass(frozen=True)
class Verdict:
    expectation: Expectation
    new: float | None
    ok: bool
    note: str

    @property
    def ratio(self) -> float | None:
        """new / old (for "ms", above 1 is slower)."""
        return None if self.new is None else self.new / self.expectation.old


def parse_tolerance(text: str) -> float:
    """`5%` or `0.05` -> 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"--tolerance: expected a percentage like 5% or a fraction like 0.05, got {text!r}") from None
    if not 0 <= value < 10:
        raise ValueError(f"--tolerance: expected a value in [0%, 1000%), got {text!r}")
    return value


def user_baseline_path(gpu: str) -> Path:
    root = Path(os.environ.get("VIBEPERF_CACHE") or Path.home() / ".cache" / "vibeperf")
    return root / "bench" / f"{gpu.replace(' ', '-').replace('/', '-')}.json"


def from_results(doc: dict, tolerance: float) -> list[Expectation]:
    """Every case of a saved run that ran and passed its check, bound by its time."""
    return [
        Expectation(r["id"], r["impl"], r["n_tokens"], "ms", r["ms"], tolerance)
        for r in doc["results"]
        if r.get("correct") and r.get("ms")
    ]


def from_floors(floors: dict, gpu: str) -> list[Expectation]:
    """The committed floors of `gpu` (none when it has no entry)."""
    out = []
    for key, f in floors.get(gpu, {}).items():
        bid = key.split("-")[0]  # "B3-policy" -> rows of id B3, run by registry entry "B3-policy"
        out.append(Expectation(bid, f["impl"], f["n_tokens"], "frac_of_peak", f["min_frac_of_peak"], key=key))
        out.append(Expectation(bid, f["impl"], f["n_tokens"], "speedup", f["min_speedup_vs_best_baseline"],
                               baselines=tuple(f["baselines"]), key=key))  # fmt: skip
    return out


def load(path: str | os.PathLike, gpu: str, tolerance: float) -> tuple[list[Expectation], str]:
    """The expectations in `path` (a saved run, or a floors file) and a line saying what they are."""
    doc = json.loads(Path(path).read_text())
    if "results" in doc:
        machine = doc.get("machine", {})
        other = f" (measured on {machine.get('gpu')}, this is {gpu})" if machine.get("gpu") not in (None, gpu) else ""
        return from_results(doc, tolerance), f"saved run {path}, commit {machine.get('commit', '?')}{other}"
    return from_floors(doc, gpu), f"floors of {gpu} in {path}"


def default_baseline(gpu: str, tolerance: float) -> tuple[list[Expectation], str] | None:
    """The committed floors of `gpu`, else the user's saved run for it, else None."""
    floors = from_floors(json.loads(FLOORS.read_text()), gpu)
    if floors:
        return floors, f"committed floors of {gpu} ({FLOORS})"
    saved = user_baseline_path(gpu)
    return load(saved, gpu, tolerance) if saved.exists() else None


def resolve_keys(expectations: list[Expectation], registry: dict) -> list[Expectation]:
    """Each expectation with the registry entry that runs it: the one of its id that has its implementation."""
    out = []
    for e in expectations:
        if not e.key:
            keys = [k for k, b in registry.items() if b.id == e.id and e.impl in b.impls]
            e = dataclasses.replace(e, key=keys[0] if keys else e.id)
        out.append(e)
    return out


def cases(expectations: list[Expectation]) -> dict[str, dict[int, set[str]]]:
    """What to run: registry key -> token count -> implementations (baselines of speed-ups included)."""
    out: dict[str, dict[int, set[str]]] = {}
    for e in expectations:
        out.setdefault(e.bench, {}).setdefault(e.n_tokens, set()).update({e.impl, *e.baselines})
    return out


def evaluate(expectations: list[Expectation], rows: dict[str, list]) -> list[Verdict]:
    """Each expectation checked against a new run: registry key -> its rows (`common.Row`s or their dicts)."""
    by_case = {}
    for key, key_rows in rows.items():
        for r in key_rows:
            r = r if isinstance(r, dict) else dataclasses.asdict(r)
            by_case[(key, r["impl"], r["n_tokens"])] = r
    verdicts = []
    for e in expectations:
        row = by_case.get((e.bench, e.impl, e.n_tokens))
        if row is None or not row["correct"] or row["ms"] is None:
            why = "not run" if row is None else (row["note"] or "no time")
            verdicts.append(Verdict(e, None, False, f"REGRESSION: {why}"))
            continue
        if e.metric == "ms":
            new, ok = row["ms"], row["ms"] <= e.old * (1 + e.tolerance)
        elif e.metric == "frac_of_peak":
            new, ok = row["frac_of_peak"], row["frac_of_peak"] >= e.old * (1 - e.tolerance)
        else:
            times = [by_case[k]["ms"] for b in e.baselines
                     if (k := (e.bench, b, e.n_tokens)) in by_case and by_case[k]["correct"] and by_case[k]["ms"]]
            if not times:
                why = f"REGRESSION: none of {', '.join(e.baselines)} ran correctly (pip install 'vibeperf[bench]')"
                verdicts.append(Verdict(e, None, False, why))
                continue
            new = min(times) / row["ms"]
            ok = new >= e.old * (1 - e.tolerance)
        verdicts.append(Verdict(e, new, ok, "ok" if ok else "REGRESSION"))
    return verdicts


def format_verdicts(verdicts: list[Verdict]) -> str:
    lines = [f"{'id':<4} {'impl':<18} {'N':>7} {'metric':<13} {'old':>10} {'new':>10} {'ratio':>7}  verdict"]
    for v in verdicts:
        e = v.expectation
        new = f"{v.new:10.3f}" if v.new is not None else f"{'-':>10}"
        ratio = f"{v.ratio:7.3f}" if v.ratio is not None else f"{'-':>7}"
        bound = f"<= {1 + e.tolerance:.2f}x old" if e.metric == "ms" else f">= {1 - e.tolerance:.2f}x old"
        lines.append(f"{e.id:<4} {e.impl:<18} {e.n_tokens:>7} {e.metric:<13} {e.old:10.3f} {new} {ratio}  "
                     f"{v.note} ({bound})")  # fmt: skip
    return "\n".join(lines)

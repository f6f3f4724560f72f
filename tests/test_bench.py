"""`vibeperf bench` on the CPU: its cases are checked before they are timed, `--save` writes the result schema, and
`--compare` reruns a baseline's cases, prints old / new / ratio and fails on a regression (a planted 20% slow-down
with the timer held fixed; a planted 3x one with real timing) and on a case that no longer runs correctly; the
committed floors go through the same compare code (tests/test_perf_regression.py runs them on the GPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vibeperf import cli
from vibeperf.bench import compare, cpu_cases, run
from vibeperf.bench.common import Row

FIXED_MS = 10.0


@pytest.fixture
def fixed_timer(monkeypatch):
    """Every case still runs (and is checked) for real; its time is FIXED_MS, so ratios are exact."""

    def fake(fns, device, **kw):
        return {name: (fn(), FIXED_MS)[1] for name, fn in fns.items()}

    monkeypatch.setattr(run, "interleaved_ms", fake)


def _bench(*args) -> int:
    return cli.main(["bench", "--device", "cpu", "--quick", *map(str, args)])


def _rescaled(doc: dict, factor: dict) -> dict:
    """A copy of a saved run with the old time of each (id, impl) multiplied by factor[(id, impl)] (default 1)."""
    out = json.loads(json.dumps(doc))
    for r in out["results"]:
        if r["ms"] is not None:
            r["ms"] *= factor.get((r["id"], r["impl"]), 1.0)
    return out


def test_save_writes_checked_rows_in_the_result_schema(tmp_path, fixed_timer):
    assert _bench("--save", tmp_path / "r.json") == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {"gpu", "torch", "triton", "commit"} <= set(doc["machine"])
    rows = doc["results"]
    assert {(r["id"], r["impl"]) for r in rows} == {(b, i) for b in ("B1", "B2") for i in ("vibeperf-torch", "eager")}
    for r in rows:
        assert {"id", "impl", "n_tokens", "hidden", "vocab", "ms", "frac_of_peak", "extra_mem_gib", "correct",
                "note"} <= set(r)  # fmt: skip
        assert r["correct"] and r["ms"] == FIXED_MS and r["note"].startswith("rel err")
        assert (r["hidden"], r["vocab"]) == (cpu_cases.H, cpu_cases.V)


def test_compare_fails_on_a_planted_20_percent_regression(tmp_path, fixed_timer, capsys):
    assert _bench("--save", tmp_path / "base.json") == 0
    doc = json.loads((tmp_path / "base.json").read_text())
    (tmp_path / "match.json").write_text(json.dumps(doc))
    (tmp_path / "slower.json").write_text(json.dumps(_rescaled(doc, {("B2", "vibeperf-torch"): 1 / 1.2})))
    (tmp_path / "noise.json").write_text(json.dumps(_rescaled(doc, {("B2", "vibeperf-torch"): 1 / 1.03})))
    capsys.readouterr()
    assert _bench("--compare", tmp_path / "match.json", "--tolerance", "5%", "--save", tmp_path / "o1.json") == 0
    assert "no regression in 4 checks" in capsys.readouterr().out
    assert _bench("--compare", tmp_path / "noise.json", "--tolerance", "5%", "--save", tmp_path / "o2.json") == 0
    assert _bench("--compare", tmp_path / "slower.json", "--tolerance", "5%", "--save", tmp_path / "o3.json") == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if "REGRESSION" in line]
    assert len(bad) == 1 and bad[0].split()[:2] == ["B2", "vibeperf-torch"] and " 1.200 " in bad[0], out
    assert "1 regression(s) in 4 checks" in out
    # --only narrows the compared cases; the regression is in B2
    assert _bench("--compare", tmp_path / "slower.json", "--only", "B1", "--save", tmp_path / "o4.json") == 0


def test_compare_with_real_timing(tmp_path):
    """Unpatched timer: a baseline 3x faster than this machine fails, one 3x slower passes (noise here is far less)."""
    assert _bench("--only", "B1", "--save", tmp_path / "base.json") == 0
    doc = json.loads((tmp_path / "base.json").read_text())
    fast = _rescaled(doc, {("B1", "vibeperf-torch"): 1 / 3, ("B1", "eager"): 1 / 3})
    slow = _rescaled(doc, {("B1", "vibeperf-torch"): 3, ("B1", "eager"): 3})
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    assert _bench("--compare", tmp_path / "fast.json", "--save", tmp_path / "o1.json") == 1
    assert _bench("--compare", tmp_path / "slow.json", "--save", tmp_path / "o2.json") == 0


def test_a_wrong_result_is_never_timed_and_is_a_regression(tmp_path, fixed_timer, monkeypatch, capsys):
    assert _bench("--only", "B1", "--save", tmp_path / "base.json") == 0
    impls = dict(cpu_cases.BENCHMARKS["B1"].impls)
    impls["vibeperf-torch"] = cpu_cases.Impl(lambda x: torch.zeros(x["hidden"].shape[0]))
    monkeypatch.setitem(cpu_cases.BENCHMARKS, "B1", cpu_cases.Benchmark(**{**cpu_cases.BENCHMARKS["B1"].__dict__,
                                                                            "impls": impls}))  # fmt: skip
    capsys.readouterr()
    assert _bench("--compare", tmp_path / "base.json", "--save", tmp_path / "new.json") == 1
    row = next(r for r in json.loads((tmp_path / "new.json").read_text())["results"] if r["impl"] == "vibeperf-torch")
    assert not row["correct"] and row["ms"] is None and row["note"].startswith("WRONG")
    assert "REGRESSION: WRONG" in capsys.readouterr().out


def test_default_baseline_is_the_saved_run_where_no_floors_are_committed(tmp_path, fixed_timer, monkeypatch, capsys):
    monkeypatch.setenv("VIBEPERF_CACHE", str(tmp_path))
    monkeypatch.setenv("VIBEPERF_RESULTS_DIR", str(tmp_path / "results"))
    assert compare.default_baseline("cpu", 0.05) is None
    assert _bench("--compare") == 2
    assert "vibeperf bench --save" in capsys.readouterr().err
    assert _bench("--only", "B1", "--save") == 0
    assert compare.user_baseline_path("cpu").exists()
    assert _bench("--compare") == 0


def test_floors_go_through_the_same_compare():
    floors = json.loads(compare.FLOORS.read_text())
    assert {"NVIDIA H200", "NVIDIA H100 80GB HBM3"} <= set(floors)
    exp = compare.from_floors({"G": {"B1": {"impl": "ours", "n_tokens": 8, "baselines": ["a", "b"],
                                            "min_frac_of_peak": 0.8, "min_speedup_vs_best_baseline": 1.0}}}, "G")
    assert compare.from_floors(floors, "another GPU") == []

    def rows(ours_ms, frac, a_ms, b_ms):
        return [Row("B1", "ours", 8, ours_ms, frac, None, True), Row("B1", "a", 8, a_ms, None, None, True),
                Row("B1", "b", 8, b_ms, None, None, b_ms is not None)]  # fmt: skip

    assert all(v.ok for v in compare.evaluate(exp, {"B1": rows(10.0, 0.85, 12.0, 11.0)}))
    slow = compare.evaluate(exp, {"B1": rows(11.5, 0.85, 12.0, 11.0)})  # best baseline 11.0 / 11.5 < 1.0
    assert [v.ok for v in slow] == [True, False] and slow[1].new == pytest.approx(11.0 / 11.5)
    assert [v.ok for v in compare.evaluate(exp, {"B1": rows(10.0, 0.79, 12.0, None)})] == [False, True]
    wrong = {"B1": [Row("B1", "ours", 8, None, None, None, False, "WRONG")]}
    assert not any(v.ok for v in compare.evaluate(exp, wrong))
    # a floors key names the registry entry; its rows carry the benchmark id (B3-policy -> rows of B3)
    policy = next(e for e in compare.from_floors(floors, "NVIDIA H200") if e.key == "B3-policy")
    assert policy.id == "B3" and policy.bench == "B3-policy"


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), ("0%", 0.0), ("150%", 1.5)])
def test_tolerance(text, value):
    assert compare.parse_tolerance(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["fast", "-5%", "5%%"])
def test_bad_tolerance_is_an_error(text):
    with pytest.raises(ValueError, match="--tolerance"):
        compare.parse_tolerance(text)


def test_interleaved_timing_calls_each_function_in_turn_and_orders_their_costs():
    """`interleaved_ms` (the A/B timing of lmhead_passes): one warm-up round, then rounds that call every function once
    each in a shuffled order, so a drift falls on all alike and no function always follows the same one (on a GPU at
    its power cap a call inherits its predecessor's clock); the medians keep the functions' real order."""
    import time

    from vibeperf.bench.common import interleaved_ms

    calls = []

    def sleeper(name, s):
        return lambda: (calls.append(name), time.sleep(s))

    ms = interleaved_ms({"a": sleeper("a", 0.006), "b": sleeper("b", 0.001), "c": sleeper("c", 0.003)}, "cpu",
                        rounds=4)  # fmt: skip
    assert calls[:3] == list("abc") and all(sorted(calls[i:i + 3]) == list("abc") for i in range(3, 15, 3))
    assert len(calls) == 15
    calls.clear()
    interleaved_ms({k: sleeper(k, 0.0) for k in "abcd"}, "cpu", rounds=40)
    before = {k: {p for p, c in zip(calls[4:], calls[5:]) if c == k} for k in "abcd"}
    assert all(before[k] >= set("abcd") - {k} for k in "abcd"), before  # each has followed every other one
    assert ms["b"] < ms["c"] < ms["a"] and ms["b"] >= 1.0
    calls.clear()  # with rep_ms: about rep_ms of timed calls each (a 10 ms round: 60 ms x 2 functions -> 12 rounds)
    interleaved_ms({"a": sleeper("a", 0.002), "b": sleeper("b", 0.008)}, "cpu", rounds=3, rep_ms=60)
    assert calls.count("a") == calls.count("b") and 8 <= calls.count("a") - 1 <= 16
    with pytest.raises(ValueError, match="at least one function and one round"):
        interleaved_ms({}, "cpu")


def test_liger_chunk_rows_follow_liger_kernels_rule():
    """Liger-Kernel 0.8.5's logits chunk: next_power_of_2(ceil(N / ceil(V / H))) rows, so a chunk's logits take about
    the hidden states' memory (Qwen2.5 head: ceil(151,936 / 2,048) = 75)."""
    from vibeperf.bench.registry import liger_chunk_rows

    assert [liger_chunk_rows(n, 2048, 151_936) for n in (1, 75, 76, 8192, 65_536)] == [1, 1, 2, 128, 1024]
    assert [liger_chunk_rows(n, 4096, 128_256) for n in (4096, 8192, 16_384)] == [128, 256, 512]


def test_precision_mode_rows_run_under_their_setting_and_restore_it(monkeypatch):
    """The B2 rows of the non-default precision modes set $VIBEPERF_LMHEAD_DW_ACC / $VIBEPERF_LMHEAD_GRAD for their call
    only: a value set before is restored, an unset variable is unset again."""
    from vibeperf.bench import registry

    monkeypatch.setenv("VIBEPERF_LMHEAD_DW_ACC", "fp32")
    monkeypatch.delenv("VIBEPERF_LMHEAD_GRAD", raising=False)
    seen = []
    run = registry.dw_acc_weight(lambda x: seen.append(os.environ["VIBEPERF_LMHEAD_DW_ACC"]) or x)
    assert run(7) == 7 and seen == ["weight"]
    assert os.environ["VIBEPERF_LMHEAD_DW_ACC"] == "fp32"
    run = registry.grad_form_rows(lambda x: seen.append(os.environ["VIBEPERF_LMHEAD_GRAD"]) or x)
    assert run(8) == 8 and seen == ["weight", "rows"]
    assert "VIBEPERF_LMHEAD_GRAD" not in os.environ


def test_timing_modes_reads_the_clock_log_and_refuses_bad_cases(capsys):
    """vibeperf.bench.timing_modes: nvidia-smi's samples parsed (headers and [N/A] skipped), averaged per block; a
    bad --cases / --impls is a one-line error before any GPU work."""
    import datetime

    from vibeperf.bench import timing_modes

    log = ("timestamp, clocks.current.sm [MHz], power.draw [W]\n"
           "2026/12/01 19:47:30.100, 1400 MHz, 690.00 W\n"
           "2026/12/01 19:47:30.200, 1600 MHz, 700.00 W\n"
           "2026/12/01 19:47:30.300, [N/A], 700.00 W\n"
           "2026/12/01 19:47:31.000, 345 MHz, 77.00 W\n")  # fmt: skip
    samples = timing_modes.parse_smi_log(log)
    assert [(s[1], s[2]) for s in samples] == [(1400, 690), (1600, 700), (345, 77)]
    t = lambda s: datetime.datetime.strptime(f"2026/12/01 19:47:{s}", timing_modes.STAMP)  # noqa: E731
    assert timing_modes.block_means(samples, t("30.000"), t("30.500")) == (1500, 695)
    assert timing_modes.block_means(samples, t("32.000"), t("33.000")) is None
    for argv, message in ((["--cases", "B9:8"], "'B9:8' is not <benchmark>:<tokens>"),
                          (["--cases", "B2:x"], "'B2:x' is not"),
                          (["--cases", "B2:8", "--impls", "nope"], "B2 has no nope")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            timing_modes.main(argv)

"""The README's performance table is generated from benchmarks/results/*.json, and is current."""

import json

from benchmarks import report


def _doc(date, rows):
    machine = {"gpu": "GPU X", "cuda": "13.0", "torch": "2.11", "triton": "3.6", "commit": "abc", "date": date}
    return {"machine": machine, "peak_tflops": 700.0, "results": rows}


def _row(impl, n, ms, correct=True):
    return {"id": "B1", "impl": impl, "n_tokens": n, "ms": ms, "frac_of_peak": 0.5, "extra_mem_gib": 0.1,
            "correct": correct, "note": ""}  # fmt: skip


def test_table_uses_the_newest_file_per_benchmark(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_doc("2026-01-01", [_row("old", 8, 1.0)])))
    (tmp_path / "b.json").write_text(json.dumps(_doc("2026-02-01", [_row("new", 8, 2.0), _row("bad", 8, None, False)])))
    table = report.render_table(report.load_results(tmp_path))
    assert "| new | 8 | 2.00 |" in table and "| old |" not in table and "| bad | 8 | - |" in table
    assert "b.json" in table
    pngs = report.plot(report.load_results(tmp_path), tmp_path)
    assert [p.name for p in pngs] == ["B1_GPU-X.png"] and pngs[0].stat().st_size > 0


def test_readme_table_is_current():
    assert report.main(["--check"]) == 0, "run `python -m benchmarks.report` and commit README.md"


def test_same_day_files_order_by_their_numbers(tmp_path):
    """Files of one date order by name with digit runs read as numbers: a run tagged train11 is newer than train9."""
    for tag, impl in (("train9", "nine"), ("train11", "eleven"), ("train10", "ten")):
        (tmp_path / f"X_2026-02-01_{tag}.json").write_text(json.dumps(_doc("2026-02-01", [_row(impl, 8, 1.0)])))
    assert [d["_file"] for d in report.load_results(tmp_path)] == [
        "X_2026-02-01_train9.json",
        "X_2026-02-01_train10.json",
        "X_2026-02-01_train11.json",
    ]
    table = report.render_table(report.load_results(tmp_path))
    assert "| eleven |" in table and "| nine |" not in table

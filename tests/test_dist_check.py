"""vibeperf/bench/dist_check.py, the multi-GPU check, in its --cpu mode (gloo, tiny model): the whole script as the GPU
machine runs it, so that it is known to work before its one run there; and its failure isolation (a launch that dies
inside a part is reported and restarted with the parts after it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from vibeperf.bench import dist_check

ROOT = Path(__file__).resolve().parents[1]


def test_dist_check_cpu_mode(tmp_path):
    out = tmp_path / "dist.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vibeperf.bench.dist_check", "--cpu", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    extra = doc["extra"]
    assert extra["ok"] and extra["cpu"]
    runs, checks = extra["runs"], extra["checks"]
    assert sorted(runs["2"]) == ["rl", "scale", "sft"] and sorted(runs["1"]) == ["resume", "rl", "scale", "sft"]
    assert not any("error" in r for w in runs.values() for r in w.values())
    # fp32 on the CPU: the 2-process runs equal the 1-process ones to fp32 noise, far below the O(lr) gap of an error
    for name in ("sft", "resume", "rl"):
        p = checks[name]["params"]
        assert p["max_abs"] < 1e-6 and p["mean_abs"] < 1e-4 * p["mean_update"], (name, p)  # measured: < 5e-6 of it
        assert checks[name]["loss"]["within"], name
    assert checks["rl"]["rollouts_equal_per_step"] == [True] * runs["1"]["rl"]["steps"]
    assert checks["rl"]["push_gap_max"] == [0.0] * runs["2"]["rl"]["steps"]
    assert checks["scale"]["tokens_per_s_1"] > 0 and checks["scale"]["tokens_per_s_2"] > 0
    assert [r["impl"] for r in doc["results"]] == ["fsdp2-1gpu", "fsdp2-2gpu"]
    assert "scaling efficiency" in proc.stdout and "dist_check passed" in proc.stdout


def test_a_launch_that_dies_in_a_part_is_restarted_after_it(tmp_path, monkeypatch):
    launches = []

    def fake_launch(work, world, parts, cpu, timeout, log):
        """First launch: "a" succeeds, "b" starts and the launch dies; later launches succeed."""
        launches.append(list(parts))
        out = work / f"w{world}"
        for part in parts:
            (out / f"{part}.started").write_text("")
            if part == "b" and len(launches) == 1:
                log.write("Traceback: rank 1 died in b\n")
                return 1
            (out / f"{part}.json").write_text(json.dumps({"part": part}))
        return 0

    monkeypatch.setattr(dist_check, "launch", fake_launch)
    results = dist_check.run_world(tmp_path, 2, ["a", "b", "c", "d"], True, deadline=float("inf"))
    assert launches == [["a", "b", "c", "d"], ["c", "d"]]
    assert results["a"] == {"part": "a"} and results["c"] == {"part": "c"} and results["d"] == {"part": "d"}
    assert "inside this part" in results["b"]["error"] and "rank 1 died in b" in results["b"]["log_tail"]

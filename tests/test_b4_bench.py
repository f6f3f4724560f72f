"""B4 runs end to end at a toy size on the CPU (the smoke test of the GPU command): every kind of method (packed
with checkpoint policies and bf16 master weights, the padded floor, TRL padding-free) on both mixes, a long row
with offloaded checkpointing and the profile option; every method's first-step loss agrees with the first one's."""

from __future__ import annotations

import importlib.util
import json

import pytest

from vibeperf.bench import b4_sft


@pytest.mark.slow
def test_b4_tiny_runs_every_kind_of_method(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIBEPERF_RESULTS_DIR", str(tmp_path))
    methods = "packed,packed-ckpt-save-matmuls,packed-bf16-master,padded"
    if importlib.util.find_spec("trl") is not None:
        methods += ",trl-padding-free-liger"
    argv = ["--tiny", "--methods", methods, "--samples", "2", "--stage2-samples", "1", "--steps", "1"]
    argv += ["--max-len", "96"]
    rc = b4_sft.main([*argv, "--long", "300:offload", "--profile", "packed", "--tag", "B4tiny"])
    assert rc == 0
    (path,) = tmp_path.glob("*_B4tiny.json")
    doc = json.loads(path.read_text())
    rows = {r["impl"]: r for r in doc["results"]}
    expected = {f"{mix}:{m}" for mix in ("lognormal", "stage2") for m in methods.split(",")}
    expected = {e for e in expected if e != "stage2:padded"} | {"packed-long-300-offload"}  # padded: lognormal only
    if "trl" in methods and importlib.util.find_spec("liger_kernel") is None:
        expected = {e.replace("-liger", "-noliger") for e in expected}
    assert set(rows) == expected
    for impl, r in rows.items():
        assert r["correct"], (impl, r["note"])
        assert r["ms"] > 0
    assert doc["extra"]["methods"]["lognormal:packed-ckpt-save-matmuls"]["body"]["checkpoint"] == {"save-matmuls": 2}
    assert "lognormal:profile:packed" in doc["extra"]["methods"]


def test_b4_rejects_unknown_method():
    with pytest.raises(SystemExit, match="unknown method"):
        b4_sft.select_methods("packed,nope", tiny=True)


def test_step_profile_categories():
    from vibeperf.bench.step_profile import categorize

    cases = {
        "flash_fwd_kernel<Flash_fwd_kernel_traits>": "attention",
        "lmhead_row_grad_kernel": "lm_head",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": "matmuls",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "norms+activations",
        "Memcpy DtoD (Device -> Device)": "other",
    }
    for name, cat in cases.items():
        assert categorize(name) == cat, name


def test_b4_methods_compose_switches():
    m = b4_sft.parse_method("packed-compile-ckpt-every2-bf16-master+liger")
    assert (m.compile, m.checkpoint, m.every, m.precision, m.liger) == (True, "full", 2, "bf16-master", True)
    m = b4_sft.parse_method("packed-ckpt-save-matmuls")
    assert (m.compile, m.checkpoint, m.every) == (False, "save-matmuls", 1)
    assert b4_sft.parse_method("packed-default").checkpoint == "auto"
    assert b4_sft.parse_method("trl-padding-free-liger-ckpt-none").checkpoint == "none"
    for bad in ("packed-compile-fast", "packed-ckpt-every0", "trl-fast"):
        with pytest.raises(SystemExit, match="unknown method"):
            b4_sft.parse_method(bad)


def test_kernel_table_sums_categories_and_keeps_top_kernels():
    from types import SimpleNamespace

    from vibeperf.bench.step_profile import kernel_table

    events = [SimpleNamespace(name=n, device_type="DeviceType.CUDA", device_time=us) for n, us in (
        ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 3000.0), ("lmhead_row_grad_kernel", 1000.0),
        ("sm90_xmma_gemm_bf16", 5000.0), ("sm90_xmma_gemm_bf16", 1000.0), ("Memcpy DtoD", 500.0))]
    events.append(SimpleNamespace(name="aten::mm", device_type="DeviceType.CPU", device_time=9e9))  # host: ignored
    prof = SimpleNamespace(events=lambda: events)
    t = kernel_table(prof)
    assert t["ms"] == {"optimizer": 3.0, "lm_head": 1.0, "matmuls": 6.0, "other": 0.5}
    assert t["total_ms"] == 10.5 and t["fraction"]["matmuls"] == 6.0 / 10.5
    assert t["top_kernels"]["matmuls"] == [("sm90_xmma_gemm_bf16", 6.0)]
    assert t["top_other"] == [("Memcpy DtoD", 0.5)]

"""The body switches of vibeperf.model.body and the bf16 master-weight optimizer leave loss and gradients unchanged.

Reference: the tiny Qwen2 in fp32 without any switch, one packed row of three samples. Checkpointing and compile
(aot_eager on the CPU: dynamo + AOT autograd, the path inductor compiles on the GPU) only change what is kept or
how it is traced, so fp32 results agree to fp32 rounding (rtol 1e-5 of the gradient norm).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from vibeperf.config import ModelConfig
from vibeperf.model import FusedLossLM, Sample, load_model, make_row, model_path, use_varlen_attention
from vibeperf.model.body import BODY_STATS, apply_body, body_report

DEV = torch.device("cpu")


def _row(lengths, seed=0, vocab=200):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        mask = torch.ones(n, dtype=torch.bool)
        mask[: n // 4] = False
        samples.append(Sample(torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32), mask))
    return make_row(samples)


def _fresh():
    """The tiny model with varlen attention and no body switch applied yet."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path("tiny"), dtype=torch.float32)
    use_varlen_attention(model, "auto")
    model.train()
    return model


def _loss_and_grads(cfg: ModelConfig, rows, **apply_kw):
    model = _fresh()
    apply_body(model, cfg, **apply_kw)
    root = FusedLossLM(model)
    losses = []
    for row in rows:
        loss = root(row.model_inputs(), row.targets, row.token_weight, backend="torch")
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses), grads, model


def _assert_same(a, b, rtol=1e-5):
    (la, ga, _), (lb, gb, _) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
    assert ga.keys() == gb.keys()
    for name in ga:
        err = (ga[name] - gb[name]).norm() / ga[name].norm().clamp_min(1e-30)
        assert err < rtol, f"{name}: relative gradient error {err:.2e}"


ROWS = [_row([17, 5, 30]), _row([40, 9], seed=1)]

# A plain block (no checkpointing in apply_body) is the reference for every switch.
PLAIN = ModelConfig(activation_checkpointing=False)


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads(PLAIN, ROWS)


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(ModelConfig(activation_checkpointing=True, checkpoint_policy="full"), id="full"),
        pytest.param(ModelConfig(activation_checkpointing=True, checkpoint_policy="save-matmuls"), id="save-matmuls"),
        pytest.param(ModelConfig(activation_checkpointing=True, checkpoint_policy="offload"), id="offload"),
        pytest.param(ModelConfig(activation_checkpointing=True, checkpoint_every=2), id="every-2"),
    ],
)
def test_checkpoint_policy_keeps_loss_and_grads(reference, cfg):
    BODY_STATS.clear()
    got = _loss_and_grads(cfg, ROWS)
    _assert_same(reference, got)
    modes = body_report(got[2])["checkpoint"]
    n = len(got[2].model.layers)
    if cfg.checkpoint_every == 2:
        assert modes == {"full": (n + 1) // 2, "none": n // 2}
    else:
        assert modes == {cfg.checkpoint_policy: n}
    if cfg.checkpoint_policy == "offload":
        assert BODY_STATS["offload"] == n * len(ROWS)


def test_offload_restores_autocast_in_recompute():
    """The recompute of an offloaded block runs under the forward's autocast state (bf16 on the CPU here)."""
    cfgs = [PLAIN, ModelConfig(activation_checkpointing=True, checkpoint_policy="offload")]
    out = []
    for cfg in cfgs:
        model = _fresh()
        apply_body(model, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = FusedLossLM(model)(ROWS[0].model_inputs(), ROWS[0].targets, ROWS[0].token_weight, backend="torch")
        loss.backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    err = (out[0] - out[1]).norm() / out[0].norm()
    assert err < 1e-5, err


@pytest.mark.parametrize("policy", ["full", "save-matmuls", "offload"])
def test_compiled_blocks_match_and_do_not_recompile(reference, policy):
    """Regional compile (aot_eager) with each checkpoint policy: same loss and grads, no graph break; rows of other
    lengths and sample counts reuse the graphs (dynamo's count of compiled graphs does not move)."""
    torch._dynamo.reset()
    counters.clear()
    cfg = ModelConfig(activation_checkpointing=True, checkpoint_policy=policy, compile=True)
    got = _loss_and_grads(cfg, ROWS, compile_backend="aot_eager")
    _assert_same(reference, got)
    model = got[2]
    root = FusedLossLM(model)
    single = _row([33], seed=9)  # one sample per row may take a second graph (a size-1 boundary slice on the CPU)
    root(single.model_inputs(), single.targets).backward()
    before = body_report(model)
    # offload runs the compiled block twice (no-grad forward, recompute with grad): one graph for each grad mode
    assert 1 <= before["graphs"] <= (4 if policy == "offload" else 2) and before["graph_breaks"] == 0, before
    _more_rows(model)
    assert body_report(model)["graphs"] == before["graphs"]


def _more_rows(model):
    root = FusedLossLM(model)
    for k, lengths in enumerate([[23, 11, 7, 2], [64], [3, 3, 3, 3, 3, 3]]):
        row = _row(lengths, seed=5 + k)
        root(row.model_inputs(), row.targets).backward()


def test_static_compile_would_recompile():
    """The control of the test above: the same blocks compiled with static shapes compile new graphs."""
    torch._dynamo.reset()
    counters.clear()
    model = _fresh()
    for layer in model.model.layers:
        layer.compile(dynamic=False, backend="aot_eager")
    model._vibeperf_body = {"checkpoint": [], "compile": True, "compile_backend": "aot_eager"}
    _more_rows(model)
    first = body_report(model)["graphs"]
    _more_rows(model)
    root = FusedLossLM(model)
    row = _row([50, 9])
    root(row.model_inputs(), row.targets).backward()
    assert body_report(model)["graphs"] > first


def test_load_model_applies_body_switches():
    cfg = ModelConfig(activation_checkpointing=True, checkpoint_policy="save-matmuls", checkpoint_every=3)
    model = load_model(cfg, model_path("tiny"), DEV, "fp32")
    n = len(model.model.layers)
    assert body_report(model)["checkpoint"] == {"save-matmuls": (n + 2) // 3, "none": n - (n + 2) // 3}
    with pytest.raises(RuntimeError, match="already"):
        apply_body(model, cfg)


def test_bad_body_switches_are_named():
    from vibeperf.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint_every"):
        ModelConfig(checkpoint_every=0)
    model = load_model(ModelConfig(), model_path("tiny"), DEV, "fp32")
    with pytest.raises(ValueError, match="checkpoint_policy"):
        apply_body(model, ModelConfig(checkpoint_policy="bogus"))


def _grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=g) * 1e-2).to(torch.bfloat16).float() for s in shapes] for _ in range(steps)]


def test_master_adamw_follows_the_fp32_update():
    """bf16 parameters + MasterAdamW take exactly the fp32 AdamW trajectory (same bf16-representable start and
    gradients); the bf16 parameters are the masters rounded; plain bf16 AdamW drifts away (the control); the
    masters survive a state_dict round trip."""
    from vibeperf.train import MasterAdamW

    shapes = [(7, 5), (5,)]
    start = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    grads = _grads(shapes, steps=20)
    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "foreach": True}
    ref = [p.float().clone().requires_grad_(True) for p in start]
    low = [p.clone().requires_grad_(True) for p in start]
    plain = [p.clone().requires_grad_(True) for p in start]
    opt_ref, opt_low, opt_plain = (torch.optim.AdamW(ref, **kw), MasterAdamW(low, **kw),
                                   torch.optim.AdamW(plain, **kw))  # fmt: skip
    for step in grads:
        for params, opt in ((ref, opt_ref), (low, opt_low), (plain, opt_plain)):
            for p, gr in zip(params, step):
                p.grad = gr.to(p.dtype)
            opt.step()
            opt.zero_grad()
    masters = opt_low.state_dict()["master_weights"]
    for r, m, p in zip(ref, masters, low):
        torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), m.to(torch.bfloat16))
    assert low[0].grad is None
    assert not torch.equal(plain[0].detach(), low[0].detach())
    other = MasterAdamW([p.detach().clone().requires_grad_(True) for p in start], **kw)
    other.load_state_dict(opt_low.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict()["master_weights"], masters))
    assert torch.equal(other._models[0].detach(), low[0].detach())


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("policy", ["full", "save-matmuls", "offload"])
def test_packed_step_has_no_host_sync_on_gpu(policy, compiled):
    """A packed micro-batch (rows already on the GPU) runs forward and backward without a host sync, with the
    blocks eager and compiled (compile is the default on CUDA)."""
    from vibeperf.sft import forward_backward

    model = _fresh().cuda()
    apply_body(model, ModelConfig(activation_checkpointing=True, checkpoint_policy=policy, compile=compiled))
    rows = [r.to("cuda") for r in ROWS]
    forward_backward(model, rows, autocast_dtype=torch.bfloat16)  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(model, rows, autocast_dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _meta_3b():
    from transformers import Qwen2ForCausalLM

    from vibeperf.bench.b4_sft import qwen25_3b_config

    with torch.device("meta"):
        return Qwen2ForCausalLM(qwen25_3b_config(36))


def test_auto_settings_resolve_for_the_device():
    """ModelConfig's defaults (compile and checkpoint_policy "auto") are concrete once applied: compile off and
    "full" on the CPU, and the reason is in the body report."""
    model = load_model(ModelConfig(activation_checkpointing=True), model_path("tiny"), DEV, "fp32", row_tokens=512)
    report = body_report(model)
    assert report["compile"] is False
    assert report["checkpoint"] == {"full": len(model.model.layers)}
    assert "not a CUDA device" in report["why"]


def test_auto_policy_is_the_fastest_that_fits():
    """On the 3B shape: save-matmuls while it fits the budget, then full, then offload (the order B4 measured)."""
    from vibeperf.model.body import choose_policy

    model = _meta_3b()
    h200, gpu80 = 132.0, 74.0
    assert choose_policy(model, 16384, h200)[0] == "save-matmuls"
    assert choose_policy(model, 32768, h200)[0] == "save-matmuls"
    assert choose_policy(model, 65536, h200)[0] == "full"
    assert choose_policy(model, 16384, gpu80)[0] == "full"
    assert choose_policy(model, 65536, gpu80)[0] == "full"
    policy, why = choose_policy(model, 131072, gpu80)
    assert policy == "offload" and "budget 74.0 GiB" in why and "full ~" in why
    # FSDP over 8 ranks divides the static part: save-matmuls fits an 80 GB GPU at 16K again
    assert choose_policy(model, 16384, gpu80, shards=8)[0] == "save-matmuls"


def test_peak_estimate_bounds_measured_peaks():
    """The estimate is an upper bound of the peaks B4 measured on an H200 (compiled blocks, AdamW state), and not a
    wasteful one (within 1.2x), at the rows' token budget (the longest a row can be); the long rows ran with "auto"
    at a 74 GiB budget (an 80 GB GPU) and must have picked full at 64K and offload at 128K."""
    import json
    from pathlib import Path

    from vibeperf.model.body import estimate_peak_gib

    model = _meta_3b()
    doc = json.loads((Path(__file__).parents[1] / "benchmarks/results/NVIDIA-H200_2026-12-01_B4-switches.json")
                     .read_text())  # fmt: skip
    budgets = {"lognormal": doc["extra"]["args"]["budget"], "stage2": doc["extra"]["args"]["stage2_budget"]}
    checked = 0
    for key, det in doc["extra"]["methods"].items():
        mix, _, name = key.partition(":")
        policy = {"packed-compile": "full", "packed-compile-ckpt-save-matmuls": "save-matmuls"}.get(name)
        if policy is None or "peak_gib" not in det:
            continue
        est = estimate_peak_gib(model, policy, budgets[mix])
        assert det["peak_gib"] <= est <= 1.2 * det["peak_gib"], (key, det["peak_gib"], est)
        checked += 1
    assert checked == 4
    for tag, tokens, policy in (("B4-long", 65536, "full"), ("B4-long128", 131072, "offload")):
        doc = json.loads((Path(__file__).parents[1] / f"benchmarks/results/NVIDIA-H200_2026-12-01_{tag}.json")
                         .read_text())  # fmt: skip
        (det,) = doc["extra"]["methods"].values()
        assert det["body"]["checkpoint"] == {policy: 36}, det["body"]
        est = estimate_peak_gib(model, policy, tokens)
        assert det["peak_gib"] <= est <= 1.2 * det["peak_gib"], (tag, det["peak_gib"], est)


def test_compile_setting_accepts_auto_and_bools():
    from vibeperf.config import ConfigError, load_config
    from vibeperf.sft.config import SFTConfig

    recipe = Path(__file__).parents[1] / "recipes" / "sft_tiny.toml"
    for value, want in (("auto", "auto"), ("true", True), ("false", False)):
        assert load_config(SFTConfig, recipe, [f"model.compile={value}"]).model.compile == want
    with pytest.raises(ConfigError, match="model.compile"):
        load_config(SFTConfig, recipe, ["model.compile=sometimes"])


def test_auto_budget_leaves_out_the_engine(monkeypatch):
    """On a CUDA device the default budget is 95% of its memory less what a colocated engine holds (the RL trainer
    reserves its KV cache and a weight copy); an explicit memory_budget_gib wins. The GPU is faked (141 GiB)."""
    from types import SimpleNamespace

    from vibeperf.model.body import resolve_body
    from vibeperf.rl.trainer import engine_reserve_gib

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=141 * 2**30))
    model, cuda = _meta_3b(), torch.device("cuda")
    cfg = ModelConfig(activation_checkpointing=True)
    got, why = resolve_body(cfg, model, cuda, 16384)
    assert (got.checkpoint_policy, got.compile) == ("save-matmuls", True), why
    got, why = resolve_body(cfg, model, cuda, 16384, reserved_gib=59.95)
    assert got.checkpoint_policy == "full" and "budget 74.0 GiB" in why, why
    got, _ = resolve_body(ModelConfig(activation_checkpointing=True, memory_budget_gib=132.0), model, cuda, 16384,
                          reserved_gib=60.0)  # fmt: skip
    assert got.checkpoint_policy == "save-matmuls"
    from vibeperf.config import EngineConfig

    tiny = model_path("tiny")
    weights = sum(f.stat().st_size for f in Path(tiny).glob("*.safetensors")) / 2**30
    assert weights > 0 and engine_reserve_gib(EngineConfig(kv_cache_gib=3.0), tiny) == pytest.approx(3.0 + weights)

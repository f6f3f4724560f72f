"""Where a training step's GPU time goes: one step under torch.profiler, kernel time by category.

Categories are read from kernel names (`CATEGORIES`, first match wins, case-insensitive): attention (FlashAttention
/ varlen / SDPA kernels), LM head (vibeperf's Triton LM-head kernels and Liger's fused linear CE), optimizer
(fused/foreach Adam and the multi-tensor kernels of clipping), matmuls (cuBLAS / CUTLASS GEMMs), norms+activations
(RMSNorm, RoPE, SiLU/SwiGLU, elementwise and reductions of the body), other (copies, casts, memsets, the rest).
GEMMs of the LM head go through cuBLAS (ours and the padded baseline's) and count as matmuls. The ten largest "other"
kernels and the five largest of each category are kept, so that a share can be read kernel by kernel.
"""

from __future__ import annotations

import re
from collections import Counter

CATEGORIES = [
    ("attention", r"flash|fmha|varlen|attn|attention|sdpa"),
    ("lm_head", r"lmhead|linear_logprob|linear_ce|cross_entropy|fused_linear"),
    ("optimizer", r"adam|multi_tensor|foreach|clip_grad|_amp_"),
    ("matmuls", r"gemm|cutlass|nvjet|sm90_xmma|sm80_xmma|matmul|ampere_|hopper_"),
    ("norms+activations", r"rms|norm|rope|rotary|silu|swiglu|gelu|elementwise|reduce|mul_|add_|triton_"),
]


def categorize(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def kernel_table(prof) -> dict:
    """{category: ms} over the device kernels of a finished profiler, plus the top 'other' kernels."""
    by_cat, kernels = Counter(), {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) is None or str(evt.device_type).endswith("CPU"):
            continue
        ms = evt.device_time / 1e3 if hasattr(evt, "device_time") else evt.cuda_time / 1e3
        cat = categorize(evt.name)
        by_cat[cat] += ms
        kernels.setdefault(cat, Counter())[evt.name[:80]] += ms
    total = sum(by_cat.values())
    return {"ms": dict(by_cat), "fraction": {k: v / total for k, v in by_cat.items()} if total else {},
            "total_ms": total, "top_other": kernels.get("other", Counter()).most_common(10),
            "top_kernels": {cat: c.most_common(5) for cat, c in kernels.items()}}  # fmt: skip


def profile_method(m, ctx, build_model, time_steps) -> dict:
    """Build method `m`, run one warm-up step then one profiled step of ctx's first two steps; print the table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = build_model(ctx.cfg, m, ctx.dev, ctx.args.seed, ctx.budget, ctx.args.memory_budget)
    time_steps(model, m, ctx.steps_samples[:1], ctx.budget, ctx.args.pad_batch, ctx.dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        time_steps(model, m, ctx.steps_samples[1:2], ctx.budget, ctx.args.pad_batch, ctx.dev)
    del model
    table = kernel_table(prof) if ctx.dev.type == "cuda" else {"ms": {}, "fraction": {}, "total_ms": 0.0}
    print(f"profile of {m.name} (one step, GPU kernel time):")
    for cat, _ in [*CATEGORIES, ("other", "")]:
        ms = table["ms"].get(cat, 0.0)
        print(f"  {cat:<18} {ms:10.1f} ms  {table['fraction'].get(cat, 0.0):6.1%}")
    if ctx.dev.type == "cuda":
        torch.cuda.empty_cache()
    return table

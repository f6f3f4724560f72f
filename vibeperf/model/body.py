"""How the decoder blocks of a loaded model run: activation checkpointing policy and regional torch.compile.

`apply_body(model, cfg)` sets up every decoder block of a transformers causal LM (`model.model.layers`) from the
`ModelConfig` fields below; the state dict and the module tree are unchanged (each block's `forward` is wrapped on
the instance, never a class):

- `activation_checkpointing` + `checkpoint_policy` + `checkpoint_every` (applied to blocks 0, k, 2k, ...; the other
  blocks keep their activations):
  - "full": recompute the whole block in the backward pass (torch.utils.checkpoint, non-reentrant); the block input
    stays on the GPU.
  - "save-matmuls": selective checkpointing (`create_selective_checkpoint_contexts`): the outputs of the matmuls
    and of attention are kept (`SAVED_OPS`), the cheap ops (norms, RoPE, SiLU, products, adds) are recomputed.
  - "offload": "full", and the block input is moved to pinned CPU memory until the backward pass needs it
    (the Arctic-style long-row mode: at 128K tokens the 36 fp32 block inputs of the 3B shape are 36 GiB).
- `compile`: regional `torch.compile` of each block (one graph shared by all blocks), with `dynamic=True` so that
  packed rows of any length and sample count reuse the graph (no recompiles; `body_report` counts graphs). With
  "full"/"save-matmuls" the checkpoint is inside the compiled region (as torchtitan does); with "offload" the
  compiled block runs inside the offloading wrapper.

`resolve_body(cfg, model, device, row_tokens, ...)` makes the "auto" settings concrete before `apply_body`:
- `compile = "auto"`: on with CUDA, off elsewhere (inductor's CPU compile time outweighs its gain in tests/demos).
- `checkpoint_policy = "auto"`: the fastest policy whose estimated peak memory (`estimate_peak_gib`: weights,
  gradients and optimizer state, plus what the policy keeps per token and block for the longest row) fits the
  budget (`memory_budget_gib`, default 95% of the GPU's memory): "save-matmuls", else "full", else "offload".
  On the CPU it is "full". The B4 benchmark (vibeperf.bench.b4_sft) measured the order on an H200: with compile,
  save-matmuls 1.20x the step rate of full; checkpointing every 2nd block or none are no faster than save-matmuls
  for more memory, so they are never picked (they stay explicit settings). tests/test_body.py holds the estimate
  against B4's measured peaks.

`body_report(model)` says what each block runs with, for logs and benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CHECKPOINT_POLICIES = ("full", "save-matmuls", "offload")
AUTO_ORDER = ("save-matmuls", "full", "offload")
"""The policies "auto" tries, fastest first."""
_aten = torch.ops.aten


def _saved_ops() -> frozenset:
    names = [
        "mm",
        "addmm",
        "bmm",
        "linear",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
    ]
    ops = [getattr(_aten, n).default for n in names if hasattr(_aten, n)]
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers torch.ops.torch_attn)

        ops.append(torch.ops.torch_attn._varlen_attn.default)
    except (ImportError, AttributeError, RuntimeError):
        pass  # no varlen_attn in this torch: attention then runs through the SDPA ops above
    return frozenset(ops)


SAVED_OPS = _saved_ops()
"""Ops whose outputs "save-matmuls" keeps: GEMMs and attention (the expensive ones to recompute)."""

BODY_STATS: Counter = Counter()
"""Counts of block calls per mode since import ("offload", "checkpoint", "plain"); tests and reports read it."""


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls)


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (`<base model>.layers`)."""
    body = getattr(model, model.base_model_prefix, model)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise NotImplementedError(f"{type(model).__name__} has no <base model>.layers ModuleList of decoder blocks")
    return layers


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run `fn(x, **kwargs)` without keeping activations; keep only x, in pinned CPU memory; recompute in backward.

    Gradients of the block's parameters are accumulated into `.grad` by the inner backward (as reentrant
    checkpointing does); the autocast state of the forward is restored for the recompute. Blocks have no dropout
    in training here (Qwen2/Llama attention_dropout 0), so no RNG state is replayed.
    """

    @staticmethod
    def forward(ctx, fn, kwargs, x):
        ctx.fn, ctx.kwargs, ctx.device = fn, kwargs, x.device
        dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
        host.copy_(x.detach(), non_blocking=x.is_cuda)
        ctx.host = host
        with torch.no_grad():
            return fn(x, **kwargs)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            out = ctx.fn(x, **ctx.kwargs)
        torch.autograd.backward(out, grad)
        ctx.host = None
        return None, None, x.grad


def _offloaded(fn, hidden_states, *args, **kwargs):
    if args:
        raise TypeError("offloaded checkpointing takes the block's arguments after hidden_states as keywords")
    BODY_STATS["offload"] += 1
    if not (torch.is_grad_enabled() and hidden_states.requires_grad):
        return fn(hidden_states, **kwargs)
    return _OffloadedCheckpoint.apply(fn, kwargs, hidden_states)


def _checkpointed(fn, context_fn, *args, **kwargs):
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    if context_fn is None:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def estimate_peak_gib(model, policy: str, row_tokens: int, *, optimizer_bytes: int = 8, shards: int = 1) -> float:
    """Estimated peak GPU memory (GiB) of a training step of `model` on rows of up to `row_tokens` tokens.

    Static: every parameter with a gradient of its own dtype and `optimizer_bytes` per element (AdamW's two fp32
    moments: 8; with fp32 master weights: 12), divided over `shards` (FSDP). Per token and block: the block input
    (the residual stream, in the parameters' dtype) for "full"; plus the outputs kept by "save-matmuls" that the
    backward pass reads (q, k, v, the attention output, gate and up; bf16); "none" is counted as "save-matmuls"
    (a lower bound); "offload" keeps two block inputs on the GPU (the one being recomputed and its gradient).
    Every policy adds the working set of one block's backward: its kept outputs and the MLP's fp32 intermediates
    (two of intermediate_size per token).
    """
    c = model.config
    static = sum(p.numel() * (2 * p.element_size() + optimizer_bytes) for p in model.parameters()) / shards
    width = next(model.parameters()).element_size()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    residual = c.hidden_size * width
    kept = (2 * c.hidden_size + 2 * kv + 2 * c.intermediate_size) * 2
    layers = len(decoder_layers(model))
    if policy == "offload":
        per_row = 2 * row_tokens * residual
    elif policy == "full":
        per_row = layers * row_tokens * residual
    else:
        per_row = layers * row_tokens * (residual + kept)
    working = row_tokens * (kept + 2 * c.intermediate_size * 4)
    return (static + per_row + working) / 2**30


def choose_policy(model, row_tokens: int, budget_gib: float, *, optimizer_bytes: int = 8, shards: int = 1):
    """The first policy of AUTO_ORDER whose `estimate_peak_gib` fits `budget_gib` ("offload" when none does), and
    a one-line reason with the estimates."""
    est = {p: estimate_peak_gib(model, p, row_tokens, optimizer_bytes=optimizer_bytes, shards=shards)
           for p in AUTO_ORDER}  # fmt: skip
    policy = next((p for p in AUTO_ORDER if est[p] <= budget_gib), "offload")
    why = (f"checkpoint_policy auto -> {policy} (rows of {row_tokens} tokens, budget {budget_gib:.1f} GiB; "
           + ", ".join(f"{p} ~{g:.1f} GiB" for p, g in est.items()) + ")")  # fmt: skip
    return policy, why


def resolve_body(cfg, model, device: torch.device, row_tokens: int, *, optimizer_bytes: int = 8, shards: int = 1,
                 reserved_gib: float = 0.0):  # fmt: skip
    """`cfg` (a ModelConfig) with compile and checkpoint_policy "auto" made concrete for this model, device and
    longest row (module docstring); `reserved_gib` of the GPU is someone else's (a colocated rollout engine) and left
    out of the default budget. Returns (new cfg, a one-line reason for logs)."""
    compile_on = device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile)
    policy, why = cfg.checkpoint_policy, f"checkpoint_policy={cfg.checkpoint_policy}"
    if not cfg.activation_checkpointing:  # the policy is never used: nothing to plan
        policy, why = ("full" if policy == "auto" else policy), "activation_checkpointing off"
    elif policy == "auto":
        if device.type != "cuda":
            policy, why = "full", "checkpoint_policy auto -> full (not a CUDA device)"
        else:
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            budget = cfg.memory_budget_gib or 0.95 * total - reserved_gib
            policy, why = choose_policy(model, row_tokens, budget, optimizer_bytes=optimizer_bytes, shards=shards)
    return dataclasses.replace(cfg, compile=compile_on, checkpoint_policy=policy), f"{why}; compile {compile_on}"


def apply_body(model, cfg, *, row_tokens: int | None = None, optimizer_bytes: int = 8, shards: int = 1,
               reserved_gib: float = 0.0,
               compile_backend: str = "inductor") -> str:
    """Set up the decoder blocks of `model` from `cfg` (a `ModelConfig`); see the module docstring. Call once,
    after the model is on its device and before the first forward. "auto" settings are resolved first
    (`resolve_body`, for rows of up to `row_tokens` tokens, None: the model's max_position_embeddings; leaving
    `reserved_gib` of the GPU to others).
    `compile_backend` is torch.compile's backend (tests pass "aot_eager" to check the traced graph without
    inductor's compile time). Returns the one-line reason of the resolved settings (for logs)."""
    device = next(model.parameters()).device
    row_tokens = row_tokens or getattr(model.config, "max_position_embeddings", None) or 131_072
    cfg, why = resolve_body(cfg, model, device, row_tokens, optimizer_bytes=optimizer_bytes, shards=shards,
                            reserved_gib=reserved_gib)  # fmt: skip
    policy, every = cfg.checkpoint_policy, cfg.checkpoint_every
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"model.checkpoint_policy must be one of {CHECKPOINT_POLICIES} or auto, got {policy!r}")
    if every < 1:
        raise ValueError(f"model.checkpoint_every must be >= 1, got {every}")
    if getattr(model, "_vibeperf_body", None) is not None:
        raise RuntimeError("apply_body was already called on this model")
    layers = decoder_layers(model)
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    modes = []
    for i, layer in enumerate(layers):
        ckpt = cfg.activation_checkpointing and i % every == 0
        mode = policy if ckpt else "none"
        forward = layer.forward
        if mode == "offload":
            inner = torch.compile(forward, dynamic=True, backend=compile_backend) if cfg.compile else forward
            layer.forward = functools.partial(_offloaded, inner)
        else:
            if mode != "none":
                layer.forward = functools.partial(_checkpointed, forward,
                                                  _selective_context if mode == "save-matmuls" else None)  # fmt: skip
            if cfg.compile:
                layer.compile(dynamic=True, backend=compile_backend)
        modes.append(mode)
    model._vibeperf_body = {"checkpoint": modes, "compile": bool(cfg.compile), "compile_backend": compile_backend,
                            "why": why}
    return why


def body_report(model) -> dict:
    """What the blocks run with: per-mode block counts, compile on/off and its backend, and the graphs dynamo has
    compiled in this process (`graphs`: constant once every row shape has reused the first graphs) and the graph
    breaks dynamo met (`graph_breaks`; 0 when each block is one graph)."""
    info = getattr(model, "_vibeperf_body", None)
    if info is None:
        return {"checkpoint": "not applied", "compile": False}
    out = {"checkpoint": dict(Counter(info["checkpoint"])), "compile": info["compile"], "why": info.get("why", "")}
    if info["compile"]:
        from torch._dynamo.utils import counters

        out["compile_backend"] = info["compile_backend"]
        out["graphs"] = counters["stats"]["unique_graphs"]
        out["graph_breaks"] = sum(counters["graph_break"].values())
    return out

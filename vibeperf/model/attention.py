"""Varlen attention over packed rows for Hugging Face models, registered through transformers' AttentionInterface.

`use_varlen_attention(model, backend)` switches a loaded model (any class whose attention goes through
`ALL_ATTENTION_FUNCTIONS`, e.g. Qwen2/Llama) to one of the implementations registered here, so no model class is
forked. The model body is then called on a packed row of batch 1 with the sample boundaries as keyword arguments
(`PackedRow.model_inputs()`): `cu_seq_lens_q/_k` [S+1] int32 and `max_length_q/_k`. Every token attends causally
to earlier tokens of its own sample only. transformers builds no mask for these names (it passes
`attention_mask=None`), so a padded batch cannot be expressed: without `cu_seq_lens_q` only a single unpadded
sequence (batch 1) is accepted, and a KV cache (generation) is refused; use "sdpa" for those.

Backends (registered names in `IMPLEMENTATIONS`; none contains "flash", which transformers reserves for its own
FlashAttention integrations):
- "varlen": `torch.nn.attention.varlen.varlen_attn` (FlashAttention varlen kernels; CUDA, fp16/bf16). Causality is
  `window_size=(-1, 0)` on torch >= 2.11 (which has no `is_causal` keyword) or `is_causal=True` on torch 2.10, found
  by inspecting the signature; KV heads are repeated for GQA unless the signature has `enable_gqa`.
- "flex": FlexAttention with a document-causal BlockMask built from cu_seqlens (compiled on CUDA, eager on the CPU;
  the mask is built once per row and shared by all layers).
- "exact": a loop over the samples of the row with `scaled_dot_product_attention(is_causal=True)`: the obviously
  right reference, and the CPU path.
- "auto", decided per call from the query tensor: CUDA and fp16/bf16 and varlen_attn usable -> "varlen"; other CUDA
  -> "flex"; CPU -> "exact".
Under autocast, query, key and value are cast to the autocast dtype first, as autocast does for SDPA (transformers'
RoPE returns fp32 queries and keys when the residual stream is fp32). `ATTENTION_CALLS` counts the calls of each
backend that ran in eager mode (calls inside a torch.compile'd region are not counted: a traced counter would
recompile on every call); `resolve_attention` says what will run and why.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections import Counter

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "varlen", "flex", "exact")
IMPLEMENTATIONS = {
    "auto": "vibeperf_varlen",
    "varlen": "vibeperf_varlen_attn",
    "flex": "vibeperf_varlen_flex",
    "exact": "vibeperf_varlen_exact",
}
ATTENTION_CALLS: Counter = Counter()


@functools.cache
def varlen_attn_info() -> tuple[object | None, dict, bool, str]:
    """(varlen_attn or None, its causal keyword arguments, whether it takes enable_gqa, a one-line description)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        return None, {}, False, f"torch.nn.attention.varlen is not importable in torch {torch.__version__} ({e})"
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None, {}, False, f"varlen_attn of torch {torch.__version__} has neither window_size nor is_causal"
    gqa = "enable_gqa" in params
    how = ", ".join(f"{k}={v}" for k, v in causal.items()) + (", enable_gqa=True" if gqa else ", KV heads repeated")
    return varlen_attn, causal, gqa, f"torch.nn.attention.varlen.varlen_attn ({how})"


def _auto(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    if device.type != "cuda":
        return "exact", f"{device.type} tensors: per-sample SDPA loop"
    fn, _, _, why = varlen_attn_info()
    if fn is not None and dtype in (torch.float16, torch.bfloat16):
        return "varlen", why
    reason = why if fn is None else f"varlen_attn needs fp16/bf16, got {dtype}"
    return "flex", f"FlexAttention with a document mask ({reason})"


def resolve_attention(backend: str, device: torch.device | str, dtype: torch.dtype) -> tuple[str, str]:
    """The backend that will run for queries on `device` in `dtype`, and why; raises if an explicit one cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return _auto(device, dtype)
    if backend == "varlen":
        fn, _, _, why = varlen_attn_info()
        if fn is None or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(
                f"attention backend 'varlen' cannot run on {device.type} in {dtype}: needs CUDA "
                f"fp16/bf16 and a usable varlen_attn ({why}); use 'auto', 'flex' or 'exact'"
            )
        return "varlen", why
    if backend == "flex":
        return "flex", "FlexAttention with a document mask" + (" (compiled)" if device.type == "cuda" else " (eager)")
    return "exact", "per-sample SDPA loop"


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """q [1, Hq, T, D], k/v [1, Hkv, T, D], cu [S+1] -> [1, T, Hq, D].

    Eager: a loop over the samples. Under torch.compile: one SDPA with a dense document-causal mask built on the
    device (the same math without reading the boundaries on the host, so packed rows of any sample count trace to
    one graph)."""
    gqa = int(q.shape[1]) != int(k.shape[1])
    if torch.compiler.is_compiling():
        t = q.shape[2]
        doc = torch.searchsorted(cu[1:].long(), torch.arange(t, device=q.device), right=True)  # [T]
        pos = torch.arange(t, device=q.device)
        mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])  # [T, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    bounds = cu.tolist()
    outs = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scale,
                                       enable_gqa=gqa)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]  # fmt: skip
    return torch.cat(outs, dim=2).transpose(1, 2)


def _flash(q, k, v, cu: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    fn, causal, gqa, _ = varlen_attn_info()
    q3, k3, v3 = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # [T, H, D]
    extra = dict(causal)
    if q3.shape[1] != k3.shape[1]:
        if gqa:
            extra["enable_gqa"] = True
        else:
            rep = q3.shape[1] // k3.shape[1]
            k3, v3 = k3.repeat_interleave(rep, dim=1), v3.repeat_interleave(rep, dim=1)
    out = fn(q3, k3, v3, cu, cu, max_len, max_len, scale=scale, **extra)  # [T, Hq, D]
    return out[None]


_MASK_CACHE: dict = {}


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def _document_mask(cu: torch.Tensor, t: int):
    """Document-causal BlockMask of a row; cached on the cu_seqlens tensor object that all layers share."""
    from torch.nn.attention.flex_attention import create_block_mask

    hit = _MASK_CACHE.get("mask")
    if hit is not None and hit[0]() is cu and hit[1] == t:
        return hit[2]
    doc = torch.searchsorted(cu[1:].long(), torch.arange(t, device=cu.device), right=True)  # [T] sample of each token
    mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, t, t,
                             device=cu.device)  # fmt: skip
    _MASK_CACHE["mask"] = (weakref.ref(cu), t, mask)
    return mask


def _flex(q, k, v, cu: torch.Tensor, scale: float) -> torch.Tensor:
    mask = _document_mask(cu, q.shape[2])
    out = _flex_fn(q.is_cuda)(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface entry: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None).

    Sample boundaries come from `cu_seq_lens_q` [S+1] (int32, on the query's device) and `max_length_q` in kwargs.
    """
    if attention_mask is not None:
        raise ValueError("varlen attention takes sample boundaries (cu_seq_lens_q), not an attention mask")
    if dropout or sliding_window:
        raise NotImplementedError(
            f"varlen attention has no dropout or sliding window (got {dropout=}, {sliding_window=})"
        )
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError("varlen attention does not take a KV cache; switch the model to 'sdpa' to generate")
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention runs on packed rows of batch 1, got batch {query.shape[0]}")
    if torch.is_autocast_enabled(query.device.type):
        dt = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    t = query.shape[2]
    if cu is None:
        cu, max_len = torch.tensor([0, t], dtype=torch.int32, device=query.device), t
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    name = backend if backend != "auto" else _auto(query.device, query.dtype)[0]
    if name == "varlen":
        # max_len stays as given (an int, or a SymInt under compile: int() would specialise it, one graph per length)
        out = _flash(query, key, value, cu, max_len if max_len is not None else int(cu.diff().max()), scale)
    elif name == "flex":
        out = _flex(query, key, value, cu, scale)
    else:
        out = _exact(query, key, value, cu, scale)
    if not torch.compiler.is_compiling():  # a traced counter would guard on its value: a recompile per call
        ATTENTION_CALLS[name] += 1
    return out, None


def register_varlen_attention() -> None:
    """Register every name of `IMPLEMENTATIONS` with transformers (idempotent; done on import of this module)."""
    from transformers import AttentionInterface

    for backend, name in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, functools.partial(varlen_attention_forward, backend=backend))


def use_varlen_attention(model, backend: str = "auto") -> str:
    """Switch `model` (a loaded transformers model) to the varlen attention `backend`; returns the registered name."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    name = IMPLEMENTATIONS[backend]
    model.set_attn_implementation(name)
    return name


register_varlen_attention()

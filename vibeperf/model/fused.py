"""The model body + the fused LM-head loss, without [tokens x vocab] logits: `FusedLossLM` and `patch_causal_lm`.

`FusedLossLM(model)` is how every trainer runs a packed row: `root(row.model_inputs(), targets, token_weight)` runs
the body (`model.model`, found through `base_model_prefix`) to the final hidden states [T, H] and feeds them with the
LM-head weight to `vibeperf.kernels.linear_cross_entropy` (SFT); `root(inputs, head_fn=fn)` returns whatever
`fn(hidden, weight, bias)` computes instead (RL: log-probs, the policy loss). One process calls it as a plain
module; under torchrun the same wrapper is the FSDP root (`vibeperf.distributed.shard_model`), and calling it
through `__call__` all-gathers the root group (embeddings, norm, head) before the body runs and registers the
reduce-scatter of their gradients: reading `lm_head.weight` by hand would see a sharded DTensor.

`head_inputs(hidden, weight, bias)`: the tensors in the dtype the LM head would compute in (the autocast dtype
inside autocast, as `nn.Linear` would be).

`patch_causal_lm(model)` replaces `model.forward` on that instance (the class is untouched) for callers that go
through the Hugging Face API (transformers' Trainer): with `labels`, the patched forward runs the body and the fused
cross-entropy and returns `logits=None`. Labels are shifted as transformers does (position t predicts labels[t+1];
-100 is ignored), or taken as given from `shift_labels`. Reduction: mean over the non-ignored targets, or sum /
`num_items_in_batch` when that is passed (transformers' Trainer does, for gradient accumulation). Without `labels`
the original forward runs (logits, generation). Models whose logits are rescaled or soft-capped are refused.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from vibeperf.kernels import linear_cross_entropy

_ORIGINAL = "_vibeperf_original_forward"


def _check_supported(model) -> None:
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"patch_causal_lm: {type(model).__name__} rescales its logits ({attr}="
                f"{getattr(cfg, attr)}); the fused loss would differ from the model's"
            )
    if model.get_output_embeddings() is None or not hasattr(model, model.base_model_prefix):
        raise NotImplementedError(f"patch_causal_lm: {type(model).__name__} has no LM head or base model")


def head_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """(hidden, weight, bias) for the fused LM-head ops: inside autocast, hidden in the autocast dtype (the dtype
    the head computes in, as `nn.Linear` would) and an fp32 weight and bias as they are: the ops compute in hidden's
    dtype and return the weight's gradient in fp32 straight from their fp32 accumulator (vibeperf.kernels.lmhead
    `chunked_engine`), where a cast here would round it to bf16 and back."""
    if torch.is_autocast_enabled(hidden.device.type):
        dt = torch.get_autocast_dtype(hidden.device.type)
        if weight.dtype == torch.float32:
            return hidden.to(dt), weight, bias
        return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return hidden, weight, bias


class FusedLossLM(nn.Module):
    """Body + fused LM-head loss in one forward (see the module docstring); the FSDP root under torchrun."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, model_inputs: dict, targets: torch.Tensor | None = None, token_weight: torch.Tensor | None = None,
                backend: str = "auto", head_fn=None):  # fmt: skip
        """The summed, token-weighted cross-entropy of `targets` (SFT); or, with `head_fn`, whatever
        `head_fn(hidden [T, H], weight [V, H], bias)` returns (RL: log-probs, the policy loss). Return tensors, or
        tuples / dicts of them, so that FSDP's backward hooks see every output."""
        body = getattr(self.lm, self.lm.base_model_prefix)
        head = self.lm.get_output_embeddings()
        hidden = body(**model_inputs).last_hidden_state[0]  # [T, H]
        h, w, b = head_inputs(hidden, head.weight, head.bias)
        if head_fn is not None:
            return head_fn(h, w, b)
        return linear_cross_entropy(h, w, targets, bias=b, reduction="sum", token_weight=token_weight,
                                    backend=backend)  # fmt: skip


def _patched_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    original = getattr(self, _ORIGINAL)
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                        logits_to_keep=logits_to_keep, **kwargs)  # fmt: skip
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", True)
    body = getattr(self, self.base_model_prefix)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)  # fmt: skip
    hidden = out.last_hidden_state  # [B, T, H]
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    head = self.get_output_embeddings()
    h, w, b = head_inputs(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias)
    targets = shift_labels.reshape(-1).to(h.device)
    if num_items is None:
        loss = linear_cross_entropy(h, w, targets, bias=b, reduction="mean", backend=self._vibeperf_loss_backend)
    else:
        loss = linear_cross_entropy(h, w, targets, bias=b, reduction="sum", backend=self._vibeperf_loss_backend)
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    result = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                    hidden_states=out.hidden_states, attentions=out.attentions)  # fmt: skip
    return result if return_dict else result.to_tuple()


def patch_causal_lm(model, *, backend: str = "auto"):
    """Patch `model` in place (and return it) so that `forward(..., labels=...)` uses the fused loss; idempotent.

    backend: the `linear_cross_entropy` backend ("auto", "triton", "torch").
    """
    _check_supported(model)
    if not hasattr(model, _ORIGINAL):
        setattr(model, _ORIGINAL, model.forward)
        model.forward = types.MethodType(_patched_forward, model)
    model._vibeperf_loss_backend = backend
    return model


def unpatch_causal_lm(model):
    """Undo `patch_causal_lm` (no-op on an unpatched model); returns the model."""
    if hasattr(model, _ORIGINAL):
        del model.forward
        delattr(model, _ORIGINAL)
        del model._vibeperf_loss_backend
    return model

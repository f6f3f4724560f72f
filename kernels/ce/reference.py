"""fp32 references for the LM-head scoring ops: obviously right, slow, [N, V] logits in memory.

z = (hidden @ weight.T + bias) / temperature, all in fp32 (fp64 when the inputs are fp64).
logp_t = z_t[y_t] - logsumexp(z_t); entropy_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_t,v.
Rows whose target is `ignore_index` give 0 and receive no gradient.
"""

from __future__ import annotations

import torch


def _logits(hidden, weight, bias, temperature):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = hidden.to(dtype) @ weight.to(dtype).T  # [N, V]
    if bias is not None:
        z = z + bias.to(dtype)
    return z / temperature


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Token log-probs [N] (and entropies [N]) of `targets` under the LM head; differentiable."""
    z = _logits(hidden, weight, bias, temperature)
    valid = targets != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.where(valid, z.gather(1, safe_t[:, None]).squeeze(1) - lse, torch.zeros_like(lse))
    if not return_entropy:
        return logp
    p = torch.softmax(z, dim=-1)
    entropy = torch.where(valid, lse - (p * z).sum(-1), torch.zeros_like(lse))
    return logp, entropy


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
):
    """Cross-entropy (NLL of `targets`); "mean" divides by the number of non-ignored rows (0 when there are none)."""
    nll = -linear_logprob_reference(
        hidden, weight, targets, temperature=temperature, bias=bias, ignore_index=ignore_index
    )
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / (targets != ignore_index).sum().clamp_min(1)
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")

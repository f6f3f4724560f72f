"""Triton kernels of vibeperf, imported as `vibeperf.kernels` (setup.py maps this folder there).

Layout: `lmhead/` is the LM-head engine (chunked GEMMs, the row kernel with its per-token loss epilogue, the
scoring forward, the CUDA bridge, the auto rule); the losses sit beside it, each with its fp32 `reference.py`:
`ce/` (log-prob, entropy, cross-entropy), `policy/` (the RL policy-loss family), `mgpo/` (its MGPO preset).

A top-level `kernels` is Hugging Face's package, which transformers probes at import time. Run from the checkout
root, Python can find this folder under that name too; it then loads as an empty placeholder (no `__version__`,
nothing of vibeperf's), which transformers reads as "hub kernels not installed", instead of our code.
"""

if __name__ == "vibeperf.kernels":
    from .ce import linear_cross_entropy, linear_logprob
    from .mgpo import mgpo_loss
    from .policy import PolicyLossOptions, policy_loss

    __all__ = ["linear_logprob", "linear_cross_entropy", "policy_loss", "PolicyLossOptions", "mgpo_loss"]

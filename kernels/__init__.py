"""Triton kernels of vibeperf, imported as `vibeperf.kernels` (setup.py maps this folder there).

A top-level `kernels` is Hugging Face's package, which transformers probes at import time. Run from the checkout
root, Python can find this folder under that name too; it then loads as an empty placeholder (no `__version__`,
nothing of vibeperf's), which transformers reads as "hub kernels not installed", instead of our code.
"""

if __name__ == "vibeperf.kernels":
    from .linear_logprob import linear_cross_entropy, linear_logprob
    from .mgpo import mgpo_loss

    __all__ = ["linear_logprob", "linear_cross_entropy", "mgpo_loss"]

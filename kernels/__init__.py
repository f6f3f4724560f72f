"""Triton kernels of vibeperf, imported as `vibeperf.kernels` (setup.py maps this folder there)."""

if __name__ != "vibeperf.kernels":
    # A top-level `kernels` belongs to Hugging Face's package, which transformers probes; never shadow it.
    raise ImportError(f"this folder is `vibeperf.kernels`, not `{__name__}`: install vibeperf and import it so")

from .linear_logprob import linear_cross_entropy, linear_logprob  # noqa: E402

__all__ = ["linear_logprob", "linear_cross_entropy"]

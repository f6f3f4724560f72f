"""The backward of the ops that form their gradients in the forward pass (cross-entropy with reduction "mean" / "sum",
the policy losses): those gradients times the incoming gradient of the loss, in place.

The incoming gradient is a device scalar and almost always exactly 1 (`loss.backward()`), but finding that out on
the host would be a sync. So on CUDA (and under the Triton interpreter) a kernel reads it on the device and leaves
the tensor untouched when it is 1: the [V, H] dW (0.58 GiB in bf16 at the Qwen2.5 head, 1.0 GiB at Llama-3's) is
then neither read nor written, where a multiply would read and write it all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from .triton_fwd import INTERPRET

BLOCK = 4096
MAX_PROGRAMS = 1024  # a grid-stride loop: a launch of a few programs that find g == 1 and return


@triton.jit(do_not_specialize=["n"])
def _scale_unless_one_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:  # else each program returns at once: no memory traffic beyond the scalar
        for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask)
            tl.store(x_ptr + offs, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=mask)


def scale_by_upstream(t: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
    """t times `grad` (the loss's incoming gradient, 0-dim), detached; None for an empty t (a gradient not wanted).

    t must be a gradient saved by this autograd node alone: in eager mode it is scaled in place (no second copy of a
    [V, H] dW), in fp32 and rounded once to t's dtype, and its version is bumped even where it was left as it was, so
    a second backward through the same graph is refused by autograd's version check. Traced (torch.compile) or a
    tensor subclass: t * grad, functional."""
    if not t.numel():
        return None
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return (t * grad.to(t.dtype)).detach()
    out = t.detach()  # shares t's version counter
    if (out.is_cuda or INTERPRET) and out.is_contiguous():
        n = out.numel()
        grid = (min(triton.cdiv(n, BLOCK), MAX_PROGRAMS),)
        _scale_unless_one_kernel[grid](out, grad.detach().float().reshape(1), n, BLOCK=BLOCK)
        increment_version(out)
    else:
        out.mul_(grad.to(out.dtype))
    return out

"""Where the time goes, Triton vs CUDA backend: per-kernel GPU time of one LM-head call under torch.profiler.

    python -m vibeperf.bench.profile_backends [--n 32768 65536] [--work forward train mgpo] [--repeats 3]
        [--head qwen llama3] [--top 8]

For a head (qwen: the Qwen2.5-3B head, H = 2048, V = 151,936; llama3: H = 4,096, V = 128,256; bf16) and each backend
("triton", "cuda"), one warm-up call and then `--repeats` profiled calls of the work (forward: `linear_logprob`
without grad, B1; train: `linear_cross_entropy` forward + backward, B2; mgpo: `mgpo_loss` forward + backward on B3's
inputs, Qwen2.5 head only). Every CUDA kernel's device time is summed per class: GEMM (cuBLAS / cuBLASLt / CUTLASS
kernels, and our head GEMM with its statistics epilogue), row kernel (ours: `lmhead_row_grad*` in either backend),
other (casts, fills, reductions). Train also profiles B2's floor, the three bare GEMMs, so each kernel of ours can be
set against the GEMM it adds to. Printed per call in ms, with the wall time of the same calls and the `--top` kernels
by device time; each call is also timed "held ahead" (queued behind ~30 ms of matmuls, so that no launch of it waits
on the host: its GPU time from end to end, and the host's time to issue it), which tells the GPU idling on the host
apart from time in kernels; the JSON goes to <results dir>/<gpu>_<date>_profile.json. The outputs are checked against
each other (Triton vs CUDA) before anything is profiled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

from vibeperf.kernels import linear_cross_entropy, linear_logprob, mgpo_loss

from . import registry
from .common import Row, format_table, relative_error, write_results_extra
from .registry import B3_GROUP, B3_LAMBDA, B3_SEQS, LLAMA3_H, LLAMA3_V, TOL, H, V, _b3_inputs, head_inputs

GEMM_MARKERS = ("gemm", "xmma", "cutlass", "nvjet", "sm90", "cublas", "head_gemm")
HEADS = {"qwen": (H, V), "llama3": (LLAMA3_H, LLAMA3_V)}


def kernel_class(name: str) -> str:
    low = name.lower()
    if "lmhead_row_grad" in low:
        return "row"
    if any(m in low for m in GEMM_MARKERS):
        return "gemm"
    return "other"


def make_call(work: str, x: dict, backend: str):
    """A zero-argument callable doing the work once; returns what is compared between backends. backend "floor"
    (train only): B2's yardstick, three bare GEMMs with bf16 outputs (B2's own `floor` impl)."""
    if backend == "floor":
        return lambda: registry.BENCHMARKS["B2"].impls["floor"].fn(x)
    if work == "forward":
        return lambda: linear_logprob(x["hidden"], x["weight"], x["targets"], backend=backend)

    def train():
        x["hidden"].grad = x["weight"].grad = None
        if work == "train":
            loss = linear_cross_entropy(x["hidden"], x["weight"], x["targets"], backend=backend)
        else:
            loss = mgpo_loss(x["hidden"], x["weight"], x["targets"], seq_index=x["seq_index"],
                             group_index=x["group_index"], rewards=x["rewards"], old_logp=x["old_logp"],
                             mgpo_lambda=B3_LAMBDA, num_groups=B3_SEQS // B3_GROUP, backend=backend).loss  # fmt: skip
        loss.backward()
        return x["weight"].grad

    return train


def profile(fn, repeats: int) -> tuple[dict[str, float], float, list[tuple[str, float, float]]]:
    """(device ms per call by kernel class, wall ms per call, [(kernel, device ms per call, launches per call)] from
    the longest) over `repeats` calls after a warm-up."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / repeats
    per_class: dict[str, float] = defaultdict(float)
    kernels = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev_us and evt.device_type == torch.autograd.DeviceType.CUDA:
            per_class[kernel_class(evt.key)] += dev_us / 1e3 / repeats
            kernels.append((evt.key, dev_us / 1e3 / repeats, evt.count / repeats))
    return dict(per_class), wall, sorted(kernels, key=lambda k: -k[1])


def held_ahead(fn, repeats: int) -> tuple[float, float]:
    """(GPU ms, host ms), medians per call of fn() queued behind about 30 ms of matmuls: every launch of the call is
    queued before the GPU reaches it, so the GPU ms holds no wait on the host; the host ms is Python's time to issue
    the call (near the GPU ms if the call syncs)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gpu, host = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        for _ in range(20):
            a @ a
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(host)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--work", nargs="+", default=["forward", "train", "mgpo"], choices=["forward", "train", "mgpo"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head", nargs="+", default=["qwen"], choices=sorted(HEADS))
    ap.add_argument("--top", type=int, default=8, help="kernels listed per profiled call (0: none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_backends needs a CUDA GPU", file=sys.stderr)
        return 2
    rows, detail = [], []
    for head in args.head:
        hidden, vocab = HEADS[head]
        suffix = "" if head == "qwen" else f"-{head}"
        for work in args.work:
            for n in args.n:
                if work == "mgpo" and (n % B3_SEQS or head != "qwen"):
                    continue
                bid = f"P-{work}{suffix}"
                x = _b3_inputs(n) if work == "mgpo" else head_inputs(n, work != "forward", hidden, vocab)
                outs = {b: make_call(work, x, b)().float().clone() for b in ("triton", "cuda")}
                err = relative_error(outs["cuda"], outs["triton"])
                backends = ("triton", "cuda", "floor") if work == "train" else ("triton", "cuda")
                for backend in backends:
                    if err > TOL:
                        rows.append(Row(bid, backend, n, None, None, None, False, f"WRONG: cuda vs triton {err:.1e}",
                                        hidden, vocab))  # fmt: skip
                        continue
                    call = make_call(work, x, backend)
                    classes, wall, kernels = profile(call, args.repeats)
                    ahead_gpu, ahead_host = held_ahead(call, args.repeats)
                    note = (" ".join(f"{k} {v:.2f}" for k, v in sorted(classes.items())) + " (device ms per call);"
                            f" held ahead: GPU {ahead_gpu:.2f}, host {ahead_host:.2f}")  # fmt: skip
                    rows.append(Row(bid, backend, n, wall, None, None, True, note, hidden, vocab))
                    detail.append({"work": work, "head": head, "n": n, "backend": backend, "wall_ms": wall,
                                   "held_ahead_ms": {"gpu": ahead_gpu, "host": ahead_host}, "device_ms": classes,
                                   "cuda_vs_triton_rel_err": err,
                                   "kernels": [{"name": k, "ms": ms, "launches": c} for k, ms, c in kernels[:40]]})
                    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
                    for name, ms, count in kernels[: args.top]:
                        print(f"    {ms:8.3f} ms  x{count:<6g} {name[:110]}", flush=True)
                del x, outs
                torch.cuda.empty_cache()
    path = write_results_extra(rows, None, {"profiles": detail, "kernel_classes": list(GEMM_MARKERS)}, tag="profile")
    print(f"results: {path}\n" + format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

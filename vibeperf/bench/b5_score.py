"""B5: NLL scoring of one 65,536-token sequence through a Qwen2.5-3B-shaped model, against a transformers forward
that materialises the logits.

    python -m vibeperf.bench.b5_score [--tokens 65536] [--layers 36] [--repeats 3] [--check-tokens 4096] [--out PATH]
    python -m vibeperf.bench.b5_score --tiny --backend torch --out /tmp/b5.json     # CPU-sized run of the same code

1. Model: Qwen2 with hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate 11,008, vocab 151,936, tied
   embeddings (Qwen2.5-3B's shape), random init, bf16 on the GPU. `--tiny`: hidden 128, 2 layers, 4 heads, 2 KV
   heads, intermediate 256, vocab 1,024, 512 tokens, fp32 on the CPU.
2. Input: one sequence of --tokens seeded random token ids; every token after the first is scored (T - 1 targets).
3. vibeperf: `vibeperf.score.score_samples` (one packed row, varlen attention, the final hidden states through the
   fused `linear_logprob`, which never forms the [T x V] logits).
4. Baseline: transformers' own path: `model(input_ids).logits` with sdpa attention ([1, T, V] in bf16), then fp32
   log-softmax and a gather, as its loss does. An out-of-memory error is caught and reported with the memory reached;
   the baseline is then retried at half the length, down to --min-baseline-tokens, and the longest run that fits is
   reported (its N column says which length).
5. Correctness before speed: the per-token log-probs of the first --check-tokens positions from vibeperf's full-length
   run against the baseline's fp32 log-softmax on that prefix (causal attention makes them the same quantities);
   relative error ||a - b|| / ||b|| <= 2e-2 (bf16 matmuls through the whole model, the tolerance of B4). A method that
   fails it is reported WRONG and its speed is left out.
6. Timing: one warm-up, then --repeats runs (synchronised wall clock), the median. Memory: max_memory_allocated during
   a run minus what was allocated before it (the weights and the ids), the figure B5's target bounds:
   peak <= weights + 8 GiB. Tokens/s = T / median time. FLOPs per forward 2 * P * T + 2 * n_layers * n_heads *
   head_dim * T^2 (P: parameters in matmuls, causal attention), as a fraction of a bf16 matmul peak measured in the
   same run (GPU only).
7. --compile (default on CUDA): vibeperf's scoring once more with the decoder blocks compiled, row
   "vibeperf-compile" (after the baseline, which stays transformers' eager forward).
A table is printed last; the JSON goes to --out or <results dir>/<gpu>_<date>_B5.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from vibeperf.model import matmul_params, step_flops

from .common import Row, format_table, machine_info, peak_matmul_tflops, relative_error, write_results

TOL = 2e-2
TARGET_EXTRA_GIB = 8.0


def model_config(tiny: bool, layers: int | None):
    from transformers import Qwen2Config

    if tiny:
        shape = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=layers or 2,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    else:
        shape = dict(vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=layers or 36,
                     num_attention_heads=16, num_key_value_heads=2)  # fmt: skip
    return Qwen2Config(**shape, max_position_embeddings=131_072, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, use_cache=False, use_sliding_window=False,
                       max_window_layers=shape["num_hidden_layers"])  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int) -> tuple[object, float, float | None]:
    """(result of the last call, median ms over `repeats` after one warm-up, peak extra GiB or None on the CPU)."""
    out = fn()
    times, peak = [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda":
            peak = max(peak or 0.0, (torch.cuda.max_memory_allocated(device) - base) / 2**30)
    return out, statistics.median(times), peak


def run(args) -> dict:
    from transformers import Qwen2ForCausalLM

    from vibeperf.model import Sample, use_varlen_attention
    from vibeperf.score import score_samples

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = args.tokens or (512 if args.tiny else 65_536)
    config = model_config(args.tiny, args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    n_params = matmul_params(model)
    flops = step_flops(config, n_params, [tokens]) / 3  # forward only: a third of the training step's FLOPs
    peak = peak_matmul_tflops() if device.type == "cuda" else None
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    sample = Sample(ids, torch.ones(tokens, dtype=torch.bool))
    check = min(args.check_tokens, tokens)
    rows, extra = [], {"weights_gib": weights_gib, "target_peak_gib": weights_gib + TARGET_EXTRA_GIB,
                       "tokens": tokens, "layers": config.num_hidden_layers, "dtype": str(dtype),
                       "device": str(device), "baseline_attempts": []}  # fmt: skip

    use_varlen_attention(model, "auto")
    ours_fn = lambda per_token: score_samples(model, [sample], token_budget=tokens, per_token=per_token,
                                              backend=args.backend)  # fmt: skip
    _, ms, mem = measure(lambda: ours_fn(False), device, args.repeats)
    (score,) = ours_fn(True)
    ours = torch.tensor(score.logprobs, dtype=torch.float64)  # [T - 1]

    model.set_attn_implementation("sdpa")
    input_ids = ids.long().to(device)

    @torch.no_grad()
    def baseline(n: int) -> torch.Tensor:
        logits = model(input_ids=input_ids[None, :n], use_cache=False).logits[0]  # [n, V]
        logp = logits.float().log_softmax(-1)  # [n, V] fp32, as transformers' loss upcasts
        return logp[:-1].gather(1, input_ids[1:n, None])[:, 0]

    ref = baseline(check).double().cpu()  # [check - 1]
    err = relative_error(ours[: check - 1], ref)
    ok = err <= TOL
    extra["vibeperf"] = {"rel_error": err, "nll_mean": score.nll_mean, "tokens_per_s": tokens / ms * 1e3,
                         "peak_extra_gib": mem,
                         "meets_target": None if mem is None else mem <= TARGET_EXTRA_GIB}  # fmt: skip
    note = f"{tokens / ms * 1e3:,.0f} tok/s, rel err {err:.1e}" + (
        "" if mem is None else f", peak {weights_gib + mem:.1f} GiB vs target {weights_gib + TARGET_EXTRA_GIB:.1f}"
    )
    rows.append(Row("B5", "vibeperf", tokens, ms if ok else None,
                    flops / (ms * 1e-3) / (peak * 1e12) if ok and peak else None, mem, ok,
                    note if ok else f"WRONG: rel err {err:.1e} > {TOL}"))  # fmt: skip

    n = tokens
    while n >= min(args.min_baseline_tokens, tokens) and not args.no_baseline:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        try:
            out, b_ms, b_mem = measure(lambda: baseline(n), device, args.repeats)
        except torch.OutOfMemoryError as e:
            reached = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
            extra["baseline_attempts"].append({"tokens": n, "status": "OOM", "extra_gib_reached": reached,
                                               "error": str(e).splitlines()[0][:200]})  # fmt: skip
            out = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            n //= 2
            continue
        b_err = relative_error(out[: check - 1].double().cpu(), ref) if n >= check else 0.0
        b_ok = b_err <= TOL
        extra["baseline_attempts"].append({"tokens": n, "status": "ok", "ms": b_ms, "peak_extra_gib": b_mem,
                                           "tokens_per_s": n / b_ms * 1e3})  # fmt: skip
        b_flops = step_flops(config, n_params, [n]) / 3
        oom = [a["tokens"] for a in extra["baseline_attempts"] if a["status"] == "OOM"]
        b_note = f"{n / b_ms * 1e3:,.0f} tok/s" + (f"; OOM at {', '.join(map(str, oom))} tokens" if oom else "")
        rows.append(Row("B5", "hf-logits", n, b_ms if b_ok else None,
                        b_flops / (b_ms * 1e-3) / (peak * 1e12) if b_ok and peak else None, b_mem, b_ok, b_note))
        break
    else:
        if not args.no_baseline:
            rows.append(Row("B5", "hf-logits", tokens, None, None, None, False,
                            f"OOM at every length down to {args.min_baseline_tokens}"))  # fmt: skip
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        rows.append(compiled_row(model, ours_fn, ref, check, device, args, flops, peak, weights_gib, extra))
    return {"rows": rows, "peak": peak, "extra": extra}


def compiled_row(model, ours_fn, ref, check, device, args, flops, peak, weights_gib, extra) -> Row:
    """vibeperf's scoring again with the decoder blocks compiled (`vibeperf.model.body`, as training's default
    compiles them on CUDA), after the eager rows: same checks, its own row "vibeperf-compile"."""
    from vibeperf.config import ModelConfig
    from vibeperf.model import use_varlen_attention
    from vibeperf.model.body import apply_body

    use_varlen_attention(model, "auto")
    apply_body(model, ModelConfig(compile=True))
    _, ms, mem = measure(lambda: ours_fn(False), device, args.repeats)
    (score,) = ours_fn(True)
    err = relative_error(torch.tensor(score.logprobs, dtype=torch.float64)[: check - 1], ref)
    ok = err <= TOL
    tokens = len(score.logprobs) + 1
    extra["vibeperf-compile"] = {"rel_error": err, "tokens_per_s": tokens / ms * 1e3, "peak_extra_gib": mem}
    note = f"{tokens / ms * 1e3:,.0f} tok/s, rel err {err:.1e}" + ("" if mem is None else
                                                                      f", peak {weights_gib + mem:.1f} GiB")
    return Row("B5", "vibeperf-compile", tokens, ms if ok else None,
               flops / (ms * 1e-3) / (peak * 1e12) if ok and peak else None, mem, ok,
               note if ok else f"WRONG: rel err {err:.1e} > {TOL}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and sequence on the CPU (a test of the code)")
    parser.add_argument("--tokens", type=int, default=0, help="sequence length (default 65536, tiny 512)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 36, tiny 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--check-tokens", type=int, default=4096, help="prefix compared with the baseline")
    parser.add_argument("--min-baseline-tokens", type=int, default=4096, help="shortest baseline retry after OOM")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help="also time vibeperf with compiled decoder blocks (auto: on CUDA)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the timed logits baseline")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "cuda"),
                        help="linear_logprob backend")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default <results dir>/..._B5.json)")
    args = parser.parse_args(argv)
    result = run(args)
    path = write_results(result["rows"], result["peak"], "B5", path=args.out)
    doc = json.loads(path.read_text())
    doc["extra"] = result["extra"]
    path.write_text(json.dumps(doc, indent=1))
    info = machine_info()
    print(f"B5 on {info['gpu']} (torch {info['torch']}, commit {info['commit']}): weights "
          f"{result['extra']['weights_gib']:.2f} GiB, target peak <= {result['extra']['target_peak_gib']:.2f} GiB")
    print(format_table(result["rows"]))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""B4: one packed-sequence SFT step of a Qwen2.5-3B-shaped model (random init) on one GPU, against a padded
transformers baseline on the same length mix.

    python -m vibeperf.bench.b4_sft [--samples 64] [--steps 3] [--budget 16384] [--max-len 8192] [--pad-batch 2]
                                [--layers 36] [--precision bf16-autocast|bf16] [--liger auto|on|off] [--no-write]

1. Peak: a plain 8192^3 bf16 matmul measured in this run (vibeperf.bench.common.peak_matmul_tflops).
2. Model: Qwen2 with hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate 11008, vocab 151,936, tied
   embeddings (Qwen2.5-3B's shape; 3.09B parameters), random init on the GPU. Precision "bf16-autocast" (the
   trainer's CUDA default: fp32 weights, grads and AdamW state, bf16 matmuls) or "bf16" (everything bf16). Activation
   checkpointing on for every method.
3. Length mix: seeded log-normal lengths (median 1,500 tokens, sigma 1.0) clipped to [64, --max-len]; the first 10%
   of each sample is prompt (no loss). Every method trains on the same samples, `--samples` per optimizer step.
   --max-len defaults to 8,192 so that the baseline's [batch x length x 151,936] logits (bf16, an fp32 copy and its
   gradient) fit beside fp32 weights and AdamW state on an 80 GB GPU.
4. Methods, all through forward + backward + grad clipping + fused AdamW (lr 0, so the weights stay identical):
   - packed: vibeperf (rows of --budget tokens by best-fit decreasing, varlen attention, fused LM-head CE on final
     hidden states; `vibeperf.sft.trainer.forward_backward`),
   - padded: transformers' own path: micro-batches of --pad-batch samples right-padded to the longest, sdpa
     attention with the padding mask, logits + transformers' CE (num_items_in_batch = the step's loss tokens),
   - packed+liger, padded+liger: the same with liger_kernel's RMSNorm/RoPE/SwiGLU, when liger_kernel imports (run
     after the others: Liger patches transformers' Qwen2 module for the whole process).
   A method that runs out of memory is reported as such; the padded baseline first retries with half the batch.
5. Correctness before speed: every method's loss on the first step must match the packed loss within 2e-2
   (relative; bf16 matmuls); a method that does not is reported WRONG and not timed.
6. Timing: one warm-up step, then --steps timed steps (synchronised wall clock). Reported: step ms, tokens/s over
   real (non-pad) tokens, MFU = model FLOPs / time / peak, with model FLOPs per step
   6 * P * T + 6 * n_layers * n_heads * head_dim * sum_d L_d^2 (P = parameters in matmuls, i.e. all but the input
   embedding, the tied LM head counted once; T = real tokens; causal attention; recompute and padding not counted),
   peak memory (max_memory_allocated during the timed steps) and extra memory above what the weights and optimizer
   state hold; N in the table is the mean real tokens of a timed step. Targets: MFU >= 0.45 and packed >= 2x the
   padded tokens/s.
A table is printed last; the JSON goes to <results dir>/<gpu>_<date>_B4.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import time

import torch

from vibeperf.model import IGNORE_INDEX, Sample, apply_liger, attention, matmul_params, pack_rows, step_flops
from vibeperf.sft import forward_backward
from vibeperf.train import clip_gradients

from .common import Row, format_table, peak_matmul_tflops, write_results_extra

TOL = 2e-2


def qwen25_3b_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32_768,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=False,
                       max_window_layers=layers, use_sliding_window=False)  # fmt: skip


def length_mix(n: int, max_len: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(1500) + torch.randn(n, generator=g)).round().clamp(64, max_len)
    return [int(x) for x in lengths]


def make_samples(lengths: list[int], vocab: int, seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32)
        mask = torch.ones(n, dtype=torch.bool)
        mask[: max(1, n // 10)] = False
        out.append(Sample(ids, mask))
    return out


def packed_step(model, samples, budget, autocast_dtype):
    rows = pack_rows(samples, budget)
    loss, _ = forward_backward(model, rows, loss_backend="auto", autocast_dtype=autocast_dtype)
    return loss


def padded_step(model, samples, pad_batch, autocast_dtype):
    """transformers' own training path on right-padded micro-batches; returns the step loss (device tensor)."""
    dev = next(model.parameters()).device
    n_items = torch.tensor(sum(s.num_loss_tokens for s in samples), device=dev)
    total = torch.zeros((), device=dev)
    ctx = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cuda", enabled=False)
    for i in range(0, len(samples), pad_batch):
        mb = samples[i : i + pad_batch]
        t = max(s.length for s in mb)
        ids = torch.zeros(len(mb), t, dtype=torch.long)
        labels = torch.full((len(mb), t), IGNORE_INDEX)
        mask = torch.zeros(len(mb), t, dtype=torch.long)
        for j, s in enumerate(mb):
            ids[j, : s.length], labels[j, : s.length], mask[j, : s.length] = s.input_ids, s.labels(), 1
        with ctx:
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev),
                        num_items_in_batch=n_items)  # fmt: skip
        out.loss.backward()
        total += out.loss.detach()
        del out
    return total


def run_method(name, model, steps_samples, step_fn, steps, peak, n_params, ref_loss):
    """Check the first step's loss, warm up, time `steps` steps; returns (Row, details dict).

    The optimizer (and whatever an out-of-memory step left behind) is freed by the caller's `_release`.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    tokens = sum(s.length for s in steps_samples[0])

    def one(samples):
        opt.zero_grad(set_to_none=True)
        loss = step_fn(samples)
        clip_gradients(model, 1.0)
        opt.step()
        return loss

    try:
        loss0 = float(one(steps_samples[0]))
        rel = abs(loss0 - ref_loss) / abs(ref_loss) if ref_loss is not None else 0.0
        if not math.isfinite(loss0) or rel > TOL:
            return Row("B4", name, tokens, None, None, None, False, f"WRONG: loss {loss0:.5f} vs {ref_loss}"), {}
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for k in range(steps):
            one(steps_samples[1 + k])
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return Row("B4", name, tokens, None, None, None, False, "out of memory"), {"oom": True}
    timed = steps_samples[1 : 1 + steps]
    real = sum(s.length for st in timed for s in st)
    flops = sum(step_flops(model.config, n_params, [s.length for s in st]) for st in timed)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    extra = peak_gib - held / 2**30
    tok_s = real / dt
    mfu = flops / dt / (peak * 1e12)
    detail = {"loss_first_step": loss0, "rel_loss_vs_packed": rel, "tokens_per_s": tok_s, "mfu": mfu,
              "step_ms": dt / steps * 1e3, "peak_gib": peak_gib, "extra_gib": extra, "real_tokens": real}  # fmt: skip
    note = f"{tok_s:,.0f} tok/s, MFU {mfu:.3f}, peak {peak_gib:.1f} GiB"
    return Row("B4", name, real // steps, dt / steps * 1e3, mfu, extra, True, note), detail


def _release(model) -> None:
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="samples per optimizer step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--budget", type=int, default=16384, help="packed row size in tokens")
    ap.add_argument("--max-len", type=int, default=8192, help="longest sample of the length mix")
    ap.add_argument("--pad-batch", type=int, default=2, help="samples per padded micro-batch (baseline)")
    ap.add_argument("--layers", type=int, default=36, help="decoder layers (36 for the 3B shape; fewer to smoke-test)")
    ap.add_argument("--precision", choices=("bf16-autocast", "bf16"), default="bf16-autocast")
    ap.add_argument("--liger", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="B4")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("B4 needs a CUDA GPU")
        return 2
    from transformers import Qwen2ForCausalLM

    from vibeperf.model import use_varlen_attention

    peak = peak_matmul_tflops()
    print(f"peak bf16 matmul (8192^3): {peak:.1f} TFLOP/s", flush=True)
    cfg = qwen25_3b_config(args.layers)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_params = matmul_params(model)
    autocast_dtype = torch.bfloat16 if args.precision == "bf16-autocast" else None
    steps_samples = [make_samples(length_mix(args.samples, args.max_len, args.seed + k), cfg.vocab_size,
                                  args.seed + k) for k in range(1 + args.steps)]  # fmt: skip
    lengths = [s.length for st in steps_samples for s in st]
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params ({n_params / 1e9:.2f}B in matmuls), "
          f"{args.samples} samples/step, mean length {sum(lengths) / len(lengths):.0f}, max {max(lengths)}", flush=True)

    have_liger = importlib.util.find_spec("liger_kernel") is not None
    if args.liger == "on" and not have_liger:
        raise SystemExit("--liger on: liger_kernel is not installed")
    variants = [""] + (["+liger"] if (args.liger == "on" or (args.liger == "auto" and have_liger)) else [])
    rows, details, ref = [], {}, None

    def with_speedups(rows, details):
        """The rows with "N.NNx padded" added to each packed row whose padded twin ran (details gain the ratio)."""
        out = []
        for r in rows:
            p, q = details.get(r.impl, {}), details.get(r.impl.replace("packed", "padded"), {})
            if r.impl.startswith("packed") and "tokens_per_s" in p and "tokens_per_s" in q:
                p["speedup_vs_padded"] = p["tokens_per_s"] / q["tokens_per_s"]
                r = dataclasses.replace(r, note=r.note + f", {p['speedup_vs_padded']:.2f}x padded")
            out.append(r)
        return out

    def write(rows, details):
        if args.no_write:
            return None
        extra = {"args": vars(args), "model": cfg.to_dict(), "matmul_params": n_params,
                 "flops_formula": "6*P*T + 6*n_layers*n_heads*head_dim*sum(L_d^2)", "methods": details,
                 "targets": {"mfu": 0.45, "speedup_vs_padded": 2.0}}  # fmt: skip
        return write_results_extra(with_speedups(rows, details), peak, extra, tag=args.tag)

    path = None
    for suffix in variants:
        if suffix:
            apply_liger(model)
        use_varlen_attention(model, "auto")
        attention.ATTENTION_CALLS.clear()
        name = "packed" + suffix
        row, det = run_method(name, model, steps_samples,
                              lambda s: packed_step(model, s, args.budget, autocast_dtype), args.steps, peak,
                              n_params, ref)  # fmt: skip
        _release(model)
        det["attention"] = dict(attention.ATTENTION_CALLS)
        ref = det.get("loss_first_step", ref) if ref is None else ref
        rows.append(row)
        details[name] = det
        print(format_table(rows[-1:]).splitlines()[-1], det["attention"], flush=True)
        model.set_attn_implementation("sdpa")
        pad = args.pad_batch
        while True:
            name = f"padded{suffix}"
            row, det = run_method(name, model, steps_samples, lambda s: padded_step(model, s, pad, autocast_dtype),
                                  args.steps, peak, n_params, ref)  # fmt: skip
            _release(model)
            if not det.get("oom") or pad == 1:
                break
            print(f"{name}: out of memory at --pad-batch {pad}, retrying with {pad // 2}", flush=True)
            pad //= 2
        row.note += f" (pad batch {pad})"
        det["pad_batch"] = pad
        rows.append(row)
        details[name] = det
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        path = write(rows, details)  # after every packed/padded pair: a later time-out keeps what ran
    print(f"results: {path}" if path else "results not written (--no-write)")
    print(f"\npeak {peak:.1f} TFLOP/s; ms = one optimizer step; 'of peak' = MFU; extra GiB above weights+optimizer\n"
          + format_table(with_speedups(rows, details)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

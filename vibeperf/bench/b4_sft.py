"""B4: the packed SFT step of the Qwen2.5-3B shape, every body switch and TRL side by side, in one process.

    python -m vibeperf.bench.b4_sft [--mixes lognormal,stage2] [--methods all|NAME,...] [--samples 16]
        [--stage2-samples 4] [--steps 2] [--budget 16384] [--stage2-budget 32768] [--layers 36]
        [--long 65536:full,131072:offload] [--profile NAME] [--tiny] [--no-write]

1. Peak: a plain 8192^3 bf16 matmul measured in this run (MFU denominator).
2. Model: Qwen2 hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate 11008, vocab 151,936, tied embeddings
   (Qwen2.5-3B's shape), random init from one seed: every method builds it afresh, so all start from equal weights.
3. Length mixes (seeded): "lognormal" (median 1,500 tokens, sigma 1, clipped to [64, 8192]) and "stage2"
   (log-uniform in [5,120, 32,768], the stage-2 curriculum). The first 10% of each sample is prompt (no loss).
   Every method trains on the same samples, one warm-up step then --steps timed steps.
4. Methods (`METHODS`; each forward + backward + grad clipping + fused AdamW at lr 0):
   - packed...: vibeperf's step (`vibeperf.sft.forward_backward`: rows of --budget tokens by best-fit decreasing,
     varlen attention, fused LM-head CE), with the body switches of `vibeperf.model.body` and the precision named
     in the method (table below);
   - trl-padding-free-liger: `trl.SFTTrainer(padding_free=True, use_liger_kernel=True)` (vibeperf.bench.b4_trl),
     with gradient checkpointing as TRL recommends (the yardstick of the "x trl" ratios); ...-ckpt-none: without;
   - padded: transformers' own path, micro-batches of --pad-batch samples right-padded, sdpa, logits + its CE (the
     floor; lognormal mix only unless --padded-all).
   Methods run one by one over the mixes; those with Liger (its kernels patch transformers' Qwen2 module for the
   whole process) run after the others and after the long rows.
5. Correctness before speed: each method's first-step loss must match the first method's within 2e-2 (relative;
   bf16 matmuls); one that does not is reported WRONG and not timed. Out of memory is reported as such.
6. Reported per row (TARGETS.md schema): ms per step, MFU (`vibeperf.model.step_flops`: 6*P*T + causal
   attention; recompute not counted) as frac_of_peak, extra GiB above weights+grads, and in the note tokens/s, peak
   GiB and, for packed rows, the speed-up over TRL of the same mix. JSON is rewritten after every method.
7. --long L:POLICY,...: one sequence of L tokens per step through the packed path with AdamW (state created on
   the warm-up step), checkpoint policy POLICY (auto: chosen for --memory-budget GiB), compile --long-compile:
   tokens/s and peak memory (row impl packed-long-L-POLICY). packed-default is ModelConfig's defaults (policy
   and compile "auto"); what "auto" chose is in the JSON (methods.<key>.body.why).
8. --profile NAME: one more step of method NAME under torch.profiler; GPU time by category (attention, matmuls,
   norms+activations, LM head, optimizer, other) goes into the JSON and is printed (vibeperf.bench.step_profile).
--tiny runs everything on a 2-layer toy shape on the CPU (the smoke test of the GPU command).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.util
import math
import re
import time
from dataclasses import dataclass

import torch

from vibeperf.config import ModelConfig
from vibeperf.model import IGNORE_INDEX, Sample, apply_liger, matmul_params, pack_rows, step_flops
from vibeperf.model.attention import resolve_attention, use_varlen_attention
from vibeperf.model.body import apply_body, body_report
from vibeperf.sft import forward_backward
from vibeperf.train import MasterAdamW, clip_gradients

from .common import Row, format_table, peak_matmul_tflops, write_results_extra

TOL = 2e-2


@dataclass(frozen=True)
class Method:
    """One B4 method: how the packed step runs (ignored for the baselines)."""

    name: str
    kind: str = "packed"
    """packed | trl | padded"""
    checkpoint: str = "full"
    """none | full | save-matmuls | offload | auto (ModelConfig.checkpoint_policy)"""
    every: int = 1
    compile: bool | str = False
    """True | False | "auto" (ModelConfig.compile)"""
    precision: str = "bf16-autocast"
    """bf16-autocast (fp32 weights) | bf16-master (bf16 weights, fp32 masters) | bf16"""
    liger: bool = False


METHODS = [
    Method("packed-default", checkpoint="auto", compile="auto"),
    Method("packed"),
    Method("packed-ckpt-save-matmuls", checkpoint="save-matmuls"),
    Method("packed-ckpt-every2", every=2),
    Method("packed-ckpt-none", checkpoint="none"),
    Method("packed-compile", compile=True),
    Method("packed-compile-save-matmuls", checkpoint="save-matmuls", compile=True),
    Method("packed-bf16-master", precision="bf16-master"),
    Method("packed-compile-bf16-master", compile=True, precision="bf16-master"),
    Method("padded", kind="padded"),
    Method("packed+liger", liger=True),
    Method("packed-bf16-master+liger", precision="bf16-master", liger=True),
    Method("trl-padding-free-liger", kind="trl", liger=True),
    Method("trl-padding-free-liger-ckpt-none", kind="trl", liger=True, checkpoint="none"),
]
"""The methods of `--methods all`; `parse_method` also builds any other combination of the packed switches."""

_PACKED_SWITCH = re.compile(r"-compile|-ckpt-(none|full|save-matmuls|offload|every(\d+))|-bf16-master|\+liger")


def parse_method(name: str) -> Method:
    """A listed method, or "packed" followed by switches in any combination: -compile, -ckpt-none|full|save-matmuls|
    offload|everyK, -bf16-master, +liger (e.g. "packed-compile-ckpt-every2-bf16-master")."""
    listed = {m.name: m for m in METHODS}
    if name in listed:
        return listed[name]
    rest = name.removeprefix("packed")
    fields: dict = {}
    while rest and (sw := _PACKED_SWITCH.match(rest)) is not None:
        token, rest = sw.group(0), rest[sw.end() :]
        if token == "-compile":
            fields["compile"] = True
        elif token == "-bf16-master":
            fields["precision"] = "bf16-master"
        elif token == "+liger":
            fields["liger"] = True
        elif sw.group(2):
            fields["every"] = int(sw.group(2))
        else:
            fields["checkpoint"] = sw.group(1)
    if not name.startswith("packed") or rest or fields.get("every", 1) < 1:
        known = ", ".join(listed)
        raise SystemExit(f"--methods: unknown method {name!r}; known: {known}, or packed + switches (parse_method)")
    return Method(name, **fields)


def qwen25_3b_config(layers: int, tiny: bool = False):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=True, use_cache=False)  # fmt: skip
    return Qwen2Config(vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=131_072,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=False,
                       max_window_layers=layers, use_sliding_window=False)  # fmt: skip


def length_mix(mix: str, n: int, max_len: int, seed: int) -> list[int]:
    """Seeded sample lengths of a mix (module docstring, step 3); `max_len` caps both."""
    g = torch.Generator().manual_seed(seed)
    if mix == "lognormal":
        lengths = torch.exp(math.log(1500) + torch.randn(n, generator=g)).round().clamp(64, max_len)
    elif mix == "stage2":
        lo, hi = math.log(5120), math.log(32768)
        lengths = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g)).round().clamp(1, max_len)
    else:
        raise ValueError(f"unknown mix {mix!r}: lognormal or stage2")
    return [int(x) for x in lengths]


def make_samples(lengths: list[int], vocab: int, seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for n in lengths:
        mask = torch.ones(n, dtype=torch.bool)
        mask[: max(1, n // 10)] = False
        out.append(Sample(torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32), mask))
    return out


def build_model(cfg, m: Method, dev: torch.device, seed: int, row_tokens: int | None = None,
                memory_budget: float = 0.0):
    """A fresh model of `cfg` from `seed` on `dev`, with the method's precision, Liger and body switches ("auto"
    ones resolved for rows of `row_tokens` and `memory_budget` GiB, 0: the GPU's)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(dev):
        model = Qwen2ForCausalLM(copy.deepcopy(cfg))  # TRL rewrites its model's config (pad/eos ids)
    if m.precision in ("bf16", "bf16-master"):
        model.to(torch.bfloat16)
    if m.liger:
        apply_liger(model)
    use_varlen_attention(model, "auto")
    if m.kind == "packed":
        body = ModelConfig(activation_checkpointing=m.checkpoint != "none",
                           checkpoint_policy="full" if m.checkpoint == "none" else m.checkpoint,
                           checkpoint_every=m.every, compile=m.compile, memory_budget_gib=memory_budget)  # fmt: skip
        apply_body(model, body, row_tokens=row_tokens, optimizer_bytes=12 if m.precision == "bf16-master" else 8)
    elif m.kind == "padded":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.set_attn_implementation("sdpa")
    model.train()
    return model


def padded_step(model, samples, pad_batch, autocast_dtype):
    """transformers' own training path on right-padded micro-batches; returns the step loss (device tensor)."""
    dev = next(model.parameters()).device
    n_items = torch.tensor(sum(s.num_loss_tokens for s in samples), device=dev)
    total = torch.zeros((), device=dev)
    for i in range(0, len(samples), pad_batch):
        mb = samples[i : i + pad_batch]
        t = max(s.length for s in mb)
        ids = torch.zeros(len(mb), t, dtype=torch.long)
        labels = torch.full((len(mb), t), IGNORE_INDEX)
        mask = torch.zeros(len(mb), t, dtype=torch.long)
        for j, s in enumerate(mb):
            ids[j, : s.length], labels[j, : s.length], mask[j, : s.length] = s.input_ids, s.labels(), 1
        with torch.autocast(dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev),
                        num_items_in_batch=n_items)  # fmt: skip
        out.loss.backward()
        total += out.loss.detach()
        del out
    return total


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, m: Method, steps_samples, budget: int, pad_batch: int, dev) -> dict:
    """First-step loss, then the wall time of steps 1.. and the peak memory (details dict)."""
    kw = {"lr": 0.0, **({"fused": True} if dev.type == "cuda" else {"foreach": True})}
    opt = (MasterAdamW if m.precision == "bf16-master" else torch.optim.AdamW)(model.parameters(), **kw)
    autocast = torch.bfloat16 if m.precision == "bf16-autocast" and dev.type == "cuda" else None

    def one(samples):
        opt.zero_grad(set_to_none=True)
        if m.kind == "padded":
            loss = padded_step(model, samples, pad_batch, autocast)
        else:
            loss, _ = forward_backward(model, pack_rows(samples, budget), autocast_dtype=autocast)
        clip_gradients(model, 1.0)
        opt.step()
        return loss

    loss0 = float(one(steps_samples[0]))
    _sync(dev)
    held = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for st in steps_samples[1:]:
        one(st)
    _sync(dev)
    out = {"loss_first_step": loss0, "seconds": time.perf_counter() - t0, "opt": opt}
    if dev.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["held_gib"] = held / 2**30
    return out


def run_one(m: Method, ctx) -> tuple[Row, dict]:
    """Build, check and time method `m` on `ctx.steps_samples`; returns its row and details."""
    args, dev, steps_samples = ctx.args, ctx.dev, ctx.steps_samples
    tokens = sum(s.length for s in steps_samples[0])
    model, det = None, {"method": dataclasses.asdict(m)}
    try:
        model = build_model(ctx.cfg, m, dev, args.seed, ctx.budget, args.memory_budget)
        if m.kind == "trl":
            from .b4_trl import run_trl

            res = run_trl(model, steps_samples, batch=ctx.trl_batch, attention=args.trl_attention, liger=m.liger,
                          tokenizer_path=ctx.tokenizer_path, checkpointing=m.checkpoint != "none")  # fmt: skip
        else:
            res = time_steps(model, m, steps_samples, ctx.budget, args.pad_batch, dev)
            res.pop("opt")
            if m.kind == "packed":
                det["body"] = body_report(model)
    except torch.OutOfMemoryError:
        return Row(ctx.args.tag, m.name, tokens, None, None, None, False, "out of memory"), {**det, "oom": True}
    except Exception as e:  # a baseline that cannot run is reported with its reason, the run goes on
        if m.kind == "packed" and m.name == ctx.methods[0].name:
            raise
        why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return Row(ctx.args.tag, m.name, tokens, None, None, None, False, f"did not run: {why}"), {**det, "error": why}
    finally:
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    det.update(res)
    loss0 = res["loss_first_step"]
    if ctx.ref_loss is None:
        ctx.ref_loss = loss0
    rel = abs(loss0 - ctx.ref_loss) / abs(ctx.ref_loss)
    det["rel_loss_vs_first"] = rel
    if not math.isfinite(loss0) or rel > TOL:
        why = f"WRONG: loss {loss0:.5f} vs {ctx.ref_loss:.5f}"
        return Row(ctx.args.tag, m.name, tokens, None, None, None, False, why), det
    timed = steps_samples[1:]
    real = sum(s.length for st in timed for s in st)
    dt = res["seconds"]
    flops = sum(step_flops(ctx.cfg, ctx.n_params, [s.length for s in st]) for st in timed)
    mfu = flops / dt / (ctx.peak * 1e12) if ctx.peak else None
    det.update(tokens_per_s=real / dt, mfu=mfu, step_ms=dt / len(timed) * 1e3, real_tokens=real)
    extra = res["peak_gib"] - ctx.weights_gib if res.get("peak_gib") is not None else None
    note = f"{real / dt:,.0f} tok/s" + (f", peak {res['peak_gib']:.1f} GiB" if res.get("peak_gib") else "")
    return Row(ctx.args.tag, m.name, real // len(timed), dt / len(timed) * 1e3, mfu, extra, True, note), det


def run_long(length: int, policy: str, ctx) -> tuple[Row, dict]:
    """One sequence of `length` tokens per step, packed path with AdamW, checkpoint policy `policy`."""
    m = Method(f"packed-long-{length}-{policy}", checkpoint=policy, compile=ctx.long_compile)
    saved = (ctx.steps_samples, ctx.budget, ctx.ref_loss)
    ctx.steps_samples = [make_samples([length], ctx.cfg.vocab_size, ctx.args.seed + 100 + k) for k in range(2)]
    ctx.budget, ctx.ref_loss = length, None
    try:
        return run_one(m, ctx)
    finally:
        ctx.steps_samples, ctx.budget, ctx.ref_loss = saved


def with_speedups(rows: list[Row], details: dict) -> list[Row]:
    """Packed rows gain "N.NNx trl" (same mix) where TRL ran; details gain the ratio."""
    out = []
    for r in rows:
        mix, _, impl = r.impl.partition(":")
        trl = next((k for k in details if k.startswith(f"{mix}:trl-") and "-ckpt-" not in k), "")
        p, q = details.get(r.impl, {}), details.get(trl, {})
        if impl.startswith("packed") and "tokens_per_s" in p and "tokens_per_s" in q:
            p["speedup_vs_trl"] = p["tokens_per_s"] / q["tokens_per_s"]
            r = dataclasses.replace(r, note=r.note + f", {p['speedup_vs_trl']:.2f}x trl")
        out.append(r)
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixes", default="lognormal,stage2", help="comma list of lognormal, stage2 (or none)")
    ap.add_argument("--methods", default="all", help=f"all, or a comma list of {[m.name for m in METHODS]}")
    ap.add_argument("--samples", type=int, default=16, help="samples per step, lognormal mix")
    ap.add_argument("--stage2-samples", type=int, default=4, help="samples per step, stage2 mix")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    ap.add_argument("--budget", type=int, default=16384, help="packed row tokens, lognormal mix")
    ap.add_argument("--stage2-budget", type=int, default=32768, help="packed row tokens, stage2 mix")
    ap.add_argument("--max-len", type=int, default=8192, help="longest lognormal sample")
    ap.add_argument("--pad-batch", type=int, default=2, help="samples per padded micro-batch")
    ap.add_argument("--padded-all", action="store_true", help="run the padded floor on the stage2 mix too")
    ap.add_argument("--trl-batch", type=int, default=0, help="samples per TRL micro-batch (0: about one row)")
    ap.add_argument("--trl-attention", choices=("vibeperf", "sdpa"), default="vibeperf")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--long", default="", help="comma list of LENGTH:POLICY (policy full|save-matmuls|offload)")
    ap.add_argument("--memory-budget", type=float, default=0.0,
                    help="GiB for checkpoint policy auto (model.memory_budget_gib; 0: the GPU's memory)")
    ap.add_argument("--long-compile", default="auto", choices=("auto", "on", "off"), help="compile of the long rows")
    ap.add_argument("--profile", default="", help="profile one more step of this method (first mix)")
    ap.add_argument("--tiny", action="store_true", help="toy shape on the CPU (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="B4")
    ap.add_argument("--no-write", action="store_true")
    return ap.parse_args(argv)


def select_methods(spec: str, tiny: bool) -> list[Method]:
    chosen = METHODS if spec == "all" else [parse_method(name) for name in spec.split(",")]
    have_liger = importlib.util.find_spec("liger_kernel") is not None
    out = []
    for m in chosen:
        if tiny and m.compile is not False:
            m = dataclasses.replace(m, compile=False)  # inductor's CPU compile time has no place in a smoke test
        if m.liger and not have_liger:
            if m.kind != "trl":
                continue
            m = dataclasses.replace(m, liger=False, name=m.name.replace("-liger", "-noliger"))
        out.append(m)
    return sorted(out, key=lambda m: m.liger)  # Liger patches transformers' Qwen2 module for the process: last


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("B4 needs a CUDA GPU (or --tiny on the CPU)")
        return 2
    dev = torch.device("cpu" if args.tiny else "cuda")
    peak = None if args.tiny else peak_matmul_tflops()
    print(f"peak bf16 matmul (8192^3): {peak:.1f} TFLOP/s" if peak else "peak: none (CPU)", flush=True)
    cfg = qwen25_3b_config(args.layers, args.tiny)
    methods = select_methods(args.methods, args.tiny)
    from vibeperf.model import model_path

    probe = build_model(cfg, Method("probe", checkpoint="none"), torch.device("meta"), args.seed)
    n_params = matmul_params(probe)
    weights_gib = sum(p.numel() for p in probe.parameters()) * 8 / 2**30  # fp32 weights + grads
    del probe
    ctx = argparse.Namespace(args=args, dev=dev, cfg=cfg, peak=peak, n_params=n_params, methods=methods,
                             weights_gib=weights_gib, ref_loss=None, tokenizer_path=model_path("tiny"),
                             steps_samples=None, budget=0, trl_batch=1,
                             long_compile={"on": True, "off": False}.get(args.long_compile, "auto"))  # fmt: skip
    attn = resolve_attention("auto", dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    print(f"{n_params / 1e9:.3f}B matmul params; attention {attn[0]}: {attn[1]}", flush=True)
    rows, details, path = [], {}, None

    def record(key: str, row: Row, det: dict):
        nonlocal path
        rows.append(dataclasses.replace(row, impl=key))
        details[key] = {k: v for k, v in det.items() if k != "opt"}
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        if not args.no_write:
            extra = {"args": vars(args), "model": cfg.to_dict(), "matmul_params": n_params, "attention": attn,
                     "flops_formula": "6*P*T + 6*n_layers*n_heads*head_dim*sum(L_d^2)", "methods": details,
                     "targets": {"mfu": 0.55, "speedup_vs_trl": 1.3}}  # fmt: skip
            path = write_results_extra(with_speedups(rows, details), peak, extra, tag=args.tag)

    mixes = {}
    for mix in [x for x in args.mixes.split(",") if x and x != "none"]:
        n, budget = (args.samples, args.budget) if mix == "lognormal" else (args.stage2_samples, args.stage2_budget)
        max_len = args.max_len if mix == "lognormal" else budget
        if args.tiny:
            max_len, budget = min(max_len, 512), min(budget, 1024)
        samples = [make_samples(length_mix(mix, n, max_len, args.seed + k), cfg.vocab_size, args.seed + k)
                   for k in range(1 + args.steps)]  # fmt: skip
        mean_len = sum(s.length for st in samples for s in st) / (n * (1 + args.steps))
        trl_batch = args.trl_batch or max(1, min(n, int(budget // mean_len)))
        while n % trl_batch:
            trl_batch -= 1
        mixes[mix] = {"steps_samples": samples, "budget": budget, "trl_batch": trl_batch, "ref_loss": None}
        print(f"mix {mix}: {n} samples/step, mean length {mean_len:.0f}, row budget {budget}", flush=True)
    if args.profile and args.profile not in [m.name for m in methods]:
        raise SystemExit(f"--profile {args.profile!r} is not among the methods run")

    def long_rows():
        for item in [x for x in args.long.split(",") if x]:
            length, _, policy = item.partition(":")
            row, det = run_long(int(length), policy or "full", ctx)
            record(row.impl, row, det)

    # Method by method over the mixes, so that every method without Liger (and the long rows) runs before Liger
    # patches transformers' Qwen2 module for the rest of the process.
    for m in methods:
        if m.liger and args.long:
            long_rows()
            args.long = ""
        for mix, state in mixes.items():
            if m.kind == "padded" and mix != "lognormal" and not args.padded_all:
                continue
            vars(ctx).update(state)
            row, det = run_one(m, ctx)
            state["ref_loss"] = ctx.ref_loss
            record(f"{mix}:{m.name}", row, det)
            if m.name == args.profile and mix == next(iter(mixes)):
                from .step_profile import profile_method

                details[f"{mix}:profile:{m.name}"] = profile_method(m, ctx, build_model, time_steps)
    long_rows()
    print(f"results: {path}" if path else "results not written (--no-write)")
    print(f"\npeak {peak} TFLOP/s; ms = one optimizer step; 'of peak' = MFU; extra GiB above fp32 weights+grads\n"
          + format_table(with_speedups(rows, details)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

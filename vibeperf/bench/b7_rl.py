"""B7: the RL policy update of a Qwen2.5-3B-shaped model (random init) on one GPU: old log-probs (skipped when the
step is on-policy) + the MGPO loss + an AdamW step, on fixed random completions (no rollout engine).

    python -m vibeperf.bench.b7_rl [--prompts 64] [--group 8] [--min-len 1024] [--max-len 4096] [--long 16384 65536]
                                   [--steps 2] [--budget 16384] [--layers 36] [--no-write]
    python -m vibeperf.bench.b7_rl --cpu --prompts 4 --group 4 --min-len 32 --max-len 96 --budget 512   # tiny, CPU

1. Peak: a plain 8192^3 bf16 matmul measured in this run (vibeperf.bench.common.peak_matmul_tflops); none on the CPU.
2. Model: the Qwen2.5-3B shape of B4 (`b4_sft.qwen25_3b_config`; --layers fewer to smoke-test), random init, fp32
   weights with bf16 autocast and activation checkpointing, its policy and compile as the RL trainer's defaults
   choose them ("auto", `vibeperf.model.body.resolve_body`; --policy, --compile, --memory-budget override); with
   --cpu the tiny Qwen2 (`vibeperf.tiny_model`) in fp32, no checkpointing.
3. Rollouts: P = --prompts prompts of --prompt-len random tokens, each with G = --group completions of random tokens,
   lengths uniform in [--min-len, --max-len] (seeded), engine log-probs random, rewards random 0/1 per completion.
   Advantages through the trainer's own `vibeperf.rl.advantages.group_advantages`; rows packed by the trainer's
   `pack_sequences` into rows of --budget tokens (raised to the longest sequence when that is longer). Each --long L
   adds a case of --long-prompts prompts x G completions of exactly L tokens (the Long2Short phase's lengths).
4. Modes, both through the trainer's `vibeperf.rl.update.policy_update` with one minibatch (the on-policy step):
   - `packed-onpolicy`: the update as the trainer runs it; the old log-probs are the loss forward's own, detached;
   - `packed-oldlogp`: `force_old_logp_pass`, the separate no-grad forward of every row first (what the trainer did
     before, and still does with several minibatches).
5. Correctness before speed: from the same weights (AdamW at lr 0 keeps them), the two modes' loss, entropy and
   gradients must agree within --tol (relative; 2e-2 for bf16 matmuls, 1e-5 for fp32 on the CPU); a case that does
   not is reported WRONG and not timed.
6. Timing: the check of step 5 runs each mode once (their warm-up), then --steps timed updates (synchronised wall
   clock), the modes alternating.
   Reported: the median ms of an update, tokens/s over all prompt + completion tokens, MFU = FLOPs / time / peak
   with FLOPs per update 6 * P * T + 6 * n_layers * n_heads * head_dim * sum_d L_d^2 (the B4 formula: training
   forward + backward, no recompute) plus a third of it when the old-log-prob forward runs; peak memory
   (max_memory_allocated during the timed updates) and extra memory above weights + AdamW state. The speed-up of the
   skip is on the on-policy row. The skip saves the body's forward but adds a no-grad LM-head pass (mgpo_loss takes
   old_logp as an input), so it pays where the body dominates (the 3B shape), not on the tiny model, whose cost on
   the CPU is mostly per-row overhead.
A table is printed last; on a GPU the JSON goes to <results dir>/<gpu>_<date>_<--tag>.json, rewritten after every
case (rows carry the tag as their id).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import time

import torch

from vibeperf.config import ModelConfig
from vibeperf.model import FusedLossLM, matmul_params, step_flops, use_varlen_attention
from vibeperf.model.body import apply_body, body_report
from vibeperf.rl.advantages import group_advantages
from vibeperf.rl.config import LossConfig
from vibeperf.rl.data import pack_sequences
from vibeperf.rl.update import UpdateOptions, policy_update
from vibeperf.rollout import Completion, RolloutGroup

from .b4_sft import qwen25_3b_config
from .common import Row, format_table, peak_matmul_tflops, write_results_extra

MODES = {"packed-onpolicy": False, "packed-oldlogp": True}


@dataclasses.dataclass
class Case:
    """One update's inputs: packed rows on the device, advantages, and the sequence lengths for FLOP accounting."""

    name: str
    rows: list
    advantages: torch.Tensor
    seq_lengths: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.seq_lengths)


def make_case(name, prompts, group, lengths, prompt_len, vocab, budget, device, seed) -> Case:
    """P prompts x G completions of the given lengths (one per completion, prompt-major) as the trainer packs them."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for p in range(prompts):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        done = []
        for n in lengths[p * group : (p + 1) * group]:
            ids = torch.randint(0, vocab, (n,), generator=g).tolist()
            done.append(Completion(ids, -2.0 * torch.rand(n, generator=g), "stop", ""))
        groups.append(RolloutGroup(prompt, done))
    rewards = (torch.rand(prompts * group, generator=g) < 0.5).double()
    group_index = torch.arange(prompts).repeat_interleave(group)
    adv, _, _ = group_advantages(
        rewards.to(device),
        torch.tensor(lengths, device=device),
        group_index.to(device),
        num_groups=prompts,
        mgpo_lambda=1.0,
        scale="group",
        long2short_lambda=None,
    )
    budget = max(budget, prompt_len + max(lengths))
    rows = [(r.to(device), True) for r in pack_sequences(groups, list(range(prompts * group)), budget)]
    return Case(name, rows, adv, [prompt_len + n for n in lengths])


def build_model(args, device, row_tokens: int):
    """The model of step 2, its body set up as the RL trainer's defaults would (`ModelConfig`: checkpoint policy and
    compile "auto", for rows of `row_tokens` tokens; --policy / --compile override)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.cpu:
        from vibeperf.tiny_model import get_tiny_model

        cfg = AutoConfig.from_pretrained(get_tiny_model())
    else:
        cfg = qwen25_3b_config(args.layers)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    use_varlen_attention(model, "auto")
    compile_on = {"on": True, "off": False}.get(args.compile, "auto")
    body = ModelConfig(activation_checkpointing=not args.cpu, checkpoint_policy=args.policy, compile=compile_on,
                       memory_budget_gib=args.memory_budget)  # fmt: skip
    apply_body(model, body, row_tokens=row_tokens)
    model.config.use_cache = False
    return model.train()


def run_update(root, opt, case: Case, force: bool, opts: UpdateOptions) -> dict:
    opts = dataclasses.replace(opts, loss=dataclasses.replace(opts.loss, force_old_logp_pass=force))
    return policy_update(root, opt, [case.rows], case.advantages, opts)


def check(root, model, opt, case: Case, opts: UpdateOptions, tol: float) -> tuple[bool, str, dict]:
    """Both modes from the same weights (lr 0): loss, entropy and gradients within tol of each other.

    The gradients are compared parameter by parameter (fp64 sums of squares): one saved fp32 copy of the on-policy
    gradients, never a concatenated or fp64 copy of all 3B of them (that alone would need ~75 GiB)."""
    params = [p for p in model.parameters()]
    on = {k: float(v) for k, v in run_update(root, opt, case, False, opts).items()}
    saved = [None if p.grad is None else p.grad.detach().float().clone() for p in params]
    model.zero_grad(set_to_none=True)
    ref = {k: float(v) for k, v in run_update(root, opt, case, True, opts).items()}
    diff_sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
    ref_sq = torch.zeros_like(diff_sq)
    finite = True
    for p, a in zip(params, saved):
        if a is None or p.grad is None:
            continue
        finite = finite and bool(torch.isfinite(a).all())
        diff_sq += (a.double() - p.grad.double()).square().sum()
        ref_sq += p.grad.double().square().sum()
    del saved
    model.zero_grad(set_to_none=True)
    errs = {
        "loss": abs(on["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12),
        "entropy": abs(on["entropy_mean"] - ref["entropy_mean"]) / max(abs(ref["entropy_mean"]), 1e-12),
        "grad": float(diff_sq.sqrt() / ref_sq.sqrt().clamp_min(1e-30)) if finite else float("inf"),
    }
    ok = all(math.isfinite(e) and e <= tol for e in errs.values()) and math.isfinite(on["loss"])
    note = ", ".join(f"{k} rel err {v:.1e}" for k, v in errs.items())
    return ok, note, {"errors": errs, "loss": ref["loss"], "entropy_mean": ref["entropy_mean"]}


def time_case(root, model, opt, case: Case, opts: UpdateOptions, steps: int, device) -> dict[str, dict]:
    """Alternating timed updates of the two modes (the check has run each once: that is their warm-up, compile and
    autotuning included); per mode: the median seconds of an update (every sample kept), peak GiB and extra GiB
    above what was held before."""
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {m: [] for m in MODES}
    peaks = {m: 0.0 for m in MODES}
    held = torch.cuda.memory_allocated() if cuda else 0
    for _ in range(steps):
        for name, force in MODES.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            run_update(root, opt, case, force, opts)
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
            times[name].append(time.perf_counter() - t0)
    return {
        m: {
            "s": statistics.median(times[m]),
            "samples_s": times[m],
            "peak_gib": peaks[m] if cuda else None,
            "extra_gib": peaks[m] - held / 2**30 if cuda else None,
        }
        for m in MODES
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="P: prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    ap.add_argument("--min-len", type=int, default=1024, help="shortest completion (tokens)")
    ap.add_argument("--max-len", type=int, default=4096, help="longest completion (tokens)")
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt tokens")
    ap.add_argument("--long", type=int, nargs="*", default=[], help="extra cases: completions of exactly L tokens")
    ap.add_argument("--long-prompts", type=int, default=1, help="prompts of each --long case")
    ap.add_argument("--budget", type=int, default=16384, help="packed row size in tokens (loss.token_budget)")
    ap.add_argument("--steps", type=int, default=2, help="timed updates per mode (after one warm-up each)")
    ap.add_argument("--layers", type=int, default=36, help="decoder layers (36 for the 3B shape)")
    ap.add_argument("--tol", type=float, default=None, help="relative tolerance of the check (default by precision)")
    ap.add_argument("--policy", default="auto", choices=("auto", "full", "save-matmuls", "offload"),
                    help="activation checkpoint policy (model.checkpoint_policy)")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="model.compile")
    ap.add_argument("--memory-budget", type=float, default=0.0, help="GiB for policy auto (0: the GPU's memory)")
    ap.add_argument("--cpu", action="store_true", help="the tiny model on the CPU (fp32), for a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="B7")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("B7 needs a CUDA GPU (or --cpu for the tiny model)")
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    peak = None if args.cpu else peak_matmul_tflops()
    if peak:
        print(f"peak bf16 matmul (8192^3): {peak:.1f} TFLOP/s", flush=True)
    model = build_model(args, device, max(args.budget, args.prompt_len + max([args.max_len, *args.long])))
    print(f"body: {body_report(model)}", flush=True)
    root = FusedLossLM(model)
    n_params = matmul_params(model)
    autocast = None if args.cpu else torch.bfloat16
    tol = args.tol if args.tol is not None else (1e-5 if args.cpu else 2e-2)
    loss = LossConfig(mgpo_lambda=1.0, eps_high=0.28, token_budget=args.budget, backend="torch" if args.cpu else "auto")
    opts = UpdateOptions(loss, grad_clip=1.0, device=device, autocast=autocast)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, **({"foreach": True} if args.cpu else {"fused": True}))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    n = args.prompts * args.group
    mixed = torch.randint(args.min_len, args.max_len + 1, (n,), generator=g).tolist()
    cases = [(f"{args.prompts}x{args.group} {args.min_len}-{args.max_len}", args.prompts, mixed)]
    cases += [
        (f"{args.long_prompts}x{args.group} {L}", args.long_prompts, [L] * (args.long_prompts * args.group))
        for L in args.long
    ]
    print(
        f"model {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params, device {device}, cases "
        f"{[c[0] for c in cases]}",
        flush=True,
    )
    rows, details, path = [], {}, None
    for k, (label, prompts, lengths) in enumerate(cases):
        case = make_case(
            label, prompts, args.group, lengths, args.prompt_len, vocab, args.budget, device, args.seed + k
        )
        flops = step_flops(model.config, n_params, case.seq_lengths)
        try:
            ok, note, det = check(root, model, opt, case, opts, tol)
            timed = time_case(root, model, opt, case, opts, args.steps, device) if ok else {}
        except torch.OutOfMemoryError:
            ok, note, det, timed = False, "out of memory", {"oom": True}, {}
        det["rows"], det["tokens"] = len(case.rows), case.tokens
        for name, force in MODES.items():
            impl = f"{name} {label}"
            if not ok:
                rows.append(Row(args.tag, impl, case.tokens, None, None, None, False, f"WRONG or failed: {note}"))
                continue
            t = timed[name]
            work = flops * (4 / 3 if force else 1.0)
            mfu = work / t["s"] / (peak * 1e12) if peak else None
            tok_s = case.tokens / t["s"]
            det[name] = {"ms": t["s"] * 1e3, "tokens_per_s": tok_s, "mfu": mfu, "flops": work, **t}
            text = f"{tok_s:,.0f} tok/s" + (f", MFU {mfu:.3f}, peak {t['peak_gib']:.1f} GiB" if peak else "")
            rows.append(Row(args.tag, impl, case.tokens, t["s"] * 1e3, mfu, t["extra_gib"], True, text))
        if ok:
            speedup = det["packed-oldlogp"]["s"] / det["packed-onpolicy"]["s"]
            det["skip_speedup"] = speedup
            rows[-2] = dataclasses.replace(rows[-2], note=rows[-2].note + f", {speedup:.2f}x the old-logp pass; {note}")
        details[label] = det
        print(format_table(rows[-2:]), flush=True)
        if not args.no_write and not args.cpu:  # after every case: a run stopped later keeps the cases it finished
            extra = {
                "args": vars(args),
                "model": model.config.to_dict(),
                "matmul_params": n_params,
                "flops_formula": "6*P*T + 6*n_layers*n_heads*head_dim*sum(L_d^2), x4/3 with the old-logp forward",
                "cases": details,
                "body": body_report(model),
            }
            path = write_results_extra(rows, peak, extra, tag=args.tag)
        del case
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"results: {path}" if path else "results not written (--no-write or --cpu)")
    print(
        "\nms = one policy update (one minibatch); 'of peak' = MFU over the FLOPs run; extra GiB above weights + "
        "AdamW state\n" + format_table(rows)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

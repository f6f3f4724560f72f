"""Multi-GPU check (issue 10): torchrun + FSDP2 on 2 GPUs against 1 GPU, for the SFT and RL trainers.

    python -m vibeperf.bench.dist_check          # a machine with 2 GPUs (bash scripts/gpu_all.sh dist)
    python -m vibeperf.bench.dist_check --cpu    # gloo on the CPU, tiny model and sizes (tests/test_dist_check.py)

What it does:
1. Builds a small random Qwen2 checkpoint (GPU: 6 layers, hidden 512, 8 heads, 2 KV heads, intermediate 1536, the
   tiny 1,024-token tokenizer; CPU: the 2-layer tiny model) and synthetic SFT / RL data in a temporary directory.
2. Launches `torchrun --standalone --nproc-per-node 2 -m vibeperf.bench.dist_check --worker ...`, then the same with 1
   process (FSDP2 with one shard, so both runs use the same mixed precision: bf16 parameters and compute, fp32
   gradient reduction on CUDA; fp32 on the CPU). Each part runs in both and catches its own failure; a part that
   kills or hangs its launch is reported and the launch is restarted with the parts after it.
   a) sft: `vibeperf.sft.trainer.train` for N steps on the same global batch (the packed rows of a step are split
      between the processes), a sharded checkpoint at step K.
   b) rl: `vibeperf.rl.trainer.RLTrainer` (transformers rollout engine on each process's GPU, weights pushed in
      buckets after every step) for N steps on the same prompts, with a reward that needs no math-verify
      (crc32 of the completion text, odd or even).
   c) resume (1 process only): the 2-process SFT checkpoint of step K continued to step N in one process.
   d) scale: SFT steps of the Qwen2.5-3B shape (hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate 11008,
      vocab 151,936, tied embeddings, random init, activation checkpointing, fused AdamW) on 4 packed rows of 16,384
      tokens per step: 1 warm-up step, then 3 timed; tokens/s with 1 and 2 GPUs and the scaling efficiency
      tps(2) / (2 tps(1)).
3. Compares and prints a table; the JSON goes to <results dir>/<gpu>_<date>_dist.json (GPU) or --json PATH.

The bounds (what "the same within bf16 rounding" means here), with u = 2^-8, the unit roundoff of bf16:
- loss: |loss(2) - loss(1)| <= u |loss(1)| at every step (the same loss up to one bf16 rounding).
- parameters, per tensor: max |p(2) - p(1)| <= u max |p(1)| (the gap is below one bf16 rounding of the tensor's
  largest entry), reported as the largest ratio over tensors (bound 1), beside max and mean |gap|, the mean size of
  the update itself, and the share of entries whose gap exceeds one rounding of their own value (u |p|; near-zero
  entries make that share non-zero even for fp32 noise). Adam amplifies: an entry whose gradient is a cancellation
  residue gets a step of up to lr in a direction that rounding picks, so such entries can differ by up to lr.
- RL: the rollouts are part of the comparison (sampled with the same per-prompt seeds); after the first update a
  one-ulp difference can change a sampled token, so the JSON says per step whether the samples were equal
  (completion token counts and rewards equal). The MGPO loss is ~0 at ratio 1 (advantages sum to zero per group),
  so its bound is absolute, |loss(2) - loss(1)| <= u (the advantage scale is 1), on the steps before the first
  divergence; parameters are compared when every step's samples were equal. After every push (buckets of 4 MiB)
  each process's engine (fp32) must hold exactly the trainer's weights, gathered again for the check.
On the CPU (fp32 throughout) the same checks use u = 2^-16, between fp32 noise (~1e-7) and the O(lr) gaps a real
error gives, and Adam uses eps = 1 (a step linear in the gradient; tests/test_distributed_rl.py says why): the CPU
run checks the machinery, the GPU run the precision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

PKG_PARENT = Path(__file__).resolve().parents[2]  # the folder holding the vibeperf package (checkout or site-packages)
PARTS = ("sft", "rl", "resume", "scale")
ENV_FIXED = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
U_BF16, U_CPU = 2.0**-8, 2.0**-16
PG_TIMEOUT_S = 120


def sizes(cpu: bool) -> dict:
    """Every size of a run; the CPU ones keep the whole check within a few tens of seconds on 2 cores."""
    if cpu:
        return {"model": {}, "sft_steps": 3, "sft_ckpt": 1, "sft_batch": 8, "sft_budget": 128, "lr": 0.05, "eps": 1.0,
                "rl_steps": 2, "rl_prompts": 4, "rl_group": 2, "rl_tokens": 4,
                "scale": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "intermediate_size": 128, "vocab_size": 1024},
                "scale_rows": 4, "scale_budget": 128, "scale_max_len": 64, "scale_steps": 1}  # fmt: skip
    return {"model": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 2,
                      "intermediate_size": 1536},
            "sft_steps": 6, "sft_ckpt": 3, "sft_batch": 32, "sft_budget": 512, "lr": 1e-4, "eps": 1e-8,
            "rl_steps": 3, "rl_prompts": 8, "rl_group": 4, "rl_tokens": 16,
            "scale": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                      "intermediate_size": 11008, "vocab_size": 151936},
            "scale_rows": 4, "scale_budget": 16384, "scale_max_len": 8192, "scale_steps": 3}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- worker


class CrcScorer:
    """Reward 1 when crc32 of the completion text is even: deterministic, varied, no math-verify on the GPU machine."""

    failures: tuple[str, ...] = ()  # the Scorer contract: reasons of the last call's failed gradings (never any)

    def __call__(self, items) -> list[float]:
        return [float(zlib.crc32(text.encode()) % 2 == 0) for _, text in items]

    def close(self) -> None:
        pass


def _sft_config(work: Path, out: str, s: dict, cpu: bool, **checkpoint):
    from vibeperf.config import config_from_dict
    from vibeperf.sft.config import SFTConfig

    return config_from_dict(SFTConfig, {
        "output_dir": str(work / out), "model": {"path": str(work / "model"), "attention": "auto"},
        "optim": {"lr": s["lr"], "min_lr": s["lr"], "warmup_frac": 0.0, "weight_decay": 0.0, "grad_clip": 1.0,
                  "eps": s["eps"]},
        "train": {"global_batch": s["sft_batch"], "max_steps": s["sft_steps"], "seed": 0,
                  "device": "cpu" if cpu else "cuda", "loss_backend": "torch" if cpu else "auto"},
        "checkpoint": {"every": s["sft_ckpt"], "keep_last": 0, **checkpoint},
        "logging": {"every": 1, "progress": False, "plot": False},
        "stages": [{"name": "s", "data": [str(work / "sft.jsonl")], "token_budget": s["sft_budget"]}],
    })  # fmt: skip


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def part_sft(work: Path, world: int, s: dict, cpu: bool) -> dict:
    from vibeperf.sft.trainer import train

    result = train(_sft_config(work, f"sft_w{world}", s, cpu))
    return {"steps": result.steps, "losses": _losses(result.output_dir), "attention": result.attention}


def part_resume(work: Path, world: int, s: dict, cpu: bool) -> dict:
    from vibeperf.sft.trainer import train

    ckpt = work / "sft_w2" / "checkpoints" / f"step_{s['sft_ckpt']:08d}"
    if not (ckpt / "dcp" / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt}: no 2-process sharded checkpoint (did the 2-process sft part fail?)")
    result = train(_sft_config(work, f"resume_w{world}", s, cpu, resume=str(ckpt)))
    return {"steps": result.steps, "losses": _losses(result.output_dir), "from": str(ckpt)}


def part_rl(work: Path, world: int, s: dict, cpu: bool) -> dict:
    import torch

    from vibeperf import distributed as vdist
    from vibeperf.config import config_from_dict
    from vibeperf.rl.config import RLConfig
    from vibeperf.rl.trainer import RLTrainer

    cfg = config_from_dict(RLConfig, {
        "output_dir": str(work / f"rl_w{world}"), "model": {"path": str(work / "model")},
        "optim": {"lr": s["lr"], "min_lr": s["lr"], "warmup_frac": 0.0, "eps": s["eps"]},
        "rollout": {"group_size": s["rl_group"], "prompts_per_step": s["rl_prompts"], "sync_bucket_mb": 4},
        "engine": {"kind": "hf", "dtype": "float32"}, "sampling": {"max_tokens": s["rl_tokens"], "seed": 0},
        "loss": {"backend": "torch" if cpu else "auto", "minibatches": 2, "token_budget": 1024},
        "filter": {"enabled": False},
        "train": {"cpu_threads": 1, "device": "cpu" if cpu else "cuda", "max_steps": s["rl_steps"]},
        "logging": {"progress": False, "plot": False},
        "checkpoint": {"keep_last": 0},
        "phases": [{"name": "digit", "steps": s["rl_steps"], "sources": [{"files": [str(work / "rl.jsonl")]}]}],
    })  # fmt: skip
    trainer = RLTrainer(cfg)
    trainer.scorer.close()
    trainer.scorer = CrcScorer()
    records, push_gaps = [], []

    def on_step(t, record):
        """The engine's weights against the trainer's after the push (gathered again here), max over processes."""
        records.append(record)
        engine = t.engine.model.state_dict()
        gap = max(float((engine[n].float() - x.float()).abs().max()) for b in vdist.full_tensor_buckets(t.model)
                  for n, x in b)  # fmt: skip
        push_gaps.append(float(vdist.all_reduce(torch.tensor(gap, device=t.device), "max")))

    try:
        trainer.run(on_step=on_step)
    finally:
        trainer.close()
    keys = ("loss", "reward_mean", "completion_tokens", "grad_norm", "logp_gap_max", "time_step_s", "time_sync_s")
    return {"steps": len(records), "engine": trainer.engine.name, "push_gap_max": push_gaps,
            "metrics": [{k: r[k] for k in keys} for r in records]}  # fmt: skip


def _scale_rows(s: dict):
    import torch

    from vibeperf.model import Sample, pack_rows

    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(math.log(1500) + torch.randn(256, generator=g)).round().clamp(16, s["scale_max_len"])
    samples = []
    for n in lengths.int().tolist():
        mask = torch.ones(n, dtype=torch.bool)
        mask[: max(1, n // 10)] = False
        samples.append(Sample(torch.randint(0, s["scale"]["vocab_size"], (n,), generator=g, dtype=torch.int32), mask))
    rows = sorted(pack_rows(samples, s["scale_budget"]), key=lambda r: -sum(r.seq_lengths))
    return rows[: s["scale_rows"]]


def part_scale(work: Path, world: int, s: dict, cpu: bool) -> dict:
    """SFT steps of the 3B shape (see the module docstring); every process builds the same random model, then shards
    it."""
    import torch
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vibeperf import distributed as vdist
    from vibeperf.model import matmul_params, measure_peak_tflops, step_flops, use_varlen_attention
    from vibeperf.sft import forward_backward
    from vibeperf.train import clip_gradients

    device = vdist.init_distributed("cpu" if cpu else "cuda")
    cfg = Qwen2Config(**s["scale"], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, use_cache=False, use_sliding_window=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_varlen_attention(model, "auto")
    model.train()
    n_params = matmul_params(model)
    root = vdist.shard_model(model, vdist.default_mp_policy(device))
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, **impl)
    rows = _scale_rows(s)
    tokens = sum(sum(r.seq_lengths) for r in rows)
    flops = step_flops(cfg, n_params, [n for r in rows for n in r.seq_lengths])
    autocast = torch.bfloat16 if device.type == "cuda" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = forward_backward(model, rows, loss_backend="auto", autocast_dtype=autocast, fsdp_root=root)
        clip_gradients(model, 1.0)
        optimizer.step()
        return loss

    t0 = time.perf_counter()
    loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(s["scale_steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    peak = measure_peak_tflops(device)
    out = {"world": world, "params": sum(p.numel() for p in model.parameters()), "rows": len(rows),
           "tokens_per_step": tokens, "warmup_s": warmup_s, "step_s": times, "median_step_s": step_s,
           "tokens_per_s": tokens / step_s, "loss": float(loss), "peak_tflops_per_gpu": peak,
           "mfu": flops / step_s / (peak * 1e12 * world) if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}  # fmt: skip
    vdist.destroy_distributed()
    return out


def worker(args) -> int:
    """One torchrun process: the parts in order, each caught; rank 0 writes DIR/w<world>/<part>.json."""
    import torch
    import torch.distributed as dist

    from vibeperf import distributed as vdist

    work, world, s = Path(args.work), int(os.environ["WORLD_SIZE"]), sizes(args.cpu)
    out = work / f"w{world}"
    rank = int(os.environ["RANK"])
    for part in args.parts.split(","):
        if rank == 0:
            (out / f"{part}.started").write_text("")
        if not dist.is_initialized():
            # the trainers find it started; a collective that hangs (one process failed) ends the launch after this
            if not args.cpu:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("gloo" if args.cpu else "nccl", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        t0 = time.perf_counter()
        try:
            res = globals()[f"part_{part}"](work, world, s, args.cpu)
        except Exception as e:
            res = {"error": f"rank {rank}: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            print(f"[dist_check] {part} on {world} failed: {res['traceback']}", file=sys.stderr, flush=True)
        res["wall_s"] = time.perf_counter() - t0
        if rank == 0:
            tmp = out / f".{part}.json.tmp"
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(out / f"{part}.json")
        print(f"[dist_check] world {world}: {part} {'FAILED' if 'error' in res else 'done'} in {res['wall_s']:.1f} s",
              flush=True)  # fmt: skip
        if "error" in res and world > 1:
            # the other processes may wait in a collective: end the launch (torchrun stops them); the parent starts
            # a new one for the parts after this one
            sys.stdout.flush()
            os._exit(3)
    if vdist.is_distributed():
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------------- parent


def prepare(work: Path, s: dict, cpu: bool) -> None:
    from vibeperf.data import write_jsonl
    from vibeperf.rl.synthetic import digit_records
    from vibeperf.sft.synthetic import synthetic_records
    from vibeperf.tiny_model import build_tiny_model, get_tiny_model

    if cpu:
        shutil.copytree(get_tiny_model(), work / "model")
    else:
        build_tiny_model(work / "model", **s["model"])
    n = s["sft_batch"] * s["sft_steps"]
    write_jsonl(work / "sft.jsonl", synthetic_records(n, task="arith", seed=0))
    write_jsonl(work / "rl.jsonl", digit_records(s["rl_prompts"] * s["rl_steps"], seed=0))


def launch(work: Path, world: int, parts: list[str], cpu: bool, timeout: float, log) -> int | str:
    """One torchrun launch of the worker; its return code, or "timeout" (its process group killed)."""
    path = os.pathsep.join([str(PKG_PARENT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **ENV_FIXED, "PYTHONPATH": path}
    env.pop("TRITON_INTERPRET", None)
    if cpu:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), "-m",
           "vibeperf.bench.dist_check", "--worker", "--work", str(work), "--parts", ",".join(parts)]  # fmt: skip
    if cpu:
        cmd.append("--cpu")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"


def run_world(work: Path, world: int, parts: list[str], cpu: bool, deadline: float) -> dict[str, dict]:
    """Every part in `world` processes; a launch that dies or hangs in a part is restarted with the parts after it."""
    out = work / f"w{world}"
    out.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    todo = list(parts)
    with open(work / f"w{world}.log", "a") as log:
        while todo:
            rc = launch(work, world, todo, cpu, deadline - time.monotonic(), log)
            log.flush()
            for part in list(todo):
                path = out / f"{part}.json"
                if path.is_file():
                    results[part] = json.loads(path.read_text())
                    todo.remove(part)
                    continue
                tail = (work / f"w{world}.log").read_text()[-3000:]
                started = (out / f"{part}.started").is_file()
                where = "inside" if started else "before"
                results[part] = {"error": f"the {world}-process launch ended ({rc}) {where} this part",
                                 "log_tail": tail}  # fmt: skip
                todo.remove(part)
                if not started:  # the launch died before any part: the rest would die the same way
                    for rest in todo:
                        results[rest] = {"error": f"not run: the {world}-process launch died before it ({rc})"}
                    todo = []
                break
            if time.monotonic() > deadline - 5:
                for rest in todo:
                    results[rest] = {"error": "not run: out of time"}
                todo = []
    return results


def _state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def param_gap(a: dict, b: dict, start: dict, u: float) -> dict:
    """Gap of the parameters `a` to the reference `b` (see the module docstring), and the update size from `start`."""
    over, total, worst, max_abs, sum_abs, sum_upd = 0, 0, 0.0, 0.0, 0.0, 0.0
    for k in b:
        x, y = a[k].double(), b[k].double()
        d = (x - y).abs()
        over += int((d > u * y.abs()).sum())
        total += d.numel()
        worst = max(worst, float(d.max()) / (u * max(float(y.abs().max()), 2.0**-126)))
        max_abs = max(max_abs, float(d.max()))
        sum_abs += float(d.sum())
        if k in start:
            sum_upd += float((y - start[k].double()).abs().sum())
    return {"max_abs": max_abs, "mean_abs": sum_abs / total, "mean_update": sum_upd / total,
            "max_gap_over_u_tensor_max": worst, "share_beyond_own_ulp": over / total,
            "within": worst <= 1.0}  # fmt: skip


def loss_gap(a: list[float], b: list[float], u: float) -> dict:
    rel = [abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b)]
    return {"rel_per_step": rel, "max_rel": max(rel, default=float("nan")), "bound": u,
            "within": len(a) == len(b) > 0 and max(rel) <= u}  # fmt: skip


def compare(work: Path, res: dict, s: dict, cpu: bool) -> dict:
    """The checks of parts a-d from the runs' files (each caught on its own)."""
    u = U_CPU if cpu else U_BF16
    checks: dict[str, dict] = {}
    start_cache: list[dict] = []

    def start() -> dict:
        if not start_cache:
            start_cache.append(_state(work / "model"))
        return start_cache[0]

    def final(out: str, step: int) -> dict:
        return _state(work / out / "checkpoints" / f"step_{step:08d}")

    def guarded(name, fn, needs):
        missing = [f"{p} on {w}" for p, w in needs if "error" in res[w].get(p, {"error": 1})]
        if missing:
            checks[name] = {"error": f"needs {', '.join(missing)}, which failed"}
            return
        try:
            checks[name] = fn()
        except Exception as e:
            checks[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}

    n, k = s["sft_steps"], s["sft_ckpt"]
    guarded("sft", lambda: {"loss": loss_gap(res[2]["sft"]["losses"], res[1]["sft"]["losses"], u),
                            "params": param_gap(final("sft_w2", n), final("sft_w1", n), start(), u)},
            [("sft", 2), ("sft", 1)])  # fmt: skip

    def rl():
        a, b = res[2]["rl"]["metrics"], res[1]["rl"]["metrics"]
        same = [x["completion_tokens"] == y["completion_tokens"] and x["reward_mean"] == y["reward_mean"]
                for x, y in zip(a, b)]  # fmt: skip
        first = same.index(False) if False in same else len(same)
        upto = max(first, 1)  # step 1 always samples from the same weights
        gap = loss_gap([x["loss"] for x in a[:upto]], [y["loss"] for y in b[:upto]], u)
        # the MGPO loss is ~0 at ratio 1 (advantages sum to zero per group): compare it to the reward scale instead
        gap["abs_per_step"] = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
        gap["within"] = all(d <= u for d in gap["abs_per_step"][:upto])
        out = {"rollouts_equal_per_step": same, "loss": gap,
               "grad_norm_rel_per_step": [abs(x["grad_norm"] - y["grad_norm"]) / max(y["grad_norm"], 1e-30)
                                          for x, y in zip(a, b)],
               "logp_gap_max": [x["logp_gap_max"] for x in a],
               "push_gap_max": res[2]["rl"]["push_gap_max"]}  # fmt: skip
        out["push_equal"] = {"within": max(out["push_gap_max"]) == 0.0}
        if first == len(same):
            out["params"] = param_gap(final("rl_w2", len(a)), final("rl_w1", len(b)), start(), u)
        return out

    guarded("rl", rl, [("rl", 2), ("rl", 1)])
    guarded("resume", lambda: {"loss": loss_gap(res[1]["resume"]["losses"], res[2]["sft"]["losses"][k:], u),
                               "params": param_gap(final("resume_w1", n), final("sft_w2", n), start(), u)},
            [("resume", 1), ("sft", 2)])  # fmt: skip

    def scale():
        one, two = res[1]["scale"], res[2]["scale"]
        return {"tokens_per_s_1": one["tokens_per_s"], "tokens_per_s_2": two["tokens_per_s"],
                "speedup": two["tokens_per_s"] / one["tokens_per_s"],
                "efficiency": two["tokens_per_s"] / (2 * one["tokens_per_s"])}  # fmt: skip

    guarded("scale", scale, [("scale", 1), ("scale", 2)])
    return checks


def _fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def table(res: dict, checks: dict) -> str:
    lines = [f"{'part':<8} {'what':<58} {'value':>12}"]

    def add(part, what, value):
        lines.append(f"{part:<8} {what:<58} {_fmt(value):>12}")

    for w in (2, 1):
        for part, r in res[w].items():
            status = "FAILED: " + r["error"][:38] if "error" in r else "ran (s)"
            add(part, f"{w} process(es): {status}", r.get("wall_s", 0.0))
    for name in ("sft", "resume", "rl"):
        c = checks.get(name, {})
        if "error" in c:
            add(name, "check FAILED: " + c["error"][:44], "")
            continue
        if "loss" in c:
            add(name, "max relative loss gap (bound u)", c["loss"]["max_rel"])
            add(name, "loss within bound", c["loss"]["within"])
        if "params" in c:
            p = c["params"]
            add(name, "param max |gap|", p["max_abs"])
            add(name, "param mean |gap| / mean |update|", p["mean_abs"] / max(p["mean_update"], 1e-30))
            add(name, "param max over tensors of max|gap| / (u max|p|) (bound 1)", p["max_gap_over_u_tensor_max"])
            add(name, "params within bound", p["within"])
            add(name, "share of entries with |gap| > u |p| (informative)", p["share_beyond_own_ulp"])
        if "push_gap_max" in c:
            add(name, "engine vs trainer weights after each push, 2 processes", max(c["push_gap_max"]))
        if "rollouts_equal_per_step" in c:
            add(name, "rollouts equal per step", " ".join("y" if x else "n" for x in c["rollouts_equal_per_step"]))
    c = checks.get("scale", {})
    if "error" in c:
        add("scale", "FAILED: " + c["error"][:50], "")
    else:
        add("scale", "tokens/s, 1 GPU", c["tokens_per_s_1"])
        add("scale", "tokens/s, 2 GPUs", c["tokens_per_s_2"])
        add("scale", "scaling efficiency tps(2) / (2 tps(1))", c["efficiency"])
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU with the tiny model and sizes")
    ap.add_argument("--json", help="write the JSON here (default: <results dir>/<gpu>_<date>_dist.json on GPUs)")
    ap.add_argument("--budget-s", type=float, default=460.0, help="wall-clock budget of all launches")
    ap.add_argument("--keep", help="keep the work directory (checkpoints, logs) here instead of a temporary one")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--parts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, value in ENV_FIXED.items():
        os.environ[key] = value
    if args.worker:
        return worker(args)
    import torch

    if not args.cpu and torch.cuda.device_count() < 2:
        print(f"dist_check needs 2 GPUs, found {torch.cuda.device_count()}; use --cpu for the gloo check")
        return 2
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    s = sizes(args.cpu)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vibeperf-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        parts = {2: ["sft", "rl", "scale"], 1: ["sft", "rl", "resume", "scale"]}
        skipped: dict[str, dict] = {}
        try:
            prepare(work, s, args.cpu)
        except Exception as e:  # the scale part needs no prepared model or data: it still runs
            print(f"[dist_check] preparation failed: {traceback.format_exc()}", flush=True)
            skipped = {p: {"error": f"not run: preparation failed: {type(e).__name__}: {e}"} for p in PARTS}
            parts = {w: ["scale"] for w in parts}
        res = {2: run_world(work, 2, parts[2], args.cpu, t0 + 0.5 * args.budget_s), 1: {}}
        res[1] = run_world(work, 1, parts[1], args.cpu, deadline)
        for w in (2, 1):
            for p, why in skipped.items():
                if p != "resume" or w == 1:
                    res[w].setdefault(p, why)
        checks = compare(work, res, s, args.cpu)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(res, checks), flush=True)
    ok = (
        bool(res[1])
        and all("error" not in r for w in res.values() for r in w.values())
        and all(
            "error" not in c and all(v.get("within", True) for v in c.values() if isinstance(v, dict))
            for name, c in checks.items()
        )
    )
    doc_extra = {"sizes": s, "cpu": args.cpu, "runs": {str(w): r for w, r in res.items()}, "checks": checks,
                 "ok": ok, "wall_s": time.monotonic() - t0,
                 "bounds": "loss: |l2 - l1| <= u |l1|; params per tensor: max |p2 - p1| <= u max |p1|; "
                           f"u = {'16 * 2^-23 (fp32, CPU)' if args.cpu else '2^-8 (bf16)'}"}  # fmt: skip
    path = None
    if args.json or not args.cpu:
        from vibeperf.bench.common import Row, write_results

        rows = []
        for w in (1, 2):
            r = res[w].get("scale", {})
            if "error" not in r and r:
                mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else ""
                rows.append(Row("D4", f"fsdp2-{w}gpu", r["tokens_per_step"], r["median_step_s"] * 1e3, r["mfu"],
                                None, True, f"{r['tokens_per_s']:.0f} tokens/s{mem}"))  # fmt: skip
        path = write_results(rows, None, tag="dist", path=Path(args.json) if args.json else None)
        doc = json.loads(path.read_text())
        doc["extra"] = doc_extra
        path.write_text(json.dumps(doc, indent=1))
        print("results:", path)
    print(f"dist_check {'passed' if ok else 'found problems'} in {time.monotonic() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

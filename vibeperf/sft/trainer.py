"""Packed-sequence SFT with a curriculum of stages, on one device (or many under torchrun, see the end).

What a run does, in order:
1. Reads the recipe (TOML/JSON plus `key=value` overrides) into `vibeperf.config.SFTConfig`.
2. Reads and validates every data file of every stage, then tokenises with the chat template (loss on assistant
   tokens only) and filters each stage: minimum length, difficulty from precomputed verdicts, truncation to the
   stage's token budget (`vibeperf.sft.data`). A malformed line stops the run here, before the model is loaded.
3. Loads the Hugging Face checkpoint, switches it to varlen attention (`vibeperf.sft.attention`, which backend runs is
   logged), optionally Liger body kernels and activation checkpointing; fp32 weights, bf16 autocast on CUDA.
4. AdamW (fused on CUDA, foreach on the CPU); per stage, a linear warm-up over `warmup_frac` of its steps and a
   cosine from the stage's lr to its min_lr (a LambdaLR over the global step).
5. Each optimizer step takes the next `global_batch` samples of the stage's shuffled order (seeded per stage and
   epoch), packs them into rows of `token_budget` tokens (best-fit decreasing; positions restart per sample) and runs
   one row per micro-batch: the model body gives the final hidden states and the fused LM-head cross-entropy
   (`vibeperf.kernels.linear_cross_entropy`) never forms the logits. The loss is divided by the number of loss tokens
   of the whole step, counted on the device before the first micro-batch, so accumulating rows equals one big batch
   (each token also carries its record's weight).
6. Gradient clipping (foreach), optimizer and schedule step. Every `logging.every` steps one host sync writes a
   metrics line (loss, lr, grad norm, tokens/s, MFU estimate) to metrics.jsonl and checks that loss and grad norm
   stayed finite; the loss curve goes to loss.png.
7. Checkpoints under output_dir/checkpoints/step_N: the model and tokenizer in Hugging Face format (safetensors),
   trainer_state.pt (optimizer, scheduler, RNG) and trainer_state.json (step, data position, data fingerprint).
   `checkpoint.resume=latest` continues bit-identically (on the CPU; on a GPU up to kernel non-determinism).

Launch lines:
    python -m vibeperf sft recipes/sft_tiny.toml                                   # CPU, tiny model, under a minute
    python -m vibeperf sft recipes/sft_vibethinker.toml model.path=/ckpt/Qwen2.5-Coder-3B   # one GPU
    python -m vibeperf sft recipes/sft_vibethinker.toml checkpoint.resume=latest  # continue a run
Multi-GPU (torchrun + FSDP2, `vibeperf.distributed`; the same script, nothing changes without torchrun):
    torchrun --nproc-per-node 8 -m vibeperf sft recipes/sft_vibethinker.toml                # one node, 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id RUN \
        -m vibeperf sft recipes/sft_vibethinker.toml                                 # on each of 2 nodes
Under torchrun each block and the root are `fully_shard`-ed (bf16 params/compute, fp32 reduce on CUDA; fp32 on the
CPU with gloo), each rank runs rows rank, rank + world, ... of the step's packed rows (padded with zero-weight rows
so every rank runs the same number of micro-batches), the loss-token count is all-reduced before the first
micro-batch, and checkpoints also hold a DCP directory (`dcp/`, model + optimizer shards) next to the full
Hugging Face export written by rank 0; a run resumes on any number of processes. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vibeperf import distributed as vdist
from vibeperf.config import SFTConfig, config_to_dict
from vibeperf.kernels import linear_cross_entropy
from vibeperf.sft import attention
from vibeperf.sft.data import StageData, prepare_stages
from vibeperf.sft.model import (
    compute_dtype,
    load_model,
    matmul_params,
    measure_peak_tflops,
    model_path,
    resolve_device,
    resolve_precision,
    step_flops,
)
from vibeperf.sft.packing import IGNORE_INDEX, PackedRow, Sample, pack_rows
from vibeperf.sft.patch import head_inputs

log = logging.getLogger("vibeperf.sft")
STATE_JSON, STATE_PT = "trainer_state.json", "trainer_state.pt"


@dataclass(frozen=True)
class StagePlan:
    """Where a stage sits in the global step count, and its schedule."""

    index: int
    name: str
    num_samples: int
    steps_per_epoch: int
    epochs: int
    first_step: int
    lr: float
    min_lr: float
    warmup: int

    @property
    def num_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def make_plan(cfg: SFTConfig, stages: Sequence[StageData]) -> list[StagePlan]:
    """One StagePlan per stage; a stage's last batch may be smaller than global_batch."""
    plans, first = [], 0
    for i, (sc, sd) in enumerate(zip(cfg.stages, stages)):
        per_epoch = math.ceil(len(sd.samples) / cfg.train.global_batch)
        n = per_epoch * sc.epochs
        lr = sc.lr if sc.lr is not None else cfg.optim.lr
        min_lr = sc.min_lr if sc.min_lr is not None else min(cfg.optim.min_lr, lr)
        warmup = math.ceil(cfg.optim.warmup_frac * n)
        plans.append(StagePlan(i, sc.name, len(sd.samples), per_epoch, sc.epochs, first, lr, min_lr, warmup))
        first += n
    return plans


def lr_at(plans: Sequence[StagePlan], step: int) -> float:
    """Learning rate of global step `step`: linear warm-up to the stage's lr, then cosine to its min_lr."""
    plan = next((p for p in plans if step < p.first_step + p.num_steps), plans[-1])
    s = min(step - plan.first_step, plan.num_steps - 1)
    if s < plan.warmup:
        return plan.lr * (s + 1) / plan.warmup
    progress = (s - plan.warmup) / max(1, plan.num_steps - plan.warmup - 1)
    return plan.min_lr + 0.5 * (plan.lr - plan.min_lr) * (1 + math.cos(math.pi * progress))


def locate(plans: Sequence[StagePlan], step: int) -> tuple[StagePlan, int, int]:
    """(stage plan, epoch, batch index in the epoch) of global step `step`."""
    plan = next(p for p in plans if step < p.first_step + p.num_steps)
    s = step - plan.first_step
    return plan, s // plan.steps_per_epoch, s % plan.steps_per_epoch


def epoch_order(seed: int, stage: int, epoch: int, n: int) -> list[int]:
    """The deterministic shuffled sample order of one stage epoch."""
    order = list(range(n))
    random.Random(f"vibeperf-sft:{seed}:{stage}:{epoch}").shuffle(order)
    return order


def data_fingerprint(stages: Sequence[StageData]) -> str:
    """A hash of every stage's sample lengths and loss-token counts (a resume check that the data did not change)."""
    h = hashlib.sha256()
    for sd in stages:
        h.update(sd.name.encode())
        h.update(np.asarray([(s.length, s.num_loss_tokens) for s in sd.samples], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def plan_signature(cfg: SFTConfig, plans: Sequence[StagePlan]) -> dict:
    """What fixes the data order and the step count; a resumed run must match it to continue exactly."""
    return {"global_batch": cfg.train.global_batch, "seed": cfg.train.seed,
            "stages": [[p.name, p.num_samples, p.epochs, cfg.stages[p.index].token_budget] for p in plans]}  # fmt: skip


def forward_backward(
    model,
    rows: Sequence[PackedRow],
    *,
    loss_backend: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    fsdp_root=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate into `.grad` the gradients of one optimizer step's loss over `rows` (one micro-batch each).

    loss = sum over all rows' tokens of token_weight * nll / (number of loss tokens in all rows), the count taken
    on the device before the first micro-batch. Returns (loss [] fp32, loss-token count [] int64), detached, on the
    model's device, without a host sync. Under torchrun pass `fsdp_root` (from `vibeperf.distributed.shard_model`).
    """
    if fsdp_root is not None:
        return _forward_backward_sharded(fsdp_root, rows, loss_backend, autocast_dtype)
    device = next(model.parameters()).device
    rows = [r.to(device) for r in rows]
    n_loss = torch.stack([(r.targets != IGNORE_INDEX).sum() for r in rows]).sum()
    inv = 1.0 / n_loss.clamp_min(1).to(torch.float32)
    body = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    total = torch.zeros((), device=device, dtype=torch.float32)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for row in rows:
        with ctx:
            hidden = body(**row.model_inputs()).last_hidden_state[0]  # [T, H]
            h, w, b = head_inputs(hidden, head.weight, head.bias)
            loss = linear_cross_entropy(h, w, row.targets, bias=b, reduction="sum", token_weight=row.token_weight * inv,
                                        backend=loss_backend)  # fmt: skip
        loss.backward()
        total += loss.detach()
    return total, n_loss


def _forward_backward_sharded(root, rows, loss_backend, autocast_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_backward under FSDP2: this rank's share of `rows`, the loss-token count summed over ranks first;
    returns the loss summed over ranks."""
    device = next(root.parameters()).device
    mine = [(r.to(device), real) for r, real in vdist.rank_rows(rows)]
    n_local = torch.stack([(r.targets != IGNORE_INDEX).sum() * real for r, real in mine]).sum()
    n_loss = vdist.global_loss_tokens(n_local)
    inv = 1.0 / n_loss.clamp_min(1).to(torch.float32)
    total = torch.zeros((), device=device, dtype=torch.float32)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for row, real in mine:
        with ctx:
            loss = root(row.model_inputs(), row.targets, row.token_weight * (inv * real), backend=loss_backend)
        loss.backward()
        total += loss.detach()
    torch.distributed.all_reduce(total)
    return total, n_loss


def make_optimizer(model, cfg: SFTConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused on CUDA, foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr, betas=(cfg.optim.beta1,
                             cfg.optim.beta2), eps=cfg.optim.eps, **impl)  # fmt: skip


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Global grad norm [] (device tensor); grads scaled to `max_norm` when it is > 0 (foreach kernels)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return vdist.to_full(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return vdist.to_full(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, model, tokenizer, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    """Write checkpoints/step_N atomically (built in a temporary sibling, state JSON last, then renamed)."""
    root = out_dir / "checkpoints"
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / STATE_PT)  # fmt: skip
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint_sharded(out_dir: Path, model, tokenizer, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    """save_checkpoint under torchrun (a collective): DCP shards of model + optimizer in `dcp/`, the full HF export
    and the scheduler / RNG / JSON state from rank 0; the temporary directory name is the same on every rank."""
    root = out_dir / "checkpoints"
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".{final.name}.tmp-sharded"
    if vdist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    vdist.save_sharded(tmp / "dcp", model, optimizer)
    vdist.export_full(model, tmp, tokenizer)
    if vdist.rank() == 0:
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if (p / STATE_JSON).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _resume_dir(cfg: SFTConfig) -> Path | None:
    if not cfg.checkpoint.resume:
        return None
    if cfg.checkpoint.resume == "latest":
        found = list_checkpoints(Path(cfg.output_dir))
        return found[-1] if found else None
    path = Path(cfg.checkpoint.resume)
    if not (path / STATE_JSON).is_file():
        raise FileNotFoundError(f"checkpoint.resume={cfg.checkpoint.resume!r} is not a complete checkpoint")
    return path


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    """Loss and learning rate against the step, from metrics.jsonl (matplotlib's Agg canvas; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], lw=1.2)
    ax.set_ylabel("loss (per loss token)")
    ax.grid(alpha=0.3)
    for prev, cur in zip(rows, rows[1:]):
        if cur["stage"] != prev["stage"]:
            ax.axvline(cur["step"], color="gray", ls="--", lw=0.8)
            ax.text(cur["step"], ax.get_ylim()[1], f" {cur['stage']}", va="top", fontsize=8)
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:orange", lw=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, png_path)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past `step` (a resumed run rewrites them)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


@dataclass
class TrainResult:
    """What a run did."""

    steps: int
    last_loss: float | None
    output_dir: Path
    last_checkpoint: Path | None
    attention: dict
    stages: list[dict]


def train(cfg: SFTConfig) -> TrainResult:
    """Run the SFT curriculum of `cfg` (see the module docstring); returns a summary."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    out_dir = Path(cfg.output_dir)
    device = resolve_device(cfg.train.device)
    device = vdist.init_distributed(device.type) or device
    main = vdist.rank() == 0
    if not main:
        log.setLevel(logging.WARNING)
    precision = resolve_precision(cfg.train.precision, device)
    src = model_path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(src)
    stages = prepare_stages(cfg, tokenizer)
    plans = make_plan(cfg, stages)
    fingerprint = data_fingerprint(stages)
    total = plans[-1].first_step + plans[-1].num_steps
    stop = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    for p, sd in zip(plans, stages):
        log.info("stage %s: %d samples, %d steps (%d epochs x %d), warm-up %d, lr %g -> %g, filters %s", p.name,
                 p.num_samples, p.num_steps, p.epochs, p.steps_per_epoch, p.warmup, p.lr, p.min_lr, sd.stats)

    resume = _resume_dir(cfg)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = load_model(cfg.model, os.fspath(resume) if resume else src, device, precision)
    backend, why = attention.resolve_attention(cfg.model.attention, device, compute_dtype(precision))
    log.info("device %s, precision %s, attention %s: %s", device, precision, backend, why)
    fsdp_root = vdist.shard_model(model, vdist.default_mp_policy(device)) if vdist.is_distributed() else None
    optimizer = make_optimizer(model, cfg, device)
    base_lr = cfg.optim.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(plans, s) / base_lr)
    step = 0
    if resume is not None:
        state = json.loads((resume / STATE_JSON).read_text())
        if state["data_fingerprint"] != fingerprint:
            raise RuntimeError(f"{resume}: the data changed since this checkpoint (fingerprint {fingerprint}, "
                               f"checkpoint {state['data_fingerprint']}); an exact resume is impossible")
        if state["plan"] != plan_signature(cfg, plans):
            raise RuntimeError(f"{resume}: batch size, seed or stages changed since this checkpoint (checkpoint "
                               f"{state['plan']}, now {plan_signature(cfg, plans)}); an exact resume is impossible")
        blob = torch.load(resume / STATE_PT, weights_only=False)
        if "optimizer" in blob and fsdp_root is None:
            optimizer.load_state_dict(blob["optimizer"])
        elif (resume / "dcp").is_dir():
            vdist.load_sharded(resume / "dcp", model, optimizer)
        else:
            raise NotImplementedError(f"{resume}: a single-process checkpoint has no sharded optimizer state (dcp/); "
                                      "resume it in one process")
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        step = state["step"]
        log.info("resumed from %s at step %d (stage %s, epoch %d, batch %d)", resume, step, state["stage_name"],
                 state["epoch"], state["batch"])  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1) + "\n")
        if step:
            _trim_metrics(metrics_path, step)
        else:
            metrics_path.write_text("")

    n_params = matmul_params(model)
    peak = cfg.logging.peak_tflops or measure_peak_tflops(device)
    autocast_dtype = torch.bfloat16 if precision == "bf16-autocast" else None
    orders: dict[tuple[int, int], list[int]] = {}
    attention.ATTENTION_CALLS.clear()
    bad = torch.zeros((), dtype=torch.bool, device=device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    interval = {"steps": 0, "tokens": 0, "flops": 0.0, "t0": time.perf_counter(), "first": step}
    last_loss, last_ckpt, start = None, None, step
    bar = tqdm(total=stop, initial=step, disable=not (cfg.logging.progress and main), dynamic_ncols=True, desc="sft")

    def position(s: int) -> dict:
        plan, epoch, batch = locate(plans, s) if s < total else (plans[-1], plans[-1].epochs, 0)
        return {"step": s, "stage": plan.index, "stage_name": plan.name, "epoch": epoch, "batch": batch,
                "data_fingerprint": fingerprint, "plan": plan_signature(cfg, plans), "config": config_to_dict(cfg)}

    def checkpoint(s: int) -> Path:
        save = save_checkpoint_sharded if fsdp_root is not None else save_checkpoint
        path = save(out_dir, model, tokenizer, optimizer, scheduler, position(s), cfg.checkpoint.keep_last)
        if cfg.logging.plot and main:
            plot_loss(metrics_path, out_dir / "loss.png")
        log.info("checkpoint %s", path)
        return path

    while step < stop:
        plan, epoch, batch = locate(plans, step)
        key = (plan.index, epoch)
        if key not in orders:
            orders = {key: epoch_order(cfg.train.seed, plan.index, epoch, plan.num_samples)}
        idx = orders[key][batch * cfg.train.global_batch : (batch + 1) * cfg.train.global_batch]
        samples: list[Sample] = [stages[plan.index].samples[i] for i in idx]
        rows = pack_rows(samples, stages[plan.index].token_budget)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = forward_backward(model, rows, loss_backend=cfg.train.loss_backend, autocast_dtype=autocast_dtype,
                                   fsdp_root=fsdp_root)  # fmt: skip
        gnorm = clip_gradients(model, cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        bad |= ~torch.isfinite(loss) | ~torch.isfinite(gnorm)
        loss_sum += loss
        lengths = [n for r in rows for n in r.seq_lengths]
        interval["steps"] += 1
        interval["tokens"] += sum(lengths)
        interval["flops"] += step_flops(model.config, n_params, lengths)
        step += 1
        bar.update(1)
        if step % cfg.logging.every == 0 or step == stop:
            if bool(bad):
                raise FloatingPointError(f"non-finite loss or gradient norm between steps {interval['first'] + 1} "
                                         f"and {step}")  # fmt: skip
            dt = time.perf_counter() - interval["t0"]
            last_loss = loss_sum.item() / interval["steps"]
            record = {
                "step": step, "stage": plan.name, "epoch": epoch, "loss": last_loss, "lr": lr,
                "grad_norm": gnorm.item(), "tokens": interval["tokens"], "tokens_per_s": interval["tokens"] / dt,
                "mfu": interval["flops"] / dt / (peak * 1e12) if peak else None, "time_s": dt,
            }  # fmt: skip
            if step - start <= cfg.logging.every:
                record["attention"] = dict(attention.ATTENTION_CALLS)
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            loss_sum.zero_()
            interval.update(steps=0, tokens=0, flops=0.0, t0=time.perf_counter(), first=step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < stop:
            last_ckpt = checkpoint(step)
    bar.close()
    if cfg.checkpoint.save_final and step > start:
        last_ckpt = checkpoint(step)
    elif cfg.logging.plot and main and metrics_path.stat().st_size:
        plot_loss(metrics_path, out_dir / "loss.png")
    log.info("done: %d steps, last loss %s, attention calls %s", step, last_loss, dict(attention.ATTENTION_CALLS))
    vdist.destroy_distributed()
    return TrainResult(step, last_loss, out_dir, last_ckpt, dict(attention.ATTENTION_CALLS),
                       [{"name": p.name, "steps": p.num_steps, **sd.stats} for p, sd in zip(plans, stages)])

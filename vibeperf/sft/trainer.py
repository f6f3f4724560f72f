"""Packed-sequence SFT with a curriculum of stages, on one device (or many under torchrun, see the end).

What a run does, in order:
1. Reads the recipe (TOML/JSON plus `key=value` overrides) into `vibeperf.sft.config.SFTConfig`.
2. Reads and validates every data file of every stage, then tokenises with the chat template (loss on assistant
   tokens only) and filters each stage: minimum length, difficulty from precomputed verdicts, truncation to the
   stage's token budget (`vibeperf.sft.data`). A malformed line stops the run here, before the model is loaded.
3. Loads the Hugging Face checkpoint (`vibeperf.model.load_model`: varlen attention, which backend runs is logged,
   optionally Liger body kernels and activation checkpointing; fp32 weights, bf16 autocast on CUDA).
4. AdamW (`vibeperf.train.make_optimizer`); per stage, a linear warm-up over `warmup_frac` of its steps and a
   cosine from the stage's lr to its min_lr (`vibeperf.train.Schedule`, one segment per stage).
5. Each optimizer step takes the next `global_batch` samples of the stage's shuffled order (seeded per stage and
   epoch), packs them into rows of `token_budget` tokens (best-fit decreasing; positions restart per sample) and runs
   one row per micro-batch through `vibeperf.model.FusedLossLM`: the model body gives the final hidden states and
   the fused LM-head cross-entropy (`vibeperf.kernels.linear_cross_entropy`) never forms the logits. The loss is
   divided by the number of loss tokens of the whole step, counted on the device before the first micro-batch, so
   accumulating rows equals one big batch (each token also carries its record's weight).
6. Gradient clipping (foreach), optimizer and schedule step. Every `logging.every` steps one host sync writes a
   metrics line (loss, lr, grad norm, tokens/s, MFU estimate) to metrics.jsonl and checks that loss and grad norm
   stayed finite (`vibeperf.train.MetricsWriter`, `FiniteCheck`); the loss curve goes to loss.png.
7. Checkpoints (`vibeperf.train.Checkpointer`) under output_dir/checkpoints/step_N: the model and tokenizer in
   Hugging Face format (safetensors), trainer_state.pt (optimizer, scheduler, RNG) and trainer_state.json (step,
   data position, data fingerprint). `checkpoint.resume=latest` continues bit-identically (on the CPU; on a GPU up
   to kernel non-determinism).

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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vibeperf import distributed as vdist
from vibeperf.config import config_to_dict
from vibeperf.files import write_text
from vibeperf.model import (
    ATTENTION_CALLS,
    IGNORE_INDEX,
    FusedLossLM,
    PackedRow,
    Sample,
    compute_dtype,
    load_model,
    matmul_params,
    measure_peak_tflops,
    model_path,
    pack_rows,
    resolve_attention,
    resolve_device,
    resolve_precision,
    step_flops,
)
from vibeperf.sft.config import SFTConfig
from vibeperf.sft.data import StageData, prepare_stages
from vibeperf.train import (
    Checkpointer,
    FiniteCheck,
    MetricsWriter,
    Preemption,
    Schedule,
    clip_gradients,
    make_optimizer,
)

log = logging.getLogger("vibeperf.sft")


@dataclass(frozen=True)
class StagePlan:
    """A stage's data walk: its samples, batches per epoch and epochs (its learning rate is the schedule's segment)."""

    index: int
    name: str
    num_samples: int
    steps_per_epoch: int
    epochs: int

    @property
    def num_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def make_plan(cfg: SFTConfig, stages: Sequence[StageData]) -> tuple[list[StagePlan], Schedule]:
    """One StagePlan per stage (a stage's last batch may be smaller than global_batch) and the lr schedule."""
    plans = []
    for i, (sc, sd) in enumerate(zip(cfg.stages, stages)):
        per_epoch = math.ceil(len(sd.samples) / cfg.train.global_batch)
        plans.append(StagePlan(i, sc.name, len(sd.samples), per_epoch, sc.epochs))
    schedule = Schedule.build([(p.name, p.num_steps, sc.lr, sc.min_lr) for p, sc in zip(plans, cfg.stages)], cfg.optim)
    return plans, schedule


def locate(plans: Sequence[StagePlan], schedule: Schedule, step: int) -> tuple[StagePlan, int, int]:
    """(stage plan, epoch, batch index in the epoch) of global step `step`."""
    i, s = schedule.locate(step)
    plan = plans[i]
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
    model's device, without a host sync. Under torchrun pass `fsdp_root` (from `vibeperf.distributed.shard_model`):
    this rank runs its share of `rows` (`vibeperf.distributed.rank_rows`), the count and the loss are summed over
    ranks; one process runs every row through a plain `FusedLossLM`.
    """
    root = fsdp_root if fsdp_root is not None else FusedLossLM(model)
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
    return vdist.all_reduce(total), n_loss


def plot_loss(metrics: MetricsWriter) -> None:
    """loss.png: the loss and the learning rate against the step, a dashed line where the stage changes."""
    panels = [("loss (per loss token)", [("loss", "loss")]), ("lr", [("lr", "lr")])]
    metrics.plot("loss.png", panels, segment_key="stage", xlabel="optimizer step", height_ratios=[3, 1])


@dataclass
class TrainResult:
    """What a run did."""

    steps: int
    last_loss: float | None
    output_dir: Path
    last_checkpoint: Path | None
    attention: dict
    stages: list[dict]
    stopped_by: str | None = None
    """The signal that stopped the run early (SIGTERM, SIGINT; a checkpoint was saved), None if it ran to the end."""


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
    plans, schedule = make_plan(cfg, stages)
    fingerprint = data_fingerprint(stages)
    total = schedule.total_steps
    stop = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    for p, g, sd in zip(plans, schedule.segments, stages):
        log.info("stage %s: %d samples, %d steps (%d epochs x %d), warm-up %d, lr %g -> %g, filters %s", p.name,
                 p.num_samples, p.num_steps, p.epochs, p.steps_per_epoch, g.warmup, g.lr, g.min_lr, sd.stats)

    ckpt = Checkpointer(out_dir, cfg.checkpoint, sharded=vdist.is_distributed())
    resume = ckpt.resume_dir()
    skipped = 0  # updates left out by optim.nonfinite="skip" so far (kept in checkpoints)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = load_model(cfg.model, os.fspath(resume) if resume else src, device, precision,
                       row_tokens=max(st.token_budget for st in cfg.stages), shards=vdist.world_size())
    backend, why = resolve_attention(cfg.model.attention, device, compute_dtype(precision))
    log.info("device %s, precision %s, attention %s: %s", device, precision, backend, why)
    fsdp_root = vdist.shard_model(model, vdist.default_mp_policy(device)) if vdist.is_distributed() else None
    optimizer = make_optimizer(model, cfg.optim, device, master_weights=precision == "bf16-master")
    scheduler = schedule.scheduler(optimizer, cfg.optim.lr)
    step = 0
    if resume is not None:
        must_match = {"data_fingerprint": (fingerprint, "the data"),
                      "plan": (plan_signature(cfg, plans), "batch size, seed or stages")}  # fmt: skip
        state = ckpt.load(resume, model, optimizer, scheduler, must_match)
        step, skipped = state["step"], int(state.get("nonfinite_skipped", 0))
        log.info("resumed from %s at step %d (stage %s, epoch %d, batch %d)", resume, step, state["stage_name"],
                 state["epoch"], state["batch"])  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    lg = cfg.logging
    metrics = MetricsWriter(out_dir, enabled=main, resume_step=step, tensorboard=lg.tensorboard, wandb=lg.wandb,
                            wandb_project=lg.wandb_project, run_config=config_to_dict(cfg))  # fmt: skip
    if main:
        write_text(out_dir / "config.json", json.dumps(config_to_dict(cfg), indent=1) + "\n")

    n_params = matmul_params(model)
    peak = cfg.logging.peak_tflops or measure_peak_tflops(device)
    autocast_dtype = torch.bfloat16 if precision == "bf16-autocast" else None
    orders: dict[tuple[int, int], list[int]] = {}
    ATTENTION_CALLS.clear()
    finite = FiniteCheck(device, step, cfg.optim.nonfinite, skipped)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    interval = {"steps": 0, "tokens": 0, "flops": 0.0, "t0": time.perf_counter()}
    last_loss, last_ckpt, start = None, None, step
    bar = tqdm(total=stop, initial=step, disable=not (cfg.logging.progress and main), dynamic_ncols=True, desc="sft")
    preempt = Preemption(device)

    def position(s: int) -> dict:
        plan, epoch, batch = locate(plans, schedule, s) if s < total else (plans[-1], plans[-1].epochs, 0)
        return {"step": s, "stage": plan.index, "stage_name": plan.name, "epoch": epoch, "batch": batch,
                "data_fingerprint": fingerprint, "plan": plan_signature(cfg, plans),
                "nonfinite_skipped": finite.skipped, "config": config_to_dict(cfg)}

    def checkpoint(s: int) -> Path:
        path = ckpt.save(model, tokenizer, optimizer, scheduler, position(s))
        if cfg.logging.plot:
            plot_loss(metrics)
        log.info("checkpoint %s", path)
        return path

    with preempt:
        while step < stop and not preempt.requested():
            plan, epoch, batch = locate(plans, schedule, step)
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
            if finite.allow(loss, gnorm):
                optimizer.step()
            scheduler.step()
            loss_sum += loss
            lengths = [n for r in rows for n in r.seq_lengths]
            interval["steps"] += 1
            interval["tokens"] += sum(lengths)
            interval["flops"] += step_flops(model.config, n_params, lengths)
            step += 1
            bar.update(1)
            if step % cfg.logging.every == 0 or step == stop:
                finite.raise_if_bad(step)
                dt = time.perf_counter() - interval["t0"]
                last_loss = loss_sum.item() / interval["steps"]
                record = {
                    "step": step, "stage": plan.name, "epoch": epoch, "loss": last_loss, "lr": lr,
                    "grad_norm": gnorm.item(), "tokens": interval["tokens"], "tokens_per_s": interval["tokens"] / dt,
                    "mfu": interval["flops"] / dt / (peak * 1e12) if peak else None, "time_s": dt,
                }  # fmt: skip
                if step - start <= cfg.logging.every:
                    record["attention"] = dict(ATTENTION_CALLS)
                if cfg.optim.nonfinite == "skip":
                    record["nonfinite_skipped"] = finite.skipped
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                interval.update(steps=0, tokens=0, flops=0.0, t0=time.perf_counter())
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < stop:
                last_ckpt = checkpoint(step)
    bar.close()
    if preempt.signal is not None and step < stop:
        finite.raise_if_bad(step)
        last_ckpt = checkpoint(step)
        log.warning("stopped by %s after step %d; checkpoint %s (continue with checkpoint.resume=latest)",
                    preempt.signal, step, last_ckpt)  # fmt: skip
    elif cfg.checkpoint.save_final and step > start:
        last_ckpt = checkpoint(step)
    elif cfg.logging.plot:
        plot_loss(metrics)
    log.info("done: %d steps, last loss %s, attention calls %s", step, last_loss, dict(ATTENTION_CALLS))
    metrics.close()
    vdist.destroy_distributed()
    return TrainResult(step, last_loss, out_dir, last_ckpt, dict(ATTENTION_CALLS),
                       [{"name": p.name, "steps": p.num_steps, **sd.stats} for p, sd in zip(plans, stages)],
                       preempt.signal)  # fmt: skip

"""MGPO RL on verifiable prompts, phase after phase, with an in-process rollout engine kept in sync with the trainer.

What a run does, in order:
1. Reads the recipe (TOML/JSON plus `key=value` overrides) into `vibeperf.rl.config.RLConfig`, then reads and checks
   every RL JSONL file of every phase (`vibeperf.rl.data.load_phase`): a bad line stops the run before any model.
2. Loads the policy (a Hugging Face checkpoint, or "tiny-warm") for training (`vibeperf.model.load_model`:
   varlen attention over packed rows, fp32 weights, bf16 autocast on CUDA) and AdamW with a per-phase warm-up and
   cosine (`vibeperf.train`: one schedule segment per phase). On the CPU it fixes the torch thread count first and
   exports it as OMP_NUM_THREADS, because vLLM lowers the count to 1 and then freezes it for the whole process.
3. Starts the rollout engine on the same checkpoint (`vibeperf.rollout.engine_from_config` with the `engine`
   section: "auto" is vLLM when it imports, in this process with VLLM_ENABLE_V1_MULTIPROCESSING=0, else transformers
   generate).
4. Before each phase, the static filter samples every prompt G times with the phase's starting weights and drops
   the prompts solved always or never (counts logged, per-prompt accuracies in static_filter/PHASE.json).
5. Each RL step (`RLTrainer.step`, which reads in this order):
   1. generate: draws `prompts_per_step` prompts from the phase's sources by their mixing weights, splits them into
      minibatches (`vibeperf.rl.data.split_minibatches`) and samples G completions of each (the `sampling` section
      with the phase's completion budget; raw log-probs of the sampled tokens);
   2. score: `vibeperf.rewards.Scorer` (math-verify, sandboxed code tests); with `rollout.dynamic_sampling` (DAPO,
      one process) steps 1-2 repeat, at most `rollout.max_sample_batches` draws, until the step holds
      `prompts_per_step` groups whose rewards are not all equal (metrics sample_batches, prompts_drawn,
      groups_mixed, groups_kept);
   3. advantages: A' = w_ME * A per completion on the device (`vibeperf.rl.advantages`: the MGPO kernel's group
      statistics, the Long2Short shift where the phase enables it);
   4. minibatches: prompt + completion sequences packed into rows of `loss.token_budget` tokens (loss on completion
      tokens only; none on a truncated completion with `rollout.mask_truncated`);
   5. loss and optimizer (`vibeperf.rl.update.policy_update`): old log-probs from a no-grad forward when the step
      has several minibatches, or, on-policy (one minibatch), the loss forward's own log-probs detached, which
      saves a forward of the model body per row; then per minibatch the fused `mgpo_loss` (clipping, truncated
      importance sampling against the engine's log-probs) on each row, scaled so the rows add up to the
      minibatch's aggregation, backward, foreach clipping and an AdamW step; the entropy and the gap between the
      trainer's and the engine's log-probs (a weight-sync or numerics check) are measured on every completion token;
   6. weight push: the new weights go to the engine in memory (`update_weights(model.state_dict().items())`).
6. Writes one metrics line per step (reward, pass rate, response length, clip fractions, entropy, ratio, log-prob
   gap, seconds spent generating / scoring / updating / syncing) to metrics.jsonl, plots reward.png and length.png,
   and saves checkpoints (`vibeperf.train.Checkpointer`: Hugging Face model + tokenizer, optimizer, scheduler, RNG,
   step, data position, static filter results); `checkpoint.resume=latest` continues exactly when the engine
   samples reproducibly.

Launch lines:
    python -m vibeperf rl recipes/rl_tiny.toml                                  # CPU, tiny model, about a minute
    python -m vibeperf rl recipes/rl_vibethinker.toml model.path=/ckpt/sft-final      # one GPU
    python -m vibeperf rl recipes/rl_vibethinker.toml checkpoint.resume=latest       # continue a run
Multi-GPU (torchrun + FSDP2, `vibeperf.distributed`; the same script and recipe, nothing changes without torchrun):
    torchrun --nproc-per-node 8 -m vibeperf rl recipes/rl_vibethinker.toml model.path=/ckpt/sft-final
Under torchrun the run is data-parallel: every process draws the same prompts, takes its share of each minibatch's
prompts (contiguous blocks, groups whole; prompt i of a step samples with seed + i wherever it runs, so the samples
do not depend on the number of processes) and samples them with its own engine on its own GPU (colocated: the engine
shares the GPU with that process's trainer shard). Blocks and the root are `fully_shard`-ed as in SFT, old
log-probs and the MGPO loss go through the FSDP root (the same `FusedLossLM` as in one process; it gathers the
LM-head weight), each row's loss is divided
by the minibatch's normaliser summed over processes on the device (tokens, sequences, or sequences x longest), so
the reduce-scattered gradient equals the one-process gradient. After each step every process gathers the new
weights bucket by bucket (`rollout.sync_bucket_mb`) into its engine (`update_weights_bucketed`). Metrics are
gathered to every process and written by rank 0; checkpoints add DCP shards (`dcp/`) and resume on any number of
processes. Every minibatch needs at least one prompt per process (prompts_per_step / minibatches >= processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vibeperf import distributed as vdist
from vibeperf.config import ConfigError, EngineConfig, config_to_dict
from vibeperf.errors import RunError, UserError
from vibeperf.files import write_text
from vibeperf.model import FusedLossLM, load_model, model_path, resolve_device, resolve_precision
from vibeperf.rewards import Scorer
from vibeperf.rl.advantages import group_advantages, overlong_penalty
from vibeperf.rl.config import RLConfig
from vibeperf.rl.data import (
    MixtureSampler,
    PhaseData,
    RLRow,
    contiguous,
    fit_prompts,
    load_phase,
    pack_sequences,
    split_minibatches,
    static_filter,
)
from vibeperf.rl.update import UpdateOptions, policy_update
from vibeperf.rollout import SamplingConfig, engine_from_config
from vibeperf.train import Checkpointer, FiniteCheck, MetricsWriter, Preemption, Schedule, make_optimizer

log = logging.getLogger("vibeperf.rl")
TOKEN_MEANS = ("clip_frac_low", "clip_frac_high", "ratio_mean", "tis_frac")


def sampling_seed(seed: int, kind: str, index: int) -> int:
    """A sampler seed for (run seed, purpose, index); engines add the prompt's position to it."""
    digest = hashlib.sha256(f"vibeperf-rl:{seed}:{kind}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 2


def resolve_model_path(path: str) -> str:
    """`path`, "tiny" (the random tiny Qwen2) or "tiny-warm" (it after a format SFT, vibeperf.rl.synthetic)."""
    if path == "tiny-warm":
        from vibeperf.rl.synthetic import get_tiny_warm_model, tiny_warm_dir

        if vdist.launched_by_torchrun() and not (tiny_warm_dir() / ".vibeperf-tiny-warm.json").is_file():
            # it is built by an SFT run in this process, which would join the torchrun process group
            raise RuntimeError(
                "model.path='tiny-warm' is not built yet; build it once outside torchrun first: python "
                "-c 'from vibeperf.rl.synthetic import get_tiny_warm_model; get_tiny_warm_model()'"
            )
        return os.fspath(get_tiny_warm_model())
    return model_path(path)


def set_cpu_threads(requested: int) -> int:
    """Fix torch's CPU thread count and export it as OMP_NUM_THREADS (before vLLM starts; see the module doc)."""
    n = requested or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def make_schedule(cfg: RLConfig) -> Schedule:
    """One schedule segment per phase (its warm-up + cosine)."""
    return Schedule.build([(p.name, p.steps, p.lr, p.min_lr) for p in cfg.phases], cfg.optim)


def data_fingerprint(phases: Sequence[PhaseData]) -> str:
    h = hashlib.sha256()
    for ph in phases:
        for s in ph.sources:
            h.update(f"{ph.name}/{s.name}/{len(s.records)}".encode())
            for r in s.records:
                h.update(f"{r.prompt}\0{r.answer}\0{r.tests}".encode())
    return h.hexdigest()[:16]


def plot_curves(metrics: MetricsWriter) -> None:
    """reward.png (reward mean, pass rate) and length.png (mean and max response length) against the step."""
    for name, ylabel, curves in (
        ("reward.png", "reward", [("reward_mean", "reward mean"), ("pass_rate", "pass rate")]),
        ("length.png", "response length (tokens)", [("response_length_mean", "mean"), ("response_length_max", "max")]),
    ):
        metrics.plot(name, [(ylabel, curves)], segment_key="phase", xlabel="RL step", size=(8, 4))


@dataclass
class Rollouts:
    """A step's scored groups on this process, in minibatch-block order, and the prompts they came from."""

    picks: list[tuple[int, int]]
    groups: list
    rewards: list[float]
    failures: list
    sampling: SamplingConfig
    generate_s: float
    counts: dict = dataclasses.field(default_factory=dict)
    """Dynamic sampling's metrics (draws, prompts drawn, mixed groups found and kept, the reward mean over every
    completion drawn); empty without it."""


def engine_reserve_gib(engine: EngineConfig, checkpoint: str) -> float:
    """GPU memory the colocated rollout engine holds beside the trainer, for the "auto" checkpoint policy: its
    KV-cache budget plus a copy of the checkpoint's weights (the size of its safetensors files)."""
    weights = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
    return engine.kv_cache_gib + weights / 2**30


@dataclass
class RLResult:
    """What a run did."""

    steps: int
    output_dir: Path
    last_checkpoint: Path | None
    engine: str
    last_metrics: dict | None
    filters: dict
    stopped_by: str | None = None
    """The signal that stopped the run early (SIGTERM, SIGINT; a checkpoint was saved), None if it ran to the end."""


class RLTrainer:
    """The RL loop of `cfg` (see the module docstring): `run()` trains to the end, `step()` runs one RL step."""

    def __init__(self, cfg: RLConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.out_dir = Path(cfg.output_dir)
        device = resolve_device(cfg.train.device)
        self.device = vdist.init_distributed(device.type) or device
        self.rank, self.world = vdist.rank(), vdist.world_size()
        self.main = self.rank == 0
        if not self.main:
            log.setLevel(logging.WARNING)
        ro, lc = cfg.rollout, cfg.loss
        if ro.prompts_per_step // min(lc.minibatches, ro.prompts_per_step) < self.world:
            raise ConfigError(f"rollout.prompts_per_step={ro.prompts_per_step} split into loss.minibatches="
                              f"{lc.minibatches} leaves fewer prompts per minibatch than the {self.world} processes: "
                              "every process needs at least one group of every minibatch")  # fmt: skip
        if ro.dynamic_sampling and self.world > 1:
            raise ConfigError(f"rollout.dynamic_sampling: runs in one process only, not under torchrun ({self.world} "
                              "processes): the kept groups would have to move between processes")  # fmt: skip
        self.precision = resolve_precision(cfg.train.precision, self.device)
        if self.device.type == "cpu":
            log.info("CPU threads: %d (OMP_NUM_THREADS)", set_cpu_threads(cfg.train.cpu_threads))
        src = resolve_model_path(cfg.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(src)
        self.phases = [load_phase(p) for p in cfg.phases]
        self.schedule = make_schedule(cfg)
        self._fit_prompts(src)
        self.fingerprint = data_fingerprint(self.phases)
        self.total = self.schedule.total_steps
        self.stop = min(self.total, cfg.train.max_steps) if cfg.train.max_steps else self.total
        for ph in self.phases:
            log.info("phase %s: %s", ph.name, ", ".join(f"{s.name} {len(s.records)} prompts (weight {s.weight:g})"
                                                         for s in ph.sources))  # fmt: skip

        self.checkpointer = Checkpointer(self.out_dir, cfg.checkpoint, sharded=vdist.is_distributed())
        resume = self.checkpointer.resume_dir()
        seed = cfg.train.seed
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.model = load_model(cfg.model, os.fspath(resume) if resume else src, self.device, self.precision,
                                row_tokens=cfg.loss.token_budget, shards=vdist.world_size(),
                                reserved_gib=engine_reserve_gib(cfg.engine, src))  # fmt: skip
        self.fsdp_root = None
        if vdist.is_distributed():
            self.fsdp_root = vdist.shard_model(self.model, vdist.default_mp_policy(self.device))
        self.root = self.fsdp_root if self.fsdp_root is not None else FusedLossLM(self.model)
        self.optimizer = make_optimizer(self.model, cfg.optim, self.device,
                                        master_weights=self.precision == "bf16-master")
        self.scheduler = self.schedule.scheduler(self.optimizer, cfg.optim.lr)
        self.step_count, self.filters, cursors, skipped = 0, {}, None, 0
        if resume is not None:
            must_match = {"data_fingerprint": (self.fingerprint, "the data"),
                          "plan": (self.signature(), "seed, batch or phases")}  # fmt: skip
            state = self.checkpointer.load(resume, self.model, self.optimizer, self.scheduler, must_match)
            self.step_count, self.filters, cursors = state["step"], state["filters"], state["cursors"]
            skipped = int(state.get("nonfinite_skipped", 0))
            log.info("resumed from %s at step %d (phase %s)", resume, self.step_count, state["phase_name"])
        self.start = self.step_count
        self.finite = FiniteCheck(self.device, self.step_count, cfg.optim.nonfinite, skipped)
        self._cursors = cursors
        self.sampler: MixtureSampler | None = None
        autocast = torch.bfloat16 if self.precision == "bf16-autocast" else None
        self.update_options = UpdateOptions(cfg.loss, cfg.optim.grad_clip, self.device, autocast)
        self.engine = engine_from_config(cfg.engine, os.fspath(resume) if resume else src, seed=cfg.sampling.seed,
                                         device=str(self.device))  # fmt: skip
        self.scorer = Scorer(cfg.reward)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lg = cfg.logging
        self.metrics = MetricsWriter(self.out_dir, enabled=self.main, resume_step=self.step_count,
                                     tensorboard=lg.tensorboard, wandb=lg.wandb, wandb_project=lg.wandb_project,
                                     run_config=config_to_dict(cfg))  # fmt: skip
        if self.main:
            write_text(self.out_dir / "config.json", json.dumps(config_to_dict(cfg), indent=1) + "\n")

    def _fit_prompts(self, src: str) -> None:
        """`fit_prompts` on every phase against the engine's context and loss.token_budget (rollout.long_prompts)."""
        from transformers import AutoConfig

        ro, eng = self.cfg.rollout, self.cfg.engine
        context = eng.max_model_len or getattr(AutoConfig.from_pretrained(src), "max_position_embeddings", None)
        limits = [(self.cfg.loss.token_budget, "loss.token_budget")]
        if context:
            limits.append((context, "engine.max_model_len" if eng.max_model_len else "max_position_embeddings"))
        limit, name = min(limits)
        for pc, ph in zip(self.cfg.phases, self.phases):
            fit_prompts(ph, self.tokenizer, max_tokens=pc.max_tokens or self.cfg.sampling.max_tokens, limit=limit,
                        limit_name=name, policy=ro.long_prompts)  # fmt: skip

    def signature(self) -> dict:
        """What fixes the prompts and their order; a resumed run must match it."""
        c = self.cfg
        sig = {"seed": c.train.seed, "rollout_seed": c.sampling.seed, "prompts_per_step": c.rollout.prompts_per_step,
               "group_size": c.rollout.group_size,
               "phases": [[p.name, p.steps, [[s.name, s.weight, len(s.records)] for s in ph.sources]]
                          for p, ph in zip(c.phases, self.phases)]}  # fmt: skip
        if c.rollout.dynamic_sampling:  # the draws per step move the data position
            sig["max_sample_batches"] = c.rollout.max_sample_batches
        return sig

    def _enter_phase(self, index: int) -> None:
        """Run (or restore) the phase's static filter and start its prompt sampler."""
        pc, data = self.cfg.phases[index], self.phases[index]
        enabled = self.cfg.filter.enabled if pc.static_filter is None else pc.static_filter
        if enabled and data.name not in self.filters:
            t0 = time.perf_counter()
            samples = self.cfg.filter.samples or self.cfg.rollout.group_size
            sampling = self._sampling(pc, sampling_seed(self.cfg.train.seed, f"filter:{data.name}", 0))
            where = f"static filter of phase {data.name!r}"
            result = static_filter(self.engine, data, self.scorer, samples=samples, sampling=sampling,
                                   batch_prompts=self.cfg.engine.batch_prompts, rank=self.rank, world=self.world,
                                   guard=lambda: self._engine_fault("sampling", where))  # fmt: skip
            self.filters[data.name] = result.kept
            log.info("static filter, phase %s: %d prompts x %d samples, kept %d, dropped %d never solved and %d "
                     "always solved (%.1f s)", data.name, result.stats["prompts"], samples, result.stats["kept"],
                     result.stats["all_wrong"], result.stats["all_right"], time.perf_counter() - t0)  # fmt: skip
            if self.main:
                (self.out_dir / "static_filter").mkdir(exist_ok=True)
                report = {"samples": samples, "stats": result.stats, "accuracy": result.accuracy, "kept": result.kept}
                (self.out_dir / "static_filter" / f"{data.name}.json").write_text(json.dumps(report) + "\n")
        for s in data.sources:
            s.kept = self.filters[data.name][s.name] if data.name in self.filters else list(range(len(s.records)))
        state = None
        if self._cursors is not None and self._cursors["phase"] == index:
            state = self._cursors["position"]
        self._cursors = None
        self.sampler = MixtureSampler(data, index, self.cfg.train.seed, state)

    def _sampling(self, pc, seed: int) -> SamplingConfig:
        """The recipe's sampling with the phase's completion budget and a derived seed."""
        sc = self.cfg.sampling
        return dataclasses.replace(sc, max_tokens=pc.max_tokens or sc.max_tokens, seed=seed)

    def step(self) -> dict:
        """One RL step, top to bottom: generate -> score -> advantages -> minibatches -> loss and optimizer -> weight
        push; returns its metrics record (host values, over every process)."""
        cfg, s, dev, size = self.cfg, self.step_count, self.device, self.cfg.rollout.group_size
        phase, _ = self.schedule.locate(s)
        if self.sampler is None or self.sampler.phase != phase:
            self._enter_phase(phase)
        pc, data = cfg.phases[phase], self.phases[phase]
        t0 = time.perf_counter()

        # 1. generate and 2. score: one draw, or with dynamic sampling draws until enough groups have mixed rewards
        ro = self._dynamic_rollout(pc, data) if cfg.rollout.dynamic_sampling else self._rollout(pc, data, 0)
        blocks = split_minibatches(cfg.rollout.prompts_per_step, cfg.loss.minibatches, self.rank, self.world)
        groups, rewards, sampling = ro.groups, ro.rewards, ro.sampling
        completions = [c for g in groups for c in g.completions]
        lengths = [len(c.token_ids) for c in completions]

        # 3. advantages on the device, per group (groups are whole on every process)
        group_index = torch.arange(len(groups), device=dev).repeat_interleave(size)
        lengths_t = torch.tensor(lengths).to(dev)
        overlong = None
        if cfg.rollout.overlong_buffer:
            overlong = overlong_penalty(lengths_t, max_tokens=sampling.max_tokens, factor=cfg.rollout.overlong_penalty,
                                        buffer=min(cfg.rollout.overlong_buffer, sampling.max_tokens))  # fmt: skip
        adv, weights, used = group_advantages(
            torch.tensor(rewards, dtype=torch.float64).to(dev), lengths_t, group_index,
            num_groups=len(groups), mgpo_lambda=cfg.loss.mgpo_lambda, scale=cfg.loss.scale,
            long2short_lambda=pc.long2short_lambda if pc.long2short else None, reward_shift=overlong,
        )  # fmt: skip
        t2 = time.perf_counter()

        # 4. minibatches of packed rows, 5. loss and an optimizer step per minibatch
        lr = self.optimizer.param_groups[0]["lr"]
        upd = policy_update(self.root, self.optimizer, self._minibatches(groups, blocks), adv, self.update_options,
                            finite=self.finite)  # fmt: skip
        self.scheduler.step()
        self.finite.update(upd["loss"], upd["grad_norm"])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t3 = time.perf_counter()

        # 6. the new weights to the engine
        with self._engine_fault("taking the new weights"):
            self.push_weights()
        t4 = time.perf_counter()
        self.step_count += 1
        self.finite.raise_if_bad(self.step_count)
        local = {"rewards": rewards, "used": used.tolist(), "weights": weights.tolist(), "lengths": lengths,
                 "truncated": [c.finish_reason == "length" for c in completions],
                 "reward_failures": ro.failures}  # fmt: skip
        t1 = t0 + ro.generate_s
        times = {"time_generate_s": ro.generate_s, "time_score_s": t2 - t1, "time_update_s": t3 - t2,
                 "time_sync_s": t4 - t3, "time_step_s": t4 - t0}  # fmt: skip
        sources = {n: sum(data.sources[i].name == n for i, _ in ro.picks) for n in (x.name for x in data.sources)}
        record = self._record(data.name, lr, vdist.gather_lists(local), upd, times, sources) | ro.counts
        if cfg.optim.nonfinite == "skip":
            record["nonfinite_skipped"] = self.finite.skipped
        return record

    def _rollout(self, pc, data: PhaseData, draw: int) -> Rollouts:
        """Draw `prompts_per_step` prompts (draw `draw` of this step), generate this process's block of each
        minibatch (prompt i of a draw samples with seed + i wherever it runs, so the samples do not depend on the
        number of processes) and score them (host work: math-verify, code sandboxes)."""
        cfg, s, t0 = self.cfg, self.step_count, time.perf_counter()
        picks = self.sampler.draw(s, cfg.rollout.prompts_per_step, draw)  # the same on every process
        every = [data.sources[i].records[j] for i, j in picks]
        blocks = split_minibatches(len(every), cfg.loss.minibatches, self.rank, self.world)
        records = [r for a, b in blocks for r in every[a:b]]
        sampling = self._sampling(pc, sampling_seed(cfg.train.seed, "step" if draw == 0 else f"step:{draw}", s))
        groups = []
        for a, b in contiguous(blocks):
            seed = None if sampling.seed is None else sampling.seed + a
            with self._engine_fault("sampling"):
                groups += self.engine.generate([self.engine.chat_prompt(r.prompt) for r in every[a:b]],
                                               n=cfg.rollout.group_size,
                                               sampling=dataclasses.replace(sampling, seed=seed))  # fmt: skip
        t1 = time.perf_counter()
        rewards = self.scorer([(r, c.text) for r, g in zip(records, groups) for c in g.completions])
        failures = list(self.scorer.failures)  # graded 0 because a reward worker crashed or hung
        return Rollouts(picks, groups, rewards, failures, sampling, t1 - t0)

    def _dynamic_rollout(self, pc, data: PhaseData) -> Rollouts:
        """DAPO dynamic sampling (one process): draws until prompts_per_step groups have rewards that are not all
        equal, at most rollout.max_sample_batches draws; the step keeps the first prompts_per_step such groups, at the
        cap filled up with the uniform groups drawn first. The rewards are host values already: no extra sync."""
        ro_cfg, size = self.cfg.rollout, self.cfg.rollout.group_size
        want, mixed, uniform, draws, gen_s = ro_cfg.prompts_per_step, [], [], [], 0.0
        while len(mixed) < want and len(draws) < ro_cfg.max_sample_batches:
            ro = self._rollout(pc, data, len(draws))
            draws.append(ro)
            gen_s += ro.generate_s
            for g in range(len(ro.groups)):
                r = ro.rewards[g * size : (g + 1) * size]
                (mixed if max(r) != min(r) else uniform).append((ro, g))
        chosen = mixed[:want] + uniform[: max(0, want - len(mixed))]
        drawn = [x for ro in draws for x in ro.rewards]
        counts = {"sample_batches": len(draws), "prompts_drawn": len(draws) * want, "groups_mixed": len(mixed),
                  "groups_kept": min(len(mixed), want), "reward_drawn_mean": sum(drawn) / len(drawn)}  # fmt: skip
        return Rollouts(picks=[ro.picks[g] for ro, g in chosen], groups=[ro.groups[g] for ro, g in chosen],
                        rewards=[x for ro, g in chosen for x in ro.rewards[g * size : (g + 1) * size]],
                        failures=[f for ro in draws for f in ro.failures], sampling=draws[0].sampling,
                        generate_s=gen_s, counts=counts)  # fmt: skip

    def _minibatches(self, groups, blocks: Sequence[tuple[int, int]]) -> list[list[tuple[RLRow, bool]]]:
        """Packed rows of each minibatch (`blocks`: this process's prompts of each), on the device, as (row, real)
        pairs; under torchrun padded with zero-weight copies so every process runs as many rows as the busiest."""
        lc, size = self.cfg.loss, self.cfg.rollout.group_size
        no_loss = set()
        if self.cfg.rollout.mask_truncated:  # overlong filtering: truncated completions get no loss
            no_loss = {g * size + j for g, grp in enumerate(groups) for j, c in enumerate(grp.completions)
                       if c.finish_reason == "length"}  # fmt: skip
        rows, first = [], 0
        for a, b in blocks:
            seq_ids = [g * size + j for g in range(first, first + b - a) for j in range(size)]
            packed = pack_sequences(groups, seq_ids, lc.token_budget, no_loss)
            rows.append([r.to(self.device) for r in packed])
            first += b - a
        counts = [len(mb) for mb in rows]
        if self.world > 1:  # one host read per step: the loop lengths must agree across processes
            counts = vdist.all_reduce(torch.tensor(counts, device=self.device), "max").tolist()
        return [[(r, True) for r in mb] + [(mb[0], False)] * (n - len(mb)) for mb, n in zip(rows, counts)]

    def _record(self, phase: str, lr: float, glob: dict, upd: dict, times: dict, sources: dict) -> dict:
        """The step's metrics line from the gathered host lists and the update's device metrics."""
        size = self.cfg.rollout.group_size
        rewards, used, weights = (torch.tensor(glob[k], dtype=torch.float64) for k in ("rewards", "used", "weights"))
        lengths = torch.tensor(glob["lengths"])
        grouped = rewards.view(-1, size)
        upd = {k: v.item() for k, v in upd.items()}
        upd["rows"] = int(upd["rows"])
        return {
            "step": self.step_count, "phase": phase, "lr": lr,
            "reward_mean": rewards.mean().item(), "pass_rate": (rewards == 1).double().mean().item(),
            "reward_used_mean": used.mean().item(), "mgpo_weight_mean": weights.mean().item(),
            "zero_adv_groups": (grouped.amax(1) == grouped.amin(1)).double().mean().item(),
            "response_length_mean": lengths.double().mean().item(), "response_length_max": int(lengths.max()),
            "truncated_frac": sum(glob["truncated"]) / len(glob["truncated"]),
            "reward_failures": len(glob["reward_failures"]), **upd,
            "completion_tokens": int(lengths.sum()), **times, "sources": sources,
        }  # fmt: skip

    @contextlib.contextmanager
    def _engine_fault(self, what: str, where: str | None = None):
        """The rollout engine's failures as a RunError naming where they happened, `where` (by default the step
        under way; the static filter passes its phase): the run stops and its checkpoints are intact."""
        try:
            yield
        except UserError:
            raise
        except Exception as e:
            where = where or f"step {self.step_count + 1}"
            raise RunError(
                f"{where}: the rollout engine ({self.engine.name}) failed while {what}: "
                f"{type(e).__name__}: {' '.join(str(e).split())[:300]}; the run stops, its last checkpoint "
                "is intact (continue with checkpoint.resume=latest)"
            ) from e

    def push_weights(self) -> None:
        """The new weights to this process's engine: the whole state dict in one process; under FSDP gathered one
        bucket of `rollout.sync_bucket_mb` at a time (every process gathers every bucket for its own engine)."""
        if self.fsdp_root is None:
            self.engine.update_weights(self.model.state_dict().items())
            return
        buckets = vdist.full_tensor_buckets(self.model, int(self.cfg.rollout.sync_bucket_mb * 2**20))
        self.engine.update_weights_bucketed(buckets, vdist.full_shapes(self.model))

    def save(self) -> Path:
        phase, _ = self.schedule.locate(self.step_count)
        sampler = self.sampler
        state = {"step": self.step_count, "phase": phase, "phase_name": self.cfg.phases[phase].name,
                 "cursors": None if sampler is None else {"phase": sampler.phase, "position": sampler.state()},
                 "filters": self.filters, "data_fingerprint": self.fingerprint, "plan": self.signature(),
                 "nonfinite_skipped": self.finite.skipped, "config": config_to_dict(self.cfg)}  # fmt: skip
        path = self.checkpointer.save(self.model, self.tokenizer, self.optimizer, self.scheduler, state)
        if self.cfg.logging.plot:
            plot_curves(self.metrics)
        log.info("checkpoint %s", path)
        return path

    def run(self, on_step: Callable[[RLTrainer, dict], None] | None = None) -> RLResult:
        """Train to `train.max_steps` or the end of the last phase; returns a summary.

        on_step(trainer, record) is called after each step (weights synced, metrics written), e.g. to probe the engine.
        """
        from tqdm.auto import tqdm

        cfg, last, ckpt = self.cfg, None, None
        bar = tqdm(total=self.stop, initial=self.step_count, disable=not (cfg.logging.progress and self.main),
                   dynamic_ncols=True, desc="rl")  # fmt: skip
        with Preemption(self.device) as preempt:
            while self.step_count < self.stop and not preempt.requested():
                record = self.step()
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", len=f"{record['response_length_mean']:.0f}")
                if self.step_count % cfg.logging.every == 0 or self.step_count == self.stop:
                    self.metrics.write(record)
                    last = record
                if cfg.checkpoint.every and self.step_count % cfg.checkpoint.every == 0 and self.step_count < self.stop:
                    ckpt = self.save()
                if on_step is not None:
                    on_step(self, record)
        bar.close()
        if preempt.signal is not None and self.step_count < self.stop:
            ckpt = self.save()
            log.warning("stopped by %s after step %d; checkpoint %s (continue with checkpoint.resume=latest)",
                        preempt.signal, self.step_count, ckpt)  # fmt: skip
        elif cfg.checkpoint.save_final and self.step_count > self.start:
            ckpt = self.save()
        elif cfg.logging.plot:
            plot_curves(self.metrics)
        return RLResult(self.step_count, self.out_dir, ckpt, self.engine.name, last, self.filters, preempt.signal)

    def close(self) -> None:
        """Release the metrics sinks, the scorer workers and the engine, then the process group (under torchrun)."""
        self.metrics.close()
        self.scorer.close()
        self.engine.close()
        vdist.destroy_distributed()


def train(cfg: RLConfig) -> RLResult:
    """Run the RL phases of `cfg` (see the module docstring) and release the engine."""
    trainer = RLTrainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()

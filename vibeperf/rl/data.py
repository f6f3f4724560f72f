"""The RL loop's data side: phase data, the prompt mixture, the static filter, minibatches and packed rows.

- `load_phase`: reads every RL data file of a phase (`vibeperf.data.read_rl`) and checks each record's domain
  and target before anything runs, so a bad line stops the run early with `file: record N: ...`.
- `fit_prompts`: the prompts whose chat-templated length plus the completion budget exceed the context, refused
  (DataError naming the file and record) or dropped and counted, before any model loads.
- `MixtureSampler`: each prompt slot of a step picks a source with probability weight / sum(weights) (a generator
  seeded by (seed, phase, step)); each source is walked through in a shuffled order, reshuffled every epoch. Its
  state (epoch and position per source) is the data position a checkpoint stores.
- `static_filter`: samples every prompt of a phase `samples` times with the starting checkpoint and keeps the prompts
  whose accuracy (share of reward-1 samples) is strictly between 0 and 1.
- `split_minibatches`: the one split of a step's prompts into minibatches (and, under torchrun, among processes).
- `pack_sequences`: prompt + completion sequences packed into rows (`vibeperf.model.pack_rows`), loss on completion
  tokens only, with the per-token tensors the MGPO loss needs (sequence ids, rollout log-probs) in the row layout.
- `row_scales`: the factor of each packed row's loss so the rows add up to the minibatch's aggregation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vibeperf import distributed as vdist
from vibeperf.data import DataError, RLRecord, read_rl
from vibeperf.data.sources import describe
from vibeperf.model import PackedRow, Sample, pack_rows
from vibeperf.rewards import Scorer, domain_kind
from vibeperf.rl.config import PhaseConfig
from vibeperf.rollout import RolloutEngine, RolloutGroup, SamplingConfig, chat_text

log = logging.getLogger("vibeperf.rl")


@dataclass
class Source:
    """One data source of a phase; `kept` indexes the records that survived the static filter."""

    name: str
    records: list[RLRecord]
    weight: float
    kept: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    """`file: record N` of each record, for messages."""


@dataclass
class PhaseData:
    name: str
    sources: list[Source]

    @property
    def num_prompts(self) -> int:
        return sum(len(s.records) for s in self.sources)


def load_phase(cfg: PhaseConfig) -> PhaseData:
    """Read and check every file of a phase (DataError naming the file and record on a bad one)."""
    sources, names = [], set()
    for sc in cfg.sources:
        name = sc.name or Path(describe(sc.files[0]).removesuffix(".gz")).stem
        if name in names:
            raise DataError(f"phase {cfg.name!r}: two sources named {name!r}; give them distinct `name`s")
        names.add(name)
        records, origins = [], []
        for source in sc.files:
            path = describe(source)
            for j, rec in enumerate(read_rl(source)):
                try:
                    kind = domain_kind(rec.domain)
                except ValueError as e:
                    raise DataError(f"{path}: record {j + 1}: {e}") from None
                if (kind == "math") != (rec.answer is not None):
                    need = "an 'answer'" if kind == "math" else "'tests'"
                    raise DataError(f"{path}: record {j + 1}: domain {rec.domain!r} needs {need}")
                records.append(rec)
                origins.append(f"{path}: record {j + 1}")
        sources.append(Source(name, records, sc.weight, list(range(len(records))), origins))
    return PhaseData(cfg.name, sources)


def fit_prompts(data: PhaseData, tokenizer, *, max_tokens: int, limit: int, limit_name: str, policy: str) -> int:
    """Refuse or drop the prompts of `data` that cannot be sampled whole: chat-templated prompt tokens + `max_tokens`
    over `limit` (the smaller of the engine's context and the loss's row budget, named `limit_name`).

    policy "refuse": DataError naming the first such prompt's file and record; "skip": they are removed from their
    source (before the data fingerprint and the static filter) and the number removed is returned (and logged)."""
    dropped = 0
    for src in data.sources:
        texts = [chat_text(tokenizer, r.prompt) for r in src.records]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        bad = [i for i, n in enumerate(lengths) if n + max_tokens > limit]
        if bad and policy == "refuse":
            i = bad[0]
            raise DataError(f"{src.origins[i]}: the prompt is {lengths[i]} tokens with the chat template; with "
                            f"max_tokens={max_tokens} it needs {lengths[i] + max_tokens} > {limit_name}={limit} "
                            f"({len(bad)} such prompt(s) in source {src.name!r}; rollout.long_prompts=skip drops "
                            "them)")  # fmt: skip
        if bad:
            keep = sorted(set(range(len(src.records))) - set(bad))
            log.warning("phase %s, source %s: %d prompt(s) longer than %s=%d minus max_tokens=%d dropped (first: %s)",
                        data.name, src.name, len(bad), limit_name, limit, max_tokens, src.origins[bad[0]])  # fmt: skip
            src.records = [src.records[i] for i in keep]
            src.origins = [src.origins[i] for i in keep]
            src.kept = list(range(len(src.records)))
            dropped += len(bad)
            if not src.records:
                raise DataError(f"phase {data.name!r}, source {src.name!r}: every prompt is too long ({limit_name}="
                                f"{limit}, max_tokens={max_tokens})")  # fmt: skip
    return dropped


def shuffled(seed: int, phase: int, source: int, epoch: int, n: int) -> list[int]:
    """The deterministic order of one source's epoch."""
    order = list(range(n))
    random.Random(f"vibeperf-rl:{seed}:{phase}:{source}:{epoch}").shuffle(order)
    return order


class MixtureSampler:
    """Draws each step's prompts from a phase's (filtered) sources; see the module docstring."""

    def __init__(self, data: PhaseData, phase: int, seed: int, state: dict | None = None):
        self.data, self.phase, self.seed = data, phase, seed
        self.position = {s.name: [0, 0] for s in data.sources}
        if state:
            self.position.update({k: list(v) for k, v in state.items()})
        self._orders: dict[tuple[int, int], list[int]] = {}
        empty = [s.name for s in data.sources if not s.kept]
        if empty:
            raise DataError(f"phase {data.name!r}: no prompt left in source(s) {empty} (after the static filter)")

    def state(self) -> dict:
        return {k: list(v) for k, v in self.position.items()}

    def _next(self, i: int) -> int:
        src = self.data.sources[i]
        epoch, pos = self.position[src.name]
        key = (i, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != i}
            self._orders[key] = shuffled(self.seed, self.phase, i, epoch, len(src.kept))
        index = src.kept[self._orders[key][pos]]
        self.position[src.name] = [epoch + 1, 0] if pos + 1 == len(src.kept) else [epoch, pos + 1]
        return index

    def draw(self, step: int, n: int, draw: int = 0) -> list[tuple[int, int]]:
        """(source index, record index) of the `n` prompts of global step `step` (`draw` > 0: a further draw of the
        same step, for dynamic sampling)."""
        key = f"{step}" if draw == 0 else f"{step}:{draw}"
        rng = random.Random(f"vibeperf-rl-mix:{self.seed}:{self.phase}:{key}")
        picks = rng.choices(range(len(self.data.sources)), weights=[s.weight for s in self.data.sources], k=n)
        return [(i, self._next(i)) for i in picks]


@dataclass
class FilterResult:
    """What the static filter kept, per source, and the counts it logs."""

    kept: dict[str, list[int]]
    accuracy: dict[str, list[float]]
    stats: dict[str, int]


def static_filter(
    engine: RolloutEngine, data: PhaseData, scorer: Scorer, *, samples: int, sampling: SamplingConfig,
    batch_prompts: int, rank: int = 0, world: int = 1,
    guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> FilterResult:  # fmt: skip
    """Sample every prompt of `data` `samples` times; keep the prompts with accuracy strictly inside (0, 1).

    With `world` > 1 (under torchrun, a collective) process `rank` samples a contiguous block of the prompts and the
    accuracies are gathered; prompt i samples with seed + i wherever it runs, so the result does not depend on
    `world`. Each engine call runs inside a fresh `guard()` (the trainer's: an engine failure becomes a RunError
    naming the phase)."""
    items = [(s, i) for s in data.sources for i in range(len(s.records))]
    lo, hi = len(items) * rank // world, len(items) * (rank + 1) // world
    acc: list[float] = []
    for b0 in range(lo, hi, batch_prompts):
        batch = items[b0 : min(b0 + batch_prompts, hi)]
        seed = None if sampling.seed is None else sampling.seed + b0
        with guard():
            groups = engine.generate([engine.chat_prompt(s.records[i].prompt) for s, i in batch], n=samples,
                                     sampling=dataclasses.replace(sampling, seed=seed))  # fmt: skip
        rewards = scorer([(s.records[i], c.text) for (s, i), g in zip(batch, groups) for c in g.completions])
        acc += [sum(r == 1.0 for r in rewards[k * samples : (k + 1) * samples]) / samples for k in range(len(batch))]
    if world > 1:
        acc = vdist.gather_lists({"acc": acc})["acc"]
    kept: dict[str, list[int]] = {s.name: [] for s in data.sources}
    accuracy: dict[str, list[float]] = {s.name: [] for s in data.sources}
    for (s, i), a in zip(items, acc):
        accuracy[s.name].append(a)
        if 0.0 < a < 1.0:
            kept[s.name].append(i)
    stats = {"prompts": len(items), "kept": sum(map(len, kept.values())), "all_wrong": sum(a == 0.0 for a in acc),
             "all_right": sum(a == 1.0 for a in acc)}  # fmt: skip
    return FilterResult(kept, accuracy, stats)


@dataclass
class RLRow:
    """A packed row of prompt + completion sequences and its MGPO inputs in the row layout.

    row: the packed tokens (targets -100 outside the completions); seq_ids: [S_row] global ids of its sequences, in
    row order; seq_index: [T] local sequence id of each position; rollout_logp: [T] fp32, the engine's log-prob of
    each target (0 where there is none); num_valid: [S_row] completion tokens of each sequence (host ints).
    """

    row: PackedRow
    seq_ids: list[int]
    seq_index: torch.Tensor
    rollout_logp: torch.Tensor
    num_valid: list[int]

    def to(self, device) -> RLRow:
        return RLRow(self.row.to(device), self.seq_ids, self.seq_index.to(device), self.rollout_logp.to(device),
                     self.num_valid)  # fmt: skip


def pack_sequences(
    groups: Sequence[RolloutGroup], seq_ids: Sequence[int], budget: int, no_loss: Collection[int] = ()
) -> list[RLRow]:
    """Rows of the sequences `seq_ids` (global id = group * G + completion) of `groups`; each fits `budget`. The
    sequences in `no_loss` (masked truncated completions) are packed with no loss tokens (targets -100, num_valid 0)."""
    size = len(groups[0].completions)
    samples, rollout = [], []
    for sid in seq_ids:
        g = groups[sid // size]
        c = g.completions[sid % size]
        p, n = len(g.prompt_token_ids), len(c.token_ids)
        if p + n > budget:
            raise ValueError(f"a prompt + completion of {p} + {n} tokens exceeds loss.token_budget={budget}; raise "
                             "it to at least the longest prompt plus the completion budget")  # fmt: skip
        ids = torch.tensor(g.prompt_token_ids + c.token_ids, dtype=torch.int32)
        mask = torch.cat([torch.zeros(p, dtype=torch.bool), torch.full((n,), sid not in no_loss, dtype=torch.bool)])
        samples.append(Sample(ids, mask))
        # position t predicts token t + 1: the completion's log-probs sit at positions p - 1 .. p + n - 2
        rollout.append(torch.cat([torch.zeros(p - 1), c.logprobs.float(), torch.zeros(1)]))
    rows = []
    for row in pack_rows(samples, budget):
        local = list(row.sample_ids)
        lengths = torch.tensor([samples[i].length for i in local])
        seq_index = torch.repeat_interleave(torch.arange(len(local)), lengths)
        num_valid = [int(samples[i].loss_mask.sum()) for i in local]
        rows.append(RLRow(row, [seq_ids[i] for i in local], seq_index, torch.cat([rollout[i] for i in local]),
                          num_valid))  # fmt: skip
    return rows


def split_minibatches(num_prompts: int, minibatches: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """This process's prompts of a step as one contiguous [start, end) block per minibatch: the step's prompts are
    split into min(minibatches, num_prompts) minibatches (np.array_split sizes), then each minibatch among the
    `world` processes (groups stay whole). One process gets the minibatches themselves."""
    blocks = []
    for part in np.array_split(np.arange(num_prompts), min(minibatches, num_prompts)):
        mine = np.array_split(part, world)[rank]
        if len(mine):
            blocks.append((int(mine[0]), int(mine[-1]) + 1))
    return blocks


def contiguous(blocks: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`blocks` with adjacent ones merged ([(0, 2), (2, 4), (6, 8)] -> [(0, 4), (6, 8)]): one engine call each."""
    out: list[tuple[int, int]] = []
    for a, b in blocks:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def row_scales(
    rows: Sequence[RLRow], aggregation: str, *, real: Sequence[bool] | None = None, device=None
) -> torch.Tensor:  # fmt: skip
    """Factor [rows] fp32 of each row's `mgpo_loss` (aggregated over that row alone) so that the rows' sum is the
    loss of them all together; sequences are never split across rows, so the per-row normalisers combine exactly.

    The normaliser (tokens, sequences, or sequences x the longest) is summed (the longest: maxed) over every process
    when torch.distributed is initialised, so each process's rows add up to its share of the global loss; rows with
    `real` False (padding rows that run only for FSDP's collectives) get 0. The counts go to `device` in one copy
    (pinned and non-blocking on CUDA) and the reduction stays there: no host sync."""
    real = [True] * len(rows) if real is None else real
    if aggregation == "token-mean":
        nums = [sum(r.num_valid) * ok for r, ok in zip(rows, real)]
    elif aggregation == "seq-mean-token-mean":
        nums = [sum(n > 0 for n in r.num_valid) * ok for r, ok in zip(rows, real)]
    else:
        nums = [len(r.num_valid) * max(max(r.num_valid), 1) * ok for r, ok in zip(rows, real)]
    seqs = sum(len(r.num_valid) for r, ok in zip(rows, real) if ok)
    longest = max((max(r.num_valid) for r, ok in zip(rows, real) if ok), default=0)
    total = float(seqs) if aggregation == "seq-sum-norm" else float(sum(nums))
    host = torch.tensor([*nums, total, float(longest)], dtype=torch.float32)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
    t = host.to(device, non_blocking=True)
    total, longest = vdist.all_reduce(t[-2:-1]), vdist.all_reduce(t[-1:], "max")
    den = total.clamp_min(1) if aggregation != "seq-sum-norm" else total.clamp_min(1) * longest.clamp_min(1)
    return t[: len(rows)] / den

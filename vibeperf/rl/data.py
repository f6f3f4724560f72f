"""The RL loop's data side: phase data, the prompt mixture, scoring, the static filter, advantages and packed rows.

- `load_phase`: reads every RL JSONL file of a phase (`vibeperf.data.read_rl_jsonl`) and checks each record's domain
  and target before anything runs, so a bad line stops the run early with `file: record N: ...`.
- `fit_prompts`: the prompts whose chat-templated length plus the completion budget exceed the context, refused
  (DataError naming the file and record) or dropped and counted, before any model loads.
- `MixtureSampler`: each prompt slot of a step picks a source with probability weight / sum(weights) (a generator
  seeded by (seed, phase, step)); each source is walked through in a shuffled order, reshuffled every epoch. Its
  state (epoch and position per source) is the data position a checkpoint stores.
- `Scorer` (vibeperf.rl.scoring): `vibeperf.rewards.score` over (record, completion) pairs, here or in workers.
- `static_filter`: samples every prompt of a phase `samples` times with the starting checkpoint and keeps the prompts
  whose accuracy (share of reward-1 samples) is strictly between 0 and 1.
- `group_advantages`: A'_i = w_ME(p_c) * A_i. p_c counts the correct completions (reward 1); with Long2Short the
  advantages A come from the shifted rewards (`vibeperf.reference.long2short_shift`, already vectorised over groups
  in fp64; the rewards live on the host, so its host reads cost nothing here) while w_ME keeps the unshifted p_c.
- `pack_sequences`: prompt + completion sequences packed into rows (`vibeperf.model.pack_rows`), loss on completion
  tokens only, with the per-token tensors the MGPO loss needs (sequence ids, rollout log-probs) in the row layout.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vibeperf.data import DataError, RLRecord, read_rl_jsonl
from vibeperf.kernels.policy import group_statistics
from vibeperf.model import PackedRow, Sample, pack_rows
from vibeperf.reference import long2short_shift
from vibeperf.rewards import domain_kind
from vibeperf.rl.config import PhaseConfig
from vibeperf.rl.scoring import Scorer
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
        name = sc.name or Path(sc.files[0]).stem
        if name in names:
            raise DataError(f"phase {cfg.name!r}: two sources named {name!r}; give them distinct `name`s")
        names.add(name)
        records, origins = [], []
        for path in sc.files:
            for j, rec in enumerate(read_rl_jsonl(path)):
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

    def draw(self, step: int, n: int) -> list[tuple[int, int]]:
        """(source index, record index) of the `n` prompts of global step `step`."""
        rng = random.Random(f"vibeperf-rl-mix:{self.seed}:{self.phase}:{step}")
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
) -> FilterResult:  # fmt: skip
    """Sample every prompt of `data` `samples` times; keep the prompts with accuracy strictly inside (0, 1).

    With `world` > 1 (under torchrun, a collective) process `rank` samples a contiguous block of the prompts and the
    accuracies are gathered; prompt i samples with seed + i wherever it runs, so the result does not depend on
    `world`."""
    items = [(s, i) for s in data.sources for i in range(len(s.records))]
    lo, hi = len(items) * rank // world, len(items) * (rank + 1) // world
    acc: list[float] = []
    for b0 in range(lo, hi, batch_prompts):
        batch = items[b0 : min(b0 + batch_prompts, hi)]
        seed = None if sampling.seed is None else sampling.seed + b0
        groups = engine.generate([engine.chat_prompt(s.records[i].prompt) for s, i in batch], n=samples,
                                 sampling=SamplingConfig(sampling.temperature, sampling.top_p, sampling.max_tokens,
                                                         seed))  # fmt: skip
        rewards = scorer([(s.records[i], c.text) for (s, i), g in zip(batch, groups) for c in g.completions])
        acc += [sum(r == 1.0 for r in rewards[k * samples : (k + 1) * samples]) / samples for k in range(len(batch))]
    if world > 1:
        from vibeperf.distributed import gather_lists

        acc = gather_lists({"acc": acc})["acc"]
    kept: dict[str, list[int]] = {s.name: [] for s in data.sources}
    accuracy: dict[str, list[float]] = {s.name: [] for s in data.sources}
    for (s, i), a in zip(items, acc):
        accuracy[s.name].append(a)
        if 0.0 < a < 1.0:
            kept[s.name].append(i)
    stats = {"prompts": len(items), "kept": sum(map(len, kept.values())), "all_wrong": sum(a == 0.0 for a in acc),
             "all_right": sum(a == 1.0 for a in acc)}  # fmt: skip
    return FilterResult(kept, accuracy, stats)


def group_advantages(
    rewards: torch.Tensor, lengths: torch.Tensor, group_index: torch.Tensor, *, num_groups: int, mgpo_lambda: float,
    scale: str, long2short_lambda: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(A' [S], w_ME [num_groups], the rewards the advantages use [S]) for a step's completions.

    rewards: [S] in [0, 1] (1 = correct); lengths: [S] completion tokens; group_index: [S]. Without Long2Short
    (`long2short_lambda` None) this is `group_statistics(rewards)`; with it, A comes from the shifted rewards and
    w_ME from the unshifted correctness (see the module docstring).
    """
    r = rewards.to(torch.float64)
    if long2short_lambda is None:
        adv, weights = group_statistics(r, group_index, num_groups=num_groups, mgpo_lambda=mgpo_lambda, scale=scale)
        return adv, weights, r
    shifted = long2short_shift(r, lengths, group_index, lam=long2short_lambda)
    adv, _ = group_statistics(shifted, group_index, num_groups=num_groups, mgpo_lambda=0.0, scale=scale)
    _, weights = group_statistics(r, group_index, num_groups=num_groups, mgpo_lambda=mgpo_lambda, scale=scale)
    return weights[group_index] * adv, weights, shifted


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


def pack_sequences(groups: Sequence[RolloutGroup], seq_ids: Sequence[int], budget: int) -> list[RLRow]:
    """Rows of the sequences `seq_ids` (global id = group * G + completion) of `groups`; each fits `budget`."""
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
        mask = torch.cat([torch.zeros(p, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
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


def row_scales(rows: Sequence[RLRow], aggregation: str) -> list[float]:
    """Factor of each row's `mgpo_loss` (aggregated over that row alone) so that the rows' sum is the loss of them
    all together; sequences are never split across rows, so the per-row normalisers combine exactly."""
    if aggregation == "token-mean":
        total = sum(sum(r.num_valid) for r in rows)
        return [sum(r.num_valid) / max(total, 1) for r in rows]
    if aggregation == "seq-mean-token-mean":
        total = sum(sum(n > 0 for n in r.num_valid) for r in rows)
        return [sum(n > 0 for n in r.num_valid) / max(total, 1) for r in rows]
    longest = max((max(r.num_valid) for r in rows), default=0)
    total = sum(len(r.num_valid) for r in rows) * max(longest, 1)
    return [len(r.num_valid) * max(max(r.num_valid), 1) / total for r in rows]

"""The SFT curriculum's data: read, validate, tokenise and filter the samples of each stage.

`prepare_stages(cfg, tokenizer)` first reads and validates every file of every stage (SFT JSONL through
`vibeperf.data.read_sft_jsonl`, verdict files here), so a malformed line fails with `file:line: field ...` before any
tokenising or training. Then, per stage, in file order:
1. tokenise with the chat template (`vibeperf.model.tokenize_records`; loss on assistant tokens only);
2. drop samples shorter than `min_tokens` (the long-sample stage);
3. the difficulty filter, when configured: keep a problem when the reference model's error rate over
   `num_samples` samples, 1 - mean(verdicts), is at least `min_error_rate`. The rollout engine does not exist yet,
   so the verdicts are read from a precomputed JSONL (`{"id" | "prompt": ..., "verdicts": [0/1, ...]}`; matched by
   the record's "id" when both have one, else by the first user message) and a log line says so. Problems without
   verdicts are dropped and counted;
4. truncate samples longer than `token_budget` (counted, one warning per stage) and drop samples left without any
   loss token (counted).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from vibeperf.data import DataError, SFTRecord
from vibeperf.data.jsonl import read_rows
from vibeperf.data.sources import read_sft_rows
from vibeperf.model import Sample, tokenize_records, truncate
from vibeperf.sft.config import SFTConfig, StageConfig

log = logging.getLogger("vibeperf.sft")


@dataclass
class StageData:
    """The samples of one stage, ready to pack, and what the filters did (counts by reason)."""

    name: str
    samples: list[Sample]
    token_budget: int
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class _Verdicts:
    path: str
    by_id: dict[str, tuple[int, ...]]
    by_prompt: dict[str, tuple[int, ...]]


def _read_stage_files(stage: StageConfig) -> tuple[list[SFTRecord], list[str], list[str | None]]:
    """Records of all files of `stage`, with their `file:line` and raw "id" (None when absent)."""
    records, sources, ids = [], [], []
    for source in stage.data:
        for where, record, record_id in read_sft_rows(source):
            records.append(record)
            sources.append(where)
            ids.append(record_id if stage.difficulty is not None else None)
    return records, sources, ids


def read_verdicts(path: str, num_samples: int) -> _Verdicts:
    """Parse a verdict JSONL; DataError naming file:line and the field on a malformed line or duplicate key."""
    by_id: dict[str, tuple[int, ...]] = {}
    by_prompt: dict[str, tuple[int, ...]] = {}
    if not os.path.exists(path):
        raise DataError(f"{path}: verdict file not found")
    for where, obj in read_rows(path):
        key_id, prompt = obj.get("id"), obj.get("prompt")
        if key_id is None and prompt is None:
            raise DataError(f"{where}: field 'id': missing: give 'id' or 'prompt'")
        if key_id is not None and (isinstance(key_id, bool) or not isinstance(key_id, (str, int))):
            raise DataError(f"{where}: field 'id': expected a string or an integer")
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt': expected a string")
        verdicts = obj.get("verdicts")
        if not isinstance(verdicts, list) or any(v not in (0, 1) or isinstance(v, float) for v in verdicts):
            raise DataError(f"{where}: field 'verdicts': expected a list of 0/1 (or false/true) values")
        if len(verdicts) != num_samples:
            raise DataError(f"{where}: field 'verdicts': expected {num_samples} verdicts (difficulty.num_samples), "
                            f"got {len(verdicts)}")
        value = tuple(int(v) for v in verdicts)
        for table, key, name in ((by_id, key_id, "id"), (by_prompt, prompt, "prompt")):
            if key is None:
                continue
            if str(key) in table:
                raise DataError(f"{where}: field '{name}': duplicate {name} {str(key)[:60]!r}")
            table[str(key)] = value
    return _Verdicts(path, by_id, by_prompt)


def _first_user(record: SFTRecord) -> str | None:
    return next((m.content for m in record.messages if m.role == "user"), None)


def _difficulty_keep(stage: StageConfig, records, ids, verdicts: _Verdicts, stats: dict) -> list[bool]:
    diff = stage.difficulty
    keep = []
    for rec, rid in zip(records, ids):
        v = verdicts.by_id.get(rid) if rid is not None else None
        if v is None:
            v = verdicts.by_prompt.get(_first_user(rec) or "")
        if v is None:
            stats["no_verdicts"] += 1
            keep.append(False)
            continue
        error_rate = 1.0 - sum(v) / len(v)
        keep.append(error_rate >= diff.min_error_rate)
        stats["too_easy"] += not keep[-1]
    log.info(
        "stage %s: difficulty filter reads precomputed verdicts from %s (the rollout engine does not exist yet, so no "
        "reference model is sampled here): kept %d of %d problems with error rate >= %g over %d samples; %d had no "
        "verdicts and were dropped",
        stage.name, verdicts.path, sum(keep), len(keep), diff.min_error_rate, diff.num_samples, stats["no_verdicts"],
    )  # fmt: skip
    return keep


def prepare_stage(stage: StageConfig, tokenizer, records, sources, ids, verdicts: _Verdicts | None) -> StageData:
    """Tokenise and filter one stage's (already validated) records; see the module docstring for the steps."""
    stats = dict.fromkeys(("records", "too_short", "too_easy", "no_verdicts", "truncated", "no_loss_tokens"), 0)
    stats["records"] = len(records)
    samples = tokenize_records(records, tokenizer, sources)
    keep = [s.length >= stage.min_tokens for s in samples]
    stats["too_short"] = keep.count(False)
    if stage.min_tokens:
        log.info("stage %s: %d of %d samples have >= %d tokens", stage.name, keep.count(True), len(keep),
                 stage.min_tokens)  # fmt: skip
    if verdicts is not None:
        idx = [i for i, k in enumerate(keep) if k]
        sub = _difficulty_keep(stage, [records[i] for i in idx], [ids[i] for i in idx], verdicts, stats)
        for i, k in zip(idx, sub):
            keep[i] = k
    samples = [s for s, k in zip(samples, keep) if k]
    samples, stats["truncated"] = truncate(samples, stage.token_budget)
    if stats["truncated"]:
        first = next(s.source for s in samples if s.length == stage.token_budget)
        log.warning("stage %s: %d of %d samples are longer than token_budget=%d and were truncated to it (first: %s)",
                    stage.name, stats["truncated"], len(samples), stage.token_budget, first)  # fmt: skip
    empty = [s for s in samples if s.num_loss_tokens == 0]
    if empty:
        stats["no_loss_tokens"] = len(empty)
        log.warning("stage %s: %d samples have no assistant token to train on (after truncation) and were dropped "
                    "(first: %s)", stage.name, len(empty), empty[0].source)  # fmt: skip
        samples = [s for s in samples if s.num_loss_tokens > 0]
    if not samples:
        raise DataError(f"stage {stage.name}: no samples left after filtering ({stats})")
    return StageData(stage.name, samples, stage.token_budget, stats)


def prepare_stages(cfg: SFTConfig, tokenizer, stages: Sequence[int] | None = None) -> list[StageData]:
    """Read and validate every stage's files, then tokenise and filter each stage (those listed in `stages`)."""
    wanted = range(len(cfg.stages)) if stages is None else stages
    read = {}
    for i in wanted:
        st = cfg.stages[i]
        verdicts = None if st.difficulty is None else read_verdicts(st.difficulty.verdicts, st.difficulty.num_samples)
        read[i] = (*_read_stage_files(st), verdicts)
    return [prepare_stage(cfg.stages[i], tokenizer, *read[i]) for i in wanted]

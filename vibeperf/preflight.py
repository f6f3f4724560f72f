"""Checks a run makes before it loads a model or writes a file, each failing with a one-line `ConfigError`.

- `check_model_dir(path, key)`: a local Hugging Face checkpoint directory that can load: config.json that
  transformers reads (a missing `model_type` or a field of the wrong type is named), weights (`*.safetensors` or
  `*.bin`), and tokenizer files. Without this an empty directory fails deep inside transformers with advice to
  install sentencepiece.
- `check_device(name, key)`: a device string whose hardware exists here (`cuda` without CUDA is refused up front).
"""

from __future__ import annotations

import os
from pathlib import Path

from vibeperf.config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def check_model_dir(path: str | os.PathLike, key: str = "model.path") -> Path:
    """`path` as a Path once it holds a loadable checkpoint (see the module docstring); ConfigError naming `key`."""
    where = f"{key}={os.fspath(path)!r}"
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{where}: not a directory (a local Hugging Face checkpoint is needed)")
    if not (p / "config.json").is_file():
        found = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
        raise ConfigError(f"{where}: no config.json in the directory (found {found}); is it a complete checkpoint?")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(p)
    except Exception as e:  # transformers and huggingface_hub raise several unrelated types for a bad config
        problem = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{where}: config.json cannot be read: {problem}") from None
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ConfigError(f"{where}: no weights (*.safetensors or *.bin) in the directory")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{where}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}) in the directory")
    return p


def check_device(name: str, key: str = "train.device") -> None:
    """ConfigError naming `key` when `name` asks for CUDA (or a CUDA index) this machine does not have."""
    import torch

    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r}: CUDA is not available on this machine (use auto or cpu)")
    index = name.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")

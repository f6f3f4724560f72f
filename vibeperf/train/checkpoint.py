"""One `Checkpointer` for every trainer: atomic save, list, resume, keep-last, Hugging Face export, DCP shards.

A checkpoint is `output_dir/checkpoints/step_N/`:
- the model and tokenizer in Hugging Face format (safetensors), loadable by transformers and by the rollout engines;
- `trainer_state.pt`: optimizer, scheduler and RNG state (one process); under torchrun the optimizer and model shards
  are a DCP directory `dcp/` instead (`vibeperf.distributed.save_sharded`), loadable by any number of processes;
- `trainer_state.json`: the step, the data position and what the trainer needs to check an exact resume, written
  last, so a directory without it is not a checkpoint.
It is built in a temporary sibling and renamed into place (`vibeperf.files.atomic_dir`); the newest `keep_last` are
kept. `checkpoint.resume` = "latest" picks the newest under output_dir (a fresh start when there is none), a path
picks that one. `load` restores optimizer, scheduler and RNG, after checking the fields the trainer says must match.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from vibeperf import distributed as vdist
from vibeperf.config import CheckpointConfig, ConfigError
from vibeperf.errors import RunError
from vibeperf.files import atomic_dir, remove_stale_tmp

log = logging.getLogger("vibeperf.train")

STATE_JSON, STATE_PT = "trainer_state.json", "trainer_state.pt"


def rng_state() -> dict:
    """Python, numpy, torch and CUDA generator states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir: Path | str) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if (p / STATE_JSON).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


class Checkpointer:
    """Checkpoints of one run under `out_dir` (see the module docstring); `sharded` under torchrun (FSDP2)."""

    def __init__(self, out_dir: Path | str, cfg: CheckpointConfig, *, sharded: bool = False):
        self.out_dir, self.cfg, self.sharded = Path(out_dir), cfg, sharded
        if vdist.rank() == 0:
            self._remove_stale()

    def _remove_stale(self) -> None:
        """Temporary checkpoint directories and files that runs killed while saving left in this run's output
        directory (`vibeperf.files.remove_stale_tmp`; a sharded save's fixed-name directory too)."""
        root = self.out_dir / "checkpoints"
        sharded = tuple(p.name for p in root.glob(".step_*.tmp-sharded")) if root.is_dir() else ()
        removed = remove_stale_tmp(root, also=sharded) + remove_stale_tmp(self.out_dir)
        if removed:
            log.warning("removed %d temporary file(s) of earlier runs that were stopped while saving: %s",
                        len(removed), ", ".join(p.name for p in removed[:4]) + (", ..." if len(removed) > 4 else ""))
    def list(self) -> list[Path]:
        return list_checkpoints(self.out_dir)

    def resume_dir(self) -> Path | None:
        """The checkpoint `checkpoint.resume` names, or None for a fresh start."""
        if not self.cfg.resume:
            return None
        if self.cfg.resume == "latest":
            found = self.list()
            return found[-1] if found else None
        path = Path(self.cfg.resume)
        if not (path / STATE_JSON).is_file():
            raise ConfigError(f"checkpoint.resume={self.cfg.resume!r}: not a complete checkpoint (no {STATE_JSON})")
        return path

    def save(self, model, tokenizer, optimizer, scheduler, state: dict) -> Path:
        """Write checkpoints/step_{state['step']} (a collective under torchrun; files from rank 0).

        A write that fails (a full disk, a quota) leaves no partial directory and raises a RunError naming the step,
        the cause and the checkpoint that stays the latest."""
        final = self.out_dir / "checkpoints" / f"step_{state['step']:08d}"
        try:
            self._save(final, model, tokenizer, optimizer, scheduler, state)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            latest = self.list()
            cause = f"{e.strerror}: {e.filename or final}" if isinstance(e, OSError) and e.strerror else str(e)
            raise RunError(f"step {state['step']}: the checkpoint could not be written ({type(e).__name__}: "
                           f"{' '.join(cause.split())[:300]}); the latest checkpoint is still "
                           f"{latest[-1] if latest else 'none'}") from e  # fmt: skip
        return final

    def _save(self, final: Path, model, tokenizer, optimizer, scheduler, state: dict) -> None:
        if self.sharded:
            self._save_sharded(final, model, tokenizer, optimizer, scheduler, state)
        else:
            with atomic_dir(final) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
                torch.save(blob, tmp / STATE_PT)
                (tmp / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
            self._prune()

    def _save_sharded(self, final: Path, model, tokenizer, optimizer, scheduler, state: dict) -> None:
        # every rank writes its DCP shards into the same temporary directory, so its name is fixed
        tmp = final.with_name(f".{final.name}.tmp-sharded")
        if vdist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        torch.distributed.barrier()
        vdist.save_sharded(tmp / "dcp", model, optimizer)
        vdist.export_full(model, tmp, tokenizer)
        if vdist.rank() == 0:
            with atomic_dir(final, tmp=tmp):
                torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / STATE_PT)
                (tmp / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
            self._prune()
        torch.distributed.barrier()

    def _prune(self) -> None:
        if self.cfg.keep_last:
            for old in self.list()[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model, optimizer, scheduler, must_match: dict | None = None) -> dict:
        """Restore optimizer (or DCP model + optimizer shards), scheduler and RNG from `path`; returns its state JSON.

        must_match: {state key: (value now, what it stands for)}; a stored value that differs is a ConfigError
        naming checkpoint.resume and it, since an exact resume would be impossible (checked before anything loads)."""
        state = json.loads((path / STATE_JSON).read_text())
        for key, (now, what) in (must_match or {}).items():
            if state[key] != now:
                raise ConfigError(f"checkpoint.resume: {path}: {what} changed since this checkpoint (checkpoint "
                                  f"{state[key]}, now {now}); an exact resume is impossible")  # fmt: skip
        blob = torch.load(path / STATE_PT, weights_only=False)
        if "optimizer" in blob and not self.sharded:
            optimizer.load_state_dict(blob["optimizer"])
        elif (path / "dcp").is_dir():
            vdist.load_sharded(path / "dcp", model, optimizer)
        else:
            raise ConfigError(f"checkpoint.resume: {path}: a single-process checkpoint has no sharded optimizer state "
                              "(dcp/); resume it in one process")  # fmt: skip
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        return state

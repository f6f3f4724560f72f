"""`vibeperf spectrum`: probe saved checkpoints per subdomain, keep the best one of each subdomain by pass@k, and
merge the kept ones into a new checkpoint by a weighted parameter average.

What a run does:
1. Lists the checkpoints (`find_checkpoints`: directories with a config.json and safetensors, or directories of them
   in natural name order) and reads the probing sets; problems are grouped by subdomain (their domain when they
   have none).
2. Probes every checkpoint on every problem with `num_samples` samples, the same seeds for every checkpoint. One
   rollout engine serves all checkpoints: their weights are swapped in place (`CheckpointEngines`).
3. Per subdomain, keeps the checkpoint with the best mean pass@k (k from the config); ties go to the better pass@1,
   then to the later checkpoint in the list (the longer-trained one).
4. Merges the kept checkpoints, one per subdomain (a checkpoint kept for two subdomains counts twice), with the
   configured weights normalised to sum 1 (1/N by default): theta = sum_i w_i theta_i, accumulated in fp32 (fp64 for
   fp64 tensors) and stored in the first kept checkpoint's dtype (or `merge_dtype`). The merged checkpoint keeps the
   first kept checkpoint's safetensors layout, config and tokenizer, and is written atomically.
5. Writes probe.jsonl (one line per checkpoint and subdomain), selection.json, merged/ and prints the probe table
   (the kept checkpoint of each subdomain marked with *).

    python -m vibeperf spectrum recipe.toml checkpoints=[runs/rl/checkpoints] data=[data/probe.jsonl] k=8
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vibeperf.data import read_rl, write_jsonl
from vibeperf.data.sources import describe
from vibeperf.eval.config import SpectrumConfig
from vibeperf.eval.passk import pass_at_k_curves
from vibeperf.eval.sampling import CheckpointEngines, sample_and_grade, subdomain_of
from vibeperf.files import atomic_dir
from vibeperf.rewards import Scorer
from vibeperf.rollout import RolloutEngine

log = logging.getLogger("vibeperf.spectrum")
MERGED = "merged"
_SKIP_FILES = re.compile(r"(trainer_state\..*|.*\.pt|.*\.bin|optimizer.*|scheduler.*|rng_state.*|\..*)")


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def find_checkpoints(entries: Sequence[str | os.PathLike]) -> list[Path]:
    """Checkpoint directories: each entry is one, or a directory whose checkpoint subdirectories are taken in natural
    name order (hidden and incomplete ones skipped); FileNotFoundError when an entry yields none."""
    found: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if is_checkpoint(path):
            found.append(path)
            continue
        subs = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p)),
                      key=_natural_key) if path.is_dir() else []  # fmt: skip
        if not subs:
            raise FileNotFoundError(f"{entry}: not a checkpoint (config.json + safetensors) nor a directory of them")
        found.extend(subs)
    return found


def _headers(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors file name, shape) from the headers of a checkpoint's safetensors files."""
    from safetensors import safe_open

    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = (path.name, tuple(f.get_slice(name).get_shape()))
    return out


def merge_checkpoints(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    weights: Sequence[float] | None = None,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Weighted parameter average of Hugging Face checkpoints, written to `out_dir` atomically.

    `weights` (default 1/N each; normalised to sum 1; a path listed twice counts twice) must be >= 0 with a positive
    sum. Every checkpoint must hold the same tensor names and shapes (ValueError naming the first difference).
    Floating tensors: sum_i w_i t_i accumulated in fp32 (fp64 for fp64 tensors), stored in `dtype` or the first
    checkpoint's dtype; other tensors (integer buffers) must be equal everywhere and are copied. The output has the
    first checkpoint's safetensors files (one at a time in memory), its index, config and tokenizer files (trainer and
    optimizer state left out), and merge.json naming the sources and weights.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("merge_checkpoints needs at least one checkpoint")
    weights = [1.0 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} checkpoints")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"merge weights must be finite, >= 0 and sum to more than 0, got {weights}")
    unique: dict[Path, float] = {}
    for p, w in zip(paths, weights):
        unique[p] = unique.get(p, 0.0) + w / sum(weights)
    sources = list(unique)
    heads = [_headers(p) for p in sources]
    if not heads[0]:
        raise FileNotFoundError(f"{sources[0]}: no *.safetensors files")
    for p, h in zip(sources[1:], heads[1:]):
        if h.keys() != heads[0].keys():
            diff = sorted(h.keys() ^ heads[0].keys())
            raise ValueError(f"{p} and {sources[0]} hold different tensors (e.g. {diff[:3]})")
        bad = next((n for n in h if h[n][1] != heads[0][n][1]), None)
        if bad is not None:
            raise ValueError(f"{bad}: shape {h[bad][1]} in {p} but {heads[0][bad][1]} in {sources[0]}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        handles = {}
        for p, h in zip(sources, heads):
            for fname in {v[0] for v in h.values()}:
                handles[p, fname] = safe_open(str(p / fname), framework="pt")
        files: dict[str, list[str]] = {}
        for name, (fname, _) in heads[0].items():
            files.setdefault(fname, []).append(name)
        for fname, names in files.items():
            shard = {}
            for name in names:
                tensors = [handles[p, h[name][0]].get_tensor(name) for p, h in zip(sources, heads)]
                first = tensors[0]
                if first.is_floating_point():
                    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
                    acc = torch.zeros(first.shape, dtype=acc_dtype)
                    for p, t in zip(sources, tensors):
                        acc.add_(t.to(acc_dtype), alpha=unique[p])
                    shard[name] = acc.to(dtype or first.dtype).contiguous()
                else:
                    if any(not torch.equal(t, first) for t in tensors[1:]):
                        raise ValueError(f"{name}: a non-floating tensor that differs between checkpoints")
                    shard[name] = first.contiguous()
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            del shard
        for item in sources[0].iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and not _SKIP_FILES.fullmatch(item.name):
                shutil.copy2(item, tmp / item.name)
        if dtype is not None:
            config = json.loads((tmp / "config.json").read_text())
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "merge.json").write_text(json.dumps({"sources": [os.fspath(p) for p in paths],
                                                    "weights": [w / sum(weights) for w in weights]}, indent=1))
    return out_dir


@dataclass
class Probe:
    """pass@k of one checkpoint on one subdomain."""

    checkpoint: str
    subdomain: str
    problems: int
    pass_at_k: float
    pass_at_1: float


def probe_scores(checkpoint: str, results, k: int) -> list[Probe]:
    """Mean pass@k and pass@1 of a checkpoint's graded probing results, per subdomain (in order of appearance)."""
    by_sub: dict[str, list] = {}
    for g in results:
        by_sub.setdefault(subdomain_of(g.record), []).append(g)
    out = []
    for sub, group in by_sub.items():
        n = np.array([len(g.rewards) for g in group])
        c = np.array([g.num_correct for g in group])
        out.append(Probe(checkpoint, sub, len(group), float(pass_at_k_curves(n, c, k)[:, k - 1].mean()),
                         float((c / n).mean())))  # fmt: skip
    return out


def select_checkpoints(probes: Sequence[Probe], checkpoints: Sequence[str], subdomains: Sequence[str]) -> dict:
    """subdomain -> the kept checkpoint: best pass@k, then best pass@1, then the later one in `checkpoints`."""
    rank = {c: i for i, c in enumerate(checkpoints)}
    chosen = {}
    for sub in subdomains:
        cands = [p for p in probes if p.subdomain == sub]
        if not cands:
            raise ValueError(f"subdomain {sub!r} has no probing problems")
        chosen[sub] = max(cands, key=lambda p: (p.pass_at_k, p.pass_at_1, rank[p.checkpoint])).checkpoint
    return chosen


def format_probe_table(probes: Sequence[Probe], chosen: dict, k: int) -> str:
    subs = list(chosen)
    ckpts = list(dict.fromkeys(p.checkpoint for p in probes))
    names = {c: (c if len(c) <= 40 else "..." + c[-37:]) for c in ckpts}
    width = max(12, *(len(n) + 2 for n in names.values()))
    cols = [max(12, len(s) + 2) for s in subs]
    lines = [f"{f'pass@{k}':<{width}}" + "".join(f"{s:>{w}}" for s, w in zip(subs, cols))]
    table = {(p.checkpoint, p.subdomain): p for p in probes}
    for c in ckpts:
        cells = []
        for s, w in zip(subs, cols):
            p = table.get((c, s))
            mark = "*" if chosen[s] == c else " "
            cells.append(f"{f'{100 * p.pass_at_k:.1f}%{mark}' if p else '-':>{w}}")
        lines.append(f"{names[c]:<{width}}" + "".join(cells))
    return "\n".join(lines)


@dataclass
class SpectrumResult:
    probes: list[Probe]
    chosen: dict
    weights: list[float]
    merged: Path
    seconds: float


def run_spectrum(
    cfg: SpectrumConfig, *, make: Callable[[str], RolloutEngine] | None = None, progress: bool = True
) -> SpectrumResult:
    """Probe, select and merge as the module docstring says; `make(model_dir)` overrides how engines are built."""
    t0 = time.perf_counter()
    checkpoints = [os.fspath(p) for p in find_checkpoints(cfg.checkpoints)]
    records = [r for source in cfg.data for r in read_rl(source)]
    if cfg.max_problems:
        records = records[: cfg.max_problems]
    present = sorted({subdomain_of(r) for r in records})
    subdomains = list(cfg.subdomains) or present
    missing = [s for s in subdomains if s not in present]
    if missing:
        files = [describe(d) for d in cfg.data]
        raise ValueError(f"subdomains {missing} have no problems in {files} (found {present})")
    records = [r for r in records if subdomain_of(r) in subdomains]
    log.info("spectrum: %d checkpoints, %d problems in subdomains %s", len(checkpoints), len(records), subdomains)
    engines = CheckpointEngines(cfg.engine, make)
    scorer = Scorer(cfg.reward)
    probes: list[Probe] = []
    try:
        for ckpt in checkpoints:
            engine = engines.load(ckpt)
            results = sample_and_grade(
                engine, records, n_for=lambda r: cfg.num_samples, sampling=cfg.sampling,
                scorer=scorer, system_prompt=cfg.system_prompt, batch_prompts=cfg.engine.batch_prompts,
                desc=f"probe {Path(ckpt).name}", progress=progress,
            )  # fmt: skip
            probes += probe_scores(ckpt, results, cfg.k)
    finally:
        scorer.close()
        engines.close()
    chosen = select_checkpoints(probes, checkpoints, subdomains)
    weights = list(cfg.weights) or [1.0] * len(subdomains)
    weights = [w / sum(weights) for w in weights]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "probe.jsonl", [vars(p) | {"k": cfg.k} for p in probes])
    dtype = None if cfg.merge_dtype == "auto" else getattr(torch, cfg.merge_dtype)
    merged = merge_checkpoints([chosen[s] for s in subdomains], out / MERGED, weights, dtype=dtype, overwrite=True)
    seconds = time.perf_counter() - t0
    kept = [{"subdomain": s, "checkpoint": chosen[s], "weight": w} for s, w in zip(subdomains, weights)]
    selection = {"k": cfg.k, "num_samples": cfg.num_samples, "checkpoints": checkpoints, "chosen": kept,
                 "merged": os.fspath(merged), "seconds": round(seconds, 2)}  # fmt: skip
    (out / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
    return SpectrumResult(probes, chosen, weights, merged, seconds)


def run_cli(args) -> int:
    """`vibeperf spectrum RECIPE [key=value ...]`."""
    from vibeperf.config import run_recipe_command

    def run(cfg: SpectrumConfig) -> int:
        result = run_spectrum(cfg)
        print(format_probe_table(result.probes, result.chosen, cfg.k))
        print(f"\nspectrum: merged {len(result.chosen)} subdomain checkpoints into {result.merged} "
              f"({result.seconds:.1f} s)")  # fmt: skip
        return 0

    return run_recipe_command(SpectrumConfig, args, run, "spectrum")

"""The metrics every trainer writes: one JSON line per logged step (metrics.jsonl) and curves drawn from it.

`MetricsWriter(out_dir, enabled)` starts metrics.jsonl afresh, or on a resume keeps the lines up to the resumed step
(a resumed run rewrites the rest); `write(record)` appends a line; `plot(name, panels, segment_key)` draws panels of
curves against the step into out_dir/name (atomically), with a dashed line where `segment_key` (the SFT stage, the RL
phase) changes. Only the process with `enabled` (rank 0) touches files.

Where users look: each record's numeric fields also go, under the same names and at the same step, to TensorBoard
event files beside metrics.jsonl and to Weights & Biases, each by its switch (`logging.tensorboard`,
`logging.wandb`: true, false, or "auto" = when the package is installed, and for W&B configured by WANDB_API_KEY
or WANDB_MODE, so it never prompts). Neither is imported when its switch is off or the package is absent, so
nothing changes without them; a switch set to true without its package is a one-line ConfigError.

Crash safety: each line goes out in one `write` of the whole line with its newline, flushed. A process killed during
that write leaves a last line without its newline (or not JSON): on a resume (and in `rows()`) such a torn last line
is dropped with a warning that names it; a malformed line anywhere else is a DataError naming `file:line`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from vibeperf.config import ConfigError
from vibeperf.data import DataError
from vibeperf.files import save_figure, write_text

log = logging.getLogger("vibeperf.train")

# A panel: (y-axis label, [(metrics key, legend label), ...]).
Panel = tuple[str, Sequence[tuple[str, str]]]


def sink_enabled(switch: bool | str, module: str, key: str, configured: bool = True) -> bool:
    """Whether a metrics sink is on: `switch` true/false, or "auto" = `module` installed (and `configured`)."""
    installed = importlib.util.find_spec(module) is not None
    if switch is True and not installed:
        raise ConfigError(f"{key}: true, but {module} is not installed (pip install {module}, or set it to auto)")
    return installed and configured if switch == "auto" else bool(switch)


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record (bools and strings left out; one level of nesting as `a/b`)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in scalars(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[key] = float(value)
    return out


class MetricsWriter:
    """metrics.jsonl of a run and its plots, and the same scalars to TensorBoard / W&B (see the module docstring)."""

    def __init__(self, out_dir: Path | str, *, enabled: bool = True, resume_step: int = 0,
                 tensorboard: bool | str = False, wandb: bool | str = False, wandb_project: str = "vibeperf",
                 run_config: dict | None = None):  # fmt: skip
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():
            keep = [line for line, row in self._read(warn=True) if row["step"] <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in keep))
        elif not resume_step:
            self.path.write_text("")
        if sink_enabled(tensorboard, "tensorboard", "logging.tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run's events after the resumed step replace the first run's in the viewer
            self.tensorboard = SummaryWriter(log_dir=str(self.out_dir), purge_step=resume_step + 1 if resume_step
                                             else None)  # fmt: skip
        configured = bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))
        if sink_enabled(wandb, "wandb", "logging.wandb", configured):
            import wandb as wandb_module

            self.wandb = wandb_module.init(project=wandb_project, name=self.out_dir.name, dir=str(self.out_dir),
                                           config=run_config, resume="allow")  # fmt: skip

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        values = scalars(record) if self.tensorboard or self.wandb else {}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, global_step=record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=record["step"])

    def close(self) -> None:
        """Flush and close the TensorBoard and W&B sinks (metrics.jsonl needs nothing)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def _read(self, *, warn: bool = False) -> list[tuple[str, dict]]:
        """(line, record) of metrics.jsonl; a torn last line dropped (with a warning if `warn`), see the docstring."""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        final = max((i for i, x in enumerate(lines) if x.strip()), default=-1)
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            last = i == final
            try:
                row = json.loads(line) if i < len(lines) - 1 else None  # no newline after it: torn
            except json.JSONDecodeError:
                row = None
            if row is None or not isinstance(row, dict) or "step" not in row:
                if last:
                    if warn:
                        log.warning("%s:%d: torn last line (the run was stopped while writing it) dropped: %r",
                                    self.path, i + 1, line[:80])  # fmt: skip
                    break
                raise DataError(f"{self.path}:{i + 1}: not a metrics record: {line[:80]!r}")
            rows.append((line, row))
        return rows

    def rows(self) -> list[dict]:
        return [row for _, row in self._read()] if self.path.is_file() else []

    def plot(self, name: str, panels: Sequence[Panel], *, segment_key: str, xlabel: str = "step",
             height_ratios: Sequence[float] | None = None, size: tuple[float, float] = (8, 5)) -> None:  # fmt: skip
        """Panels of curves against the step into out_dir/name (matplotlib's Agg canvas; no display needed)."""
        rows = self.rows() if self.enabled else []
        if not rows:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=size)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False, height_ratios=height_ratios)[:, 0]
        steps = [r["step"] for r in rows]
        for ax, (ylabel, curves) in zip(axes, panels):
            for key, label in curves:
                ax.plot(steps, [r[key] for r in rows], lw=1.2, label=label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(curves) > 1:
                ax.legend()
        for prev, cur in zip(rows, rows[1:]):
            if cur[segment_key] != prev[segment_key]:
                axes[0].axvline(cur["step"], color="gray", ls="--", lw=0.8)
                axes[0].text(cur["step"], axes[0].get_ylim()[1], f" {cur[segment_key]}", va="top", fontsize=8)
        axes[-1].set_xlabel(xlabel)
        fig.tight_layout()
        save_figure(fig, self.out_dir / name)

"""The metrics every trainer writes: one JSON line per logged step (metrics.jsonl) and curves drawn from it.

`MetricsWriter(out_dir, enabled)` starts metrics.jsonl afresh, or on a resume keeps the lines up to the resumed step
(a resumed run rewrites the rest); `write(record)` appends a line; `plot(name, panels, segment_key)` draws panels of
curves against the step into out_dir/name (atomically), with a dashed line where `segment_key` (the SFT stage, the RL
phase) changes. Only the process with `enabled` (rank 0) touches files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vibeperf.files import save_figure, write_text

# A panel: (y-axis label, [(metrics key, legend label), ...]).
Panel = tuple[str, Sequence[tuple[str, str]]]


class MetricsWriter:
    """metrics.jsonl of a run and its plots (see the module docstring)."""

    def __init__(self, out_dir: Path | str, *, enabled: bool = True, resume_step: int = 0):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():
            keep = [x for x in self.path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in keep))
        elif not resume_step:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

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

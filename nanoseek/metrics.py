"""Run logging shared by the stages: one JSONL line per step, a rich progress bar with ETA, PNG plots from the JSONL
(the report reads the same files)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import atomic_write_jsonl, read_jsonl


def truncate_jsonl(path: str | Path, step: int) -> None:
    """After resuming from `step`, drop records logged past it so a curve has no duplicated steps (a torn last
    line, from the kill that stopped the run, goes too)."""
    p = Path(path)
    if not p.exists():
        return
    atomic_write_jsonl(p, [r for r in read_jsonl(p) if r.get("step", 0) <= step])


def progress_bar(enabled: bool = True):
    """A rich Progress with elapsed time and ETA, or None when disabled (non-rank-0, tests)."""
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn())


def plot_panels(records: list[dict[str, Any]], png: str | Path, panels: Sequence[tuple[str, Sequence[str]]],
                x: str = "step", smooth: int = 0) -> Path:
    """One subplot per (title, keys). A key whose values are lists (e.g. MaxVio per layer) draws one line each;
    records without a key are skipped for that key (e.g. periodic evaluations draw as markers). smooth > 1 draws
    dense series faintly with their trailing mean over `smooth` points on top (noisy per-step RL metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r[x], r[key]) for r in records if key in r and r[key] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if isinstance(ys[0], list):
                for i in range(len(ys[0])):
                    ax.plot(xs, [y[i] for y in ys], label=f"{key}[{i}]", lw=1)
            else:
                sparse = len(pts) < 0.5 * len(records)
                if sparse or smooth <= 1 or len(ys) <= smooth:
                    ax.plot(xs, ys, "o-" if sparse else "-", label=key, lw=1.2, ms=3)
                    continue
                (raw,) = ax.plot(xs, ys, "-", lw=0.8, alpha=0.3)
                csum = list(itertools.accumulate(ys, initial=0.0))
                mean = [(csum[i + 1] - csum[max(0, i + 1 - smooth)]) / min(i + 1, smooth) for i in range(len(ys))]
                ax.plot(xs, mean, "-", color=raw.get_color(), lw=1.6, label=f"{key} ({smooth}-step mean)")
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)

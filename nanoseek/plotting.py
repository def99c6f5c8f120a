"""PNG plots from metrics JSONL files (every stage logs one JSONL line per step; plots and the report read them)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_panels(records: list[dict[str, Any]], png: str | Path, panels: Sequence[tuple[str, Sequence[str]]],
                x: str = "step") -> Path:
    """One subplot per (title, keys). A key whose values are lists (e.g. MaxVio per layer) draws one line each;
    records without a key are skipped for that key (e.g. periodic evaluations draw as markers)."""
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
                ax.plot(xs, ys, "o-" if sparse else "-", label=key, lw=1.2, ms=3)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)

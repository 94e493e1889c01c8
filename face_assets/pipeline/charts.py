"""Text charts for the Dagster UI's markdown metadata: plain functions, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

BAR = "█"


def histogram_markdown(title: str, values: Sequence[float], bins: int = 10, width: int = 30,
                       threshold: float | None = None) -> str:
    """A markdown table with one bar per bin of ``values``; the bin holding ``threshold`` is marked."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return f"**{title}**: no values\n"
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        hi = lo + 1e-9
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    peak = max(int(counts.max()), 1)
    lines = [f"**{title}** (n={v.size}, median {np.median(v):.3f})", "", "| range | count | |", "|---|---:|---|"]
    for i, c in enumerate(counts):
        marker = " ← threshold" if threshold is not None and edges[i] <= threshold < edges[i + 1] else ""
        lines.append(f"| {edges[i]:.3f} – {edges[i + 1]:.3f} | {c} | {BAR * round(width * c / peak)}{marker} |")
    return "\n".join(lines) + "\n"


def counts_markdown(title: str, counts: Mapping[str, int], width: int = 30, largest_first: bool = True) -> str:
    """A markdown bar chart of named counts, largest first (or in the mapping's order)."""
    if not counts:
        return f"**{title}**: none\n"
    peak = max(max(counts.values()), 1)
    lines = [f"**{title}**", "", "| | count | |", "|---|---:|---|"]
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if largest_first else counts.items()
    for name, c in items:
        lines.append(f"| {name} | {c} | {BAR * round(width * c / peak)} |")
    return "\n".join(lines) + "\n"

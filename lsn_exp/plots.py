"""Matplotlib figures written as PNG (headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def heatmap(matrix, rows: list[str], cols: list[str], title: str, path: Path, fmt: str = ".2f",
            cmap: str = "viridis", center: float | None = None, xlabel: str = "", ylabel: str = "") -> Path:
    values = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(0.55 * len(cols) + 2.5, 0.45 * len(rows) + 1.8))
    kwargs = {}
    if center is not None:
        span = np.nanmax(np.abs(values - center)) or 1.0
        kwargs = {"vmin": center - span, "vmax": center + span}
    image = ax.imshow(values, cmap=cmap, aspect="auto", **kwargs)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    if values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color="w")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scatter(points: dict[str, list[tuple[float, float, str]]], title: str, xlabel: str, ylabel: str,
            path: Path) -> Path:
    """One marker series per key; each point (x, y, label) is annotated with its label."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, values in points.items():
        xs, ys = [p[0] for p in values], [p[1] for p in values]
        ax.scatter(xs, ys, label=name, s=30)
        for x, y, label in values:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lines(series: dict[str, list[float]], title: str, xlabel: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker=".", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(ncol=3, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves(panels: dict[str, dict[str, list[tuple[float, float]]]], title: str, ylabel: str, path: Path) -> Path:
    """One panel per key, one line per series of (x, y) points, sorted by x (log x when every x is > 0)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        if all(x > 0 for points in series.values() for x, _ in points):
            ax.set_xscale("log")
        ax.set(title=name, xlabel="coefficient", ylabel=ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

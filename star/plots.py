"""Matplotlib figures for the probe command, the study and the demo (Agg backend: files only)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from star.io import atomic_path  # noqa: E402


def save_figure(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_probe_curves(curves: dict[str, list[dict]], path: Path, chance: float | None = None,
                      title: str = "linear probe by step (null class)") -> Path:
    """One line per named curve: rows of {"step", "accuracy"} (optionally "spread" for an error band)."""
    figure, axis = plt.subplots(figsize=(6.4, 4))
    for name, rows in curves.items():
        steps = [row["step"] for row in rows]
        accuracy = np.array([row["accuracy"] for row in rows])
        axis.plot(steps, accuracy, marker="o", label=name)
        if rows and "spread" in rows[0]:
            spread = np.array([row["spread"] for row in rows])
            axis.fill_between(steps, accuracy - spread, accuracy + spread, alpha=0.15)
    if chance is not None:
        axis.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.2f}")
    axis.set(xlabel="step t (sequence position t - 1)", ylabel="probe accuracy", title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_loss_curves(curves: dict[str, list[dict]], path: Path, key: str = "loss_ar") -> Path:
    """Training curves: rows of {"step", key} per named run (every seed its own line)."""
    figure, axis = plt.subplots(figsize=(6.4, 4))
    for name, rows in curves.items():
        axis.plot([row["step"] for row in rows], [row[key] for row in rows], label=name, linewidth=1.2)
    axis.set(xlabel="optimizer step", ylabel=key, title=f"training {key} (next-token cross-entropy)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return save_figure(figure, path)


def plot_fid_bars(labels: list[str], series: dict[str, tuple[list[float], list[float]]], path: Path,
                  ceiling: float | None = None, ylabel: str = "FID") -> Path:
    """Grouped bars: for each series name (e.g. "no CFG", "CFG 2"), (means, spreads) aligned with labels."""
    figure, axis = plt.subplots(figsize=(max(6.4, 1.1 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for index, (name, (means, spreads)) in enumerate(series.items()):
        axis.bar(x + (index - (len(series) - 1) / 2) * width, means, width, yerr=spreads, capsize=3, label=name)
    if ceiling is not None:
        axis.axhline(ceiling, color="black", linestyle="--", linewidth=1, label=f"VQ ceiling {ceiling:.1f}")
    axis.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    axis.set(ylabel=ylabel, title=f"{ylabel} per arm (mean ± sd over seeds; lower is better)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_sample_grids(grids: dict[str, Path], path: Path, columns: int = 4) -> Path:
    """The sample command's grid.png (a row per class) of each arm, side by side with its label."""
    columns = max(1, min(columns, len(grids)))
    rows = -(-len(grids) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (name, grid) in zip(axes.flat, grids.items()):
        axis.imshow(plt.imread(grid))
        axis.set_title(name, fontsize=8)
    return save_figure(figure, path)

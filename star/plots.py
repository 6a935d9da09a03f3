"""Matplotlib figures for the evaluation commands (probe, attention, plot), the study and the demo (Agg backend:
files only)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from star.io import SOFTWARE, atomic_path  # noqa: E402


def save_figure(figure, path: Path) -> Path:
    """Write `figure` as a PNG signed as ours (star/io.py `is_star_png`), atomically, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": SOFTWARE})
    plt.close(figure)
    return path


def plot_probe_curves(curves: dict[str, list[dict]], path: Path, chance: float | None = None,
                      title: str = "linear probe by sequence position (null class)") -> Path:
    """One line per named curve: rows of {"step", "accuracy"} (optionally "spread" for an error band); "step" is
    the 1-based sequence position whose features the probe reads (star/eval/understanding.py)."""
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
    axis.set(xlabel="sequence position", ylabel="probe accuracy", title=title)
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


def plot_attention_maps(maps: dict[int, dict[int, np.ndarray]], class_mass: dict[int, dict[int, float]],
                        path: Path) -> Path:
    """Rows = layers, columns = query positions: each panel the query's attention probabilities over the image
    grid (maps[layer][position]: [grid, grid], NaN where the causal mask hides a cell), one shared log colour
    scale, the query's own input cell outlined, its mass on the class position in the panel title."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    layers = sorted(maps)
    positions = sorted(maps[layers[0]])
    seen = np.concatenate([maps[layer][position].ravel() for layer in layers for position in positions])
    seen = seen[np.isfinite(seen) & (seen > 0)]
    top = float(seen.max()) if len(seen) else 1.0
    norm = LogNorm(vmin=max(float(seen.min()) if len(seen) else top / 1e3, top / 1e4), vmax=top)
    figure, axes = plt.subplots(len(layers), len(positions), figsize=(2.6 * len(positions) + 1, 2.5 * len(layers)),
                                squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: cells at or after the query, not visible
    image = None
    for row, layer in enumerate(layers):
        for column, position in enumerate(positions):
            axis, cells = axes[row, column], maps[layer][position]
            image = axis.imshow(np.ma.masked_invalid(np.where(cells > 0, cells, np.nan)), cmap=cmap, norm=norm)
            own = position - 2  # sequence index position - 1 reads image token position - 2 as its input
            if own >= 0:
                grid = cells.shape[1]
                axis.add_patch(Rectangle((own % grid - 0.5, own // grid - 0.5), 1, 1, fill=False, edgecolor="red",
                                         linewidth=1.5))
            axis.set_title(f"layer {layer}, position {position}\nclass mass {class_mass[layer][position]:.3f}",
                           fontsize=8)
            axis.set_xlabel("grid column", fontsize=7)
            axis.set_ylabel("grid row", fontsize=7)
            axis.tick_params(labelsize=6)
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("attention probability (mean over heads and images; log scale)")
    figure.suptitle("attention of a query position over the image grid (red: its own input cell; grey: masked)",
                    fontsize=9)
    return save_figure(figure, path)


CURVE_LABELS = {"loss": "total loss", "loss_ar": "loss_ar (next-token cross-entropy)", "loss_mim": "loss_mim",
                "loss_step": "loss_step", "loss_view": "loss_view", "grad_norm": "gradient norm (before clipping)",
                "images_per_s": "images / s"}


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    points = [(r[x_key], r[y_key]) for r in records
              if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(y_key), (int, float))]
    return [x for x, _ in points], [y for _, y in points]


def plot_training_curves(logs: dict[str, list[dict]], keys: list[str], path: Path, compute_key: str = "cpu_s",
                         compute_label: str = "training-loop CPU seconds") -> Path:
    """A row of panels per logged quantity (`keys` of the log records), against the optimizer step (left) and
    against compute (right, the records' `compute_key`); one line per named run, the same colour in every panel."""
    figure, axes = plt.subplots(len(keys), 2, figsize=(11, 2.4 * len(keys) + 0.6), squeeze=False, sharex="col",
                                constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, key in enumerate(keys):
        for column, x_key in enumerate(("step", compute_key)):
            axis = axes[row, column]
            for index, (name, records) in enumerate(logs.items()):
                xs, ys = _series(records, x_key, key)
                if any(ys):  # a baseline logs ST-AR's terms as 0: no line rather than a flat one at 0
                    axis.plot(xs, ys, color=colours[index % len(colours)], linewidth=1.2, label=name)
            if not axis.lines:
                axis.text(0.5, 0.5, f"no {key} against {x_key} in these logs", ha="center", va="center",
                          transform=axis.transAxes, fontsize=8)
            if row == 0:
                axis.set_title("against the optimizer step" if x_key == "step" else "against compute", fontsize=9)
            axis.set_ylabel(CURVE_LABELS.get(key, key), fontsize=8)
            axis.grid(alpha=0.3)
            axis.tick_params(labelsize=7)
            if row == len(keys) - 1:
                axis.set_xlabel("optimizer step" if x_key == "step" else compute_label, fontsize=8)
    colour_of = {name: colours[index % len(colours)] for index, name in enumerate(logs)}
    handles = [plt.Line2D([], [], color=colour, linewidth=1.2) for colour in colour_of.values()]
    figure.legend(handles, list(colour_of), loc="outside upper center", ncol=min(len(logs), 4), fontsize=8)
    return save_figure(figure, path)

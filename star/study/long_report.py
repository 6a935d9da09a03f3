"""runs/study-long/report.md: the long preset's answers, tables and curves.

Every comparison is a mean over seeds with its sample sd; a gap counts as real only when it exceeds two seed
spreads (2 x the larger sd of the two arms compared), and with one seed on either side there is no spread to
judge it by. Held-out NLL (the same quantity for every run) replaces the training loss in every comparison;
the training loss appears only as "training loss".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np

from star import plots
from star.runtime import cpu_description
from star.study.report import fid_label, mean_sd


@dataclass(frozen=True)
class Metric:
    name: str
    value: Callable[[dict], float]  # of one scored checkpoint
    lower_is_better: bool
    digits: int = 3


def fid_of(samples: int, tag: str) -> Callable[[dict], float]:
    return lambda point: point["fid"][f"n{samples}"][tag]["fid"]


def metrics(curve_samples: int, cfg_scale: float) -> list[Metric]:
    n = fid_label(curve_samples)
    return [
        Metric("held-out NLL, label (nats/token)", lambda p: p["nll"]["conditional"]["nats_per_token"], True, 4),
        Metric("held-out NLL, null class (nats/token)", lambda p: p["nll"]["unconditional"]["nats_per_token"], True, 4),
        Metric(f"{n} no CFG", fid_of(curve_samples, "cfg1"), True, 2),
        Metric(f"{n} CFG {cfg_scale:g}", fid_of(curve_samples, f"cfg{cfg_scale:g}"), True, 2),
        Metric("probe, last position", lambda p: p["probe"]["rows"][-1]["accuracy"], False),
        Metric("probe, best position", lambda p: max(r["accuracy"] for r in p["probe"]["rows"]), False),
    ]


def final_metrics(num_samples: int, cfg_scale: float) -> list[Metric]:
    n = fid_label(num_samples)
    return [Metric(f"{n} no CFG", fid_of(num_samples, "cfg1"), True, 2),
            Metric(f"{n} CFG {cfg_scale:g}", fid_of(num_samples, f"cfg{cfg_scale:g}"), True, 2)]


def step_of(point: dict) -> int:
    """A checkpoint's step on the baseline's axis: a fine-tune's counts the steps it started from."""
    return point.get("total_step", point["step"])


def compute_of(point: dict) -> float:
    """The training CPU seconds spent to reach a checkpoint: a fine-tune's include its init checkpoint's."""
    return point["total_cpu_s"] if point.get("total_cpu_s") is not None else point["cpu_s"]


def by_arm(results: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for result in results:
        grouped.setdefault(result["arm"], []).append(result)
    return grouped


def values_at(runs: list[dict], step: int, metric: Metric) -> list[float]:
    """The metric at `step` (on the baseline's axis, step_of) for every seed that measured it (a short run has no
    full-count FID)."""
    return [metric.value(p) for r in runs for p in r["points"] if step_of(p) == step and has_metric(p, metric)]


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


@dataclass(frozen=True)
class Gap:
    gap: float  # b - a
    sd: float | None  # the larger seed sd of the two
    better: bool  # b better than a (by the metric's direction)

    @property
    def real(self) -> bool | None:
        return None if self.sd is None else abs(self.gap) > 2 * self.sd

    def words(self, digits: int) -> str:
        judged = {None: "one seed: no spread", True: "beyond 2 sd", False: "within 2 sd"}[self.real]
        return f"{self.gap:+.{digits}f} ({judged})"


def gap(a: list[float], b: list[float], metric: Metric) -> Gap | None:
    """b compared with a."""
    if not a or not b:
        return None
    sds = [sd for sd in (mean_sd(a)[1], mean_sd(b)[1]) if sd is not None]
    difference = float(np.mean(b) - np.mean(a))
    return Gap(difference, max(sds) if len(sds) == 2 else None, difference < 0 if metric.lower_is_better else difference > 0)


def curve(runs: list[dict], metric: Metric, x_key: str) -> dict:
    """Mean and sd over seeds per checkpoint that measured the metric, against step or CPU seconds (the mean over
    seeds); a fine-tune's steps and CPU seconds count its start's (step_of, compute_of)."""
    steps = sorted({step_of(p) for r in runs for p in r["points"] if has_metric(p, metric)})
    x, mean, sd = [], [], []
    for step in steps:
        points = [p for r in runs for p in r["points"] if step_of(p) == step and has_metric(p, metric)]
        values = [metric.value(p) for p in points]
        x.append(step if x_key == "step" else float(np.mean([compute_of(p) for p in points])))
        m, s = mean_sd(values)
        mean.append(m)
        sd.append(s or 0.0)
    return {"x": x, "mean": mean, "sd": sd}


def at_compute(baseline: dict, cpu_s: float) -> tuple[float, float] | None:
    """The baseline's (mean, sd) at `cpu_s` CPU seconds, linear between its checkpoints; None outside them."""
    x = np.asarray(baseline["x"])
    if not x[0] <= cpu_s <= x[-1]:
        return None
    return float(np.interp(cpu_s, x, baseline["mean"])), float(np.interp(cpu_s, x, baseline["sd"]))


# ----------------------------------------------------------------------------------------------------------
# The four questions


LONG_STAR_ARMS = ("L3_star", "L6_star_auto", "L7_star_decay092", "L8_star_finetune")


def equal_steps_table(grouped, metric_list: list[Metric], star_key: str) -> list[str]:
    base, star = grouped.get("L1_llamagen"), grouped.get(star_key)
    if not base or not star:
        return []
    steps = sorted({step_of(p) for r in star for p in r["points"]})
    head = "| step | " + " | ".join(m.name for m in metric_list) + " |"
    lines = [f"{star[0]['label']} minus L1 LlamaGen at equal steps (negative NLL / FID gaps and positive probe gaps "
             "favour ST-AR):", "", head, "|" + "---|" * (head.count("|") - 1)]
    for step in steps:
        cells = []
        for m in metric_list:
            g = gap(values_at(base, step, m), values_at(star, step, m), m)
            cells.append("–" if g is None else g.words(m.digits))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines + [""]


def equal_compute_table(grouped, metric_list: list[Metric], star_key: str) -> list[str]:
    base, star = grouped.get("L1_llamagen"), grouped.get(star_key)
    if not base or not star:
        return []
    head = "| ST-AR step | CPU s | " + " | ".join(m.name for m in metric_list) + " |"
    lines = [f"{star[0]['label']} minus L1 LlamaGen at equal training compute (the baseline's curve read at "
             "ST-AR's CPU seconds, linear between its checkpoints):", "", head, "|" + "---|" * (head.count("|") - 1)]
    for step in sorted({step_of(p) for r in star for p in r["points"]}):
        cpu = float(np.mean([compute_of(p) for r in star for p in r["points"] if step_of(p) == step]))
        cells = []
        for m in metric_list:
            read = at_compute(curve(base, m, "cpu_s"), cpu)
            values = values_at(star, step, m)
            if read is None:
                cells.append("outside the baseline's checkpoints")
                continue
            sd_star = mean_sd(values)[1]
            sds = [s for s in (sd_star, read[1] if len(base) > 1 else None) if s is not None]
            g = Gap(float(np.mean(values)) - read[0], max(sds) if len(sds) == 2 else None, False)
            cells.append(g.words(m.digits))
        lines.append(f"| {step} | {cpu:.0f} | " + " | ".join(cells) + " |")
    return lines + [""]


def trend_sentence(grouped, metric: Metric, star_key: str) -> str:
    base, star = grouped.get("L1_llamagen"), grouped.get(star_key)
    if not base or not star:
        return ""
    steps = sorted({step_of(p) for r in star for p in r["points"]})
    gaps = [gap(values_at(base, s, metric), values_at(star, s, metric), metric) for s in steps]
    first, last = gaps[0], gaps[-1]
    if first is None or last is None:
        return ""
    if last.real is None:
        shape = "one arm has one seed, so there is no spread to judge by"
    elif last.better and last.real:
        shape = "ST-AR is ahead beyond the seed spread"
    elif not last.better and last.real:
        shape = "the baseline is ahead beyond the seed spread"
    else:
        shape = "the two are within the seed spread"
    change = "shrinks" if abs(last.gap) < abs(first.gap) else "grows"
    if (first.gap > 0) != (last.gap > 0):
        change = "reverses"
    return (f"{metric.name}: gap {first.gap:+.{metric.digits}f} at step {steps[0]} → {last.gap:+.{metric.digits}f} at "
            f"step {steps[-1]} (the gap {change}); at the end {shape}.")


def comparison_rows(grouped, pairs: list[tuple[str, str, int]], metric_list: list[Metric]) -> list[str]:
    """Rows 'arm b vs arm a at step': each metric's mean ± sd for b and the gap with its verdict."""
    head = "| comparison | step | " + " | ".join(m.name for m in metric_list) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for a_key, b_key, step in pairs:
        a, b = grouped.get(a_key), grouped.get(b_key)
        if not a or not b:
            continue
        cells = []
        for m in metric_list:
            g = gap(values_at(a, step, m), values_at(b, step, m), m)
            cells.append(f"{cell(values_at(b, step, m), m.digits)} vs {cell(values_at(a, step, m), m.digits)}: "
                         + ("–" if g is None else g.words(m.digits)))
        lines.append(f"| {b[0]['label']} vs {a[0]['label']} | {step} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return ["(the arms of this comparison were not run)", ""]
    return lines + [""]


def all_runs_table(grouped, metric_list: list[Metric], finals: list[Metric]) -> list[str]:
    head = ("| arm | seeds | steps | teacher decay | " + " | ".join(m.name for m in metric_list + finals)
            + " | training loss | CPU s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for runs in grouped.values():
        step = runs[0].get("total_steps", runs[0]["steps"])
        last = [p for r in runs for p in r["points"] if step_of(p) == step]
        decay = runs[0]["teacher_decay"]
        cells = [cell(values_at(runs, step, m), m.digits) for m in metric_list + finals]
        lines.append(f"| {runs[0]['label']} | {len(runs)} | {step} | {'–' if decay is None else f'{decay:g}'} | "
                     + " | ".join(cells) + f" | {cell([p['train_loss'] for p in last], 3)} | "
                     f"{cell([compute_of(p) for p in last], 0)} |")
    return lines + [""]


def has_metric(point: dict, metric: Metric) -> bool:
    try:
        metric.value(point)
        return True
    except (KeyError, IndexError):
        return False


def plot_metric_panels(panels: dict[str, dict[str, dict]], path: Path, xlabel: str, title: str,
                       columns: int = 3) -> Path:
    """A grid of panels, one per metric: {metric: {arm: {"x": [...], "mean": [...], "sd": [...]}}}, each arm a
    line with its seed spread (± sd) as a band."""
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False,
                                layout="constrained")  # keeps a row's titles off the x labels above it
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    for axis, (metric, curves) in zip(axes.flat, panels.items()):
        for arm, curve in curves.items():
            x, mean, sd = (np.asarray(curve[k], dtype=float) for k in ("x", "mean", "sd"))
            axis.plot(x, mean, marker="o", markersize=3, label=arm)
            axis.fill_between(x, mean - sd, mean + sd, alpha=0.15)
        axis.set(xlabel=xlabel, title=metric)
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(title)
    return plots.save_figure(figure, path)


def shifted_log(result: dict) -> list[dict]:
    """A run's log on the baseline's step axis (a fine-tune's steps count on from its start)."""
    offset = result.get("step_offset", 0)
    return [{**record, "step": record["step"] + offset} for record in result["log"]]


def figures(grouped, metric_list: list[Metric], out: Path) -> dict[str, Path]:
    long_arms = {key: runs for key, runs in grouped.items() if not runs[0]["short"]}
    made = {}
    for x_key, xlabel in (("step", "optimizer step"), ("cpu_s", "training compute (CPU seconds, one thread)")):
        panels = {m.name: {runs[0]["label"]: curve(runs, m, x_key) for runs in long_arms.values()}
                  for m in metric_list}
        made[f"by_{x_key}"] = plot_metric_panels(
            panels, out / f"long_by_{x_key}.png", xlabel, f"long runs by {xlabel} (mean ± sd over seeds)")
    losses = {f"{r['label']} s{r['seed']}": shifted_log(r) for runs in long_arms.values() for r in runs}
    made["training_loss"] = plots.plot_loss_curves(losses, out / "long_training_loss.png", key="loss")
    return made


def time_lines(study: dict) -> list[str]:
    kinds: dict[str, list[float]] = {}
    for name, (wall, cpu) in study["stage_seconds"].items():
        kind = name.split("_")[0]
        totals = kinds.setdefault(kind, [0.0, 0.0])
        totals[0] += wall
        totals[1] += cpu or 0.0
    lines = ["| stage kind | stages' wall s (summed) | CPU s |", "|---|---|---|"]
    lines += [f"| {kind} | {wall:.0f} | {cpu:.0f} |" for kind, (wall, cpu) in sorted(kinds.items())]
    return lines


def _baseline_steps(plan) -> int:
    from star.study.long_arms import LONG_ARMS

    return round(plan.steps * next(arm.length for arm in LONG_ARMS if arm.key == "L1_llamagen"))


def render_long(study: dict, plan, out: Path, command: str) -> Path:
    grouped = by_arm(study["results"])
    metric_list, finals = metrics(plan.curve_samples, plan.cfg_scale), final_metrics(plan.num_samples, plan.cfg_scale)
    made = figures(grouped, metric_list, out / "figures") if study["results"] else {}
    short = plan.short_steps
    invocations = study.get("invocations", [])
    ceilings = study["ceilings"]
    lines = [f"# ST-AR vs LlamaGen on Fashion-MNIST, long runs (preset: {plan.preset})", "",
             f"Command: `{command}`. Machine: {os.cpu_count()} cores of {cpu_description()[0]}; "
             f"{plan.jobs} runs side by side on {plan.threads_per_job} thread(s) each. "
             f"Ran in {len(invocations)} invocation(s)"
             + (" (in one piece)" if len(invocations) == 1 else ", each resuming from the stages already finished")
             + ".", "",
             f"GPT {plan.gpt}, batch {plan.batch_size}, lr {plan.lr}, the fast step ({' '.join(plan.train_flags)}). "
             f"Long arms: {plan.steps} steps (the baseline {_baseline_steps(plan)}), checkpoints at "
             f"{', '.join(f'{f:.0%}' for f in plan.milestones)} of the run; short arms: {short} steps. "
             f"Every checkpoint: held-out NLL on the {study['results'][0]['points'][0]['nll']['images'] if study['results'] else '?'}"
             f" test images, the probe, and {fid_label(plan.curve_samples)} ({plan.curve_samples} samples) without "
             f"and with CFG {plan.cfg_scale:g}; each long run's last checkpoint also {fid_label(plan.num_samples)}. "
             f"Inception in {plan.fid_precision}. Best ST-AR arm by held-out NLL (gets seed "
             f"{max(plan.other_seeds) + 1}): {study.get('best_candidate')}.", "",
             "Decision rule: a gap counts when it exceeds two seed spreads (2 x the larger sd of the two arms).", ""]
    if unfinished := study.get("unfinished"):
        lines += [f"**Partial report:** {len(unfinished)} planned run(s) not yet trained and scored: "
                  f"{', '.join(unfinished)}. Every answer below uses only the finished runs; rerun "
                  f"`make study PRESET={plan.preset}` (finished stages are skipped) to complete the study.", ""]
    lines += ["## (a) Does ST-AR's gap to the baseline shrink, vanish or reverse as runs get longer?", ""]
    for key in (k for k in LONG_STAR_ARMS if k in grouped and "L1_llamagen" in grouped):
        lines += [f"### {grouped[key][0]['label']} against {grouped['L1_llamagen'][0]['label']}", ""]
        lines += ["At equal steps, from the first checkpoint to the last:", ""]
        lines += [f"- {s}" for m in metric_list if (s := trend_sentence(grouped, m, key))]
        lines += [""] + equal_steps_table(grouped, metric_list, key) + equal_compute_table(grouped, metric_list, key)
    final_step = plan.steps
    lines += ["## (b) Once runs are long, does the teacher decay matter?", "",
              *comparison_rows(grouped, [("L3_star", "L6_star_auto", final_step),
                                         ("L3_star", "L7_star_decay092", final_step),
                                         ("L6_star_auto", "L7_star_decay092", final_step)], metric_list + finals),
              "## (c) Are the paper's loss weights too strong at this scale?", "",
              f"At {short} steps (the long runs' first checkpoint serves the paper's weights and the baseline):", "",
              *comparison_rows(grouped, [("L3_star", "S1_star_w025", short), ("L3_star", "S2_star_w010", short),
                                         ("L1_llamagen", "S1_star_w025", short),
                                         ("L1_llamagen", "S2_star_w010", short)], metric_list),
              "## (d) What does dropout do to both?", "",
              *comparison_rows(grouped, [("L1_llamagen", "S3_llamagen_drop0", short),
                                         ("L3_star", "S4_star_drop0", short),
                                         ("S3_llamagen_drop0", "S4_star_drop0", short)], metric_list),
              "## What the mask adds", "",
              *comparison_rows(grouped, [("L3_star", "S5_star_mask0", short)], metric_list),
              "## Every arm at its last step (mean ± sd over seeds)", "",
              *all_runs_table(grouped, metric_list, finals),
              "VQ ceiling (test images decoded from their tokens): "
              + ", ".join(f"{fid_label(int(n))} {c['fid']:.2f}" for n, c in sorted(ceilings.items(),
                                                                                 key=lambda item: int(item[0]))),
              "", "## Figures", ""]
    lines += [f"![{name}](figures/{path.name})" for name, path in made.items()]
    lines += ["", "## Time", "", "Invocations: " + "; ".join(
        f"{i['started']} → {i.get('ended', 'interrupted')}" for i in invocations), "", *time_lines(study)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

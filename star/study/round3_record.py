"""Round 3's answers from its record of measurements (committed: docs/study/round3/measurements.json).

The study's own report (round3_report.py) reads every run's result.json under runs/study-round3, and writes beside
it measurements.json (round3_report.record_from_results): a flat list of what those runs measured at each
checkpoint scored at the full sample count (FID without and with CFG, held-out NLL with the label, the probe at
the last position), with the preset, the sample count, the CFG scale and the tokenizer's ceiling. Kept apart from the run folders (which hold checkpoints
and samples, far too large to commit), the record lets the round's answers be redrawn and checked:

    python -m star.study.round3_record docs/study/round3/measurements.json --out docs/study/round3

writes answers.md (every recipe against the baseline, at equal steps and at equal compute, each gap judged by the
two-spread rule) and curves.png. Where the baseline and a recipe meet is computed from the round's arm table, as
the study computes it: equal steps at the recipe's last step (a fine-tune's counting the steps it started from),
equal compute at its steps times the step's cost in plain steps (plus a fine-tune's start), both on the baseline's
step axis and read at the nearest scored baseline checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from star import plots
from star.study.long import arm_steps, step_offset
from star.study.long_arms import ROUND3_ARMS, ROUND3_BASELINE
from star.study.long_report import Gap, Metric, cell, gap
from star.study.presets import PRESETS
from star.study.report import fid_label, mean_sd
from star.study.round3_report import Answer
from star.study.round3_report import pays as study_pays
from star.study.stages import StudyPlan

# a measurement's metric keys, in the order of the tables (lower is better, digits)
METRIC_KEYS = ("fid_no_cfg", "fid_cfg", "nll", "probe_last")
LOWER_IS_BETTER = (True, True, True, False)
DIGITS = (2, 2, 4, 3)


def metrics_of(record: dict) -> tuple[Metric, ...]:
    n, cfg = fid_label(record["fid_samples"]), f"{record['cfg_scale']:g}"
    names = (f"{n} no CFG", f"{n} CFG {cfg}", "held-out NLL (nats/token)", "probe, last position")
    return tuple(Metric(name, lambda m, key=key: m[key], lower, digits)
                 for key, name, lower, digits in zip(METRIC_KEYS, names, LOWER_IS_BETTER, DIGITS))


def arm_by_key() -> dict:
    return {arm.key: arm for arm in ROUND3_ARMS}


def plan_of(record: dict) -> StudyPlan:
    """The record's preset's plan (its lengths; nothing is run)."""
    return StudyPlan(out=Path("unused"), data=Path("unused"), arms=list(ROUND3_ARMS), preset=record["preset"],
                     **PRESETS[record["preset"]][0])


def baseline_steps(record: dict) -> int:
    return arm_steps(plan_of(record), arm_by_key()[ROUND3_BASELINE])


def recipe_steps(record: dict, key: str) -> tuple[int, int]:
    """(own steps, the baseline step it started from: a fine-tune's branch, else 0) of a round-3 arm."""
    plan, arm = plan_of(record), arm_by_key()[key]
    return arm_steps(plan, arm), step_offset(plan, arm)


def meeting_steps(record: dict, key: str) -> dict[str, int]:
    """The baseline's steps where the recipe `key` meets it: at equal steps and at equal compute."""
    own, start = recipe_steps(record, key)
    cost = arm_by_key()[key].step_cost
    return {"equal steps": start + own, "equal compute": min(round(start + own * cost), baseline_steps(record))}


def load_record(path: Path) -> dict:
    record = json.loads(Path(path).read_text())
    missing = {"preset", "fid_samples", "cfg_scale", "measurements"} - record.keys()
    if missing:
        raise ValueError(f"{path}: lacks {sorted(missing)}")
    if record["preset"] not in PRESETS or not record["preset"].startswith("round3"):
        raise ValueError(f"{path}: preset {record['preset']!r} is not a round-3 preset")
    known = arm_by_key()
    for index, entry in enumerate(record["measurements"]):
        missing = {"arm", "seed", "step"} - entry.keys()
        if missing:
            raise ValueError(f"{path}: measurement {index} lacks {sorted(missing)}")
        if entry["arm"] not in known:
            raise ValueError(f"{path}: measurement {index} names arm {entry['arm']!r}: not one of {sorted(known)}")
    seen = [(m["arm"], m["seed"], m["step"]) for m in record["measurements"]]
    doubled = sorted({s for s in seen if seen.count(s) > 1})
    if doubled:
        raise ValueError(f"{path}: measured twice: {doubled}")
    return record


def values(record: dict, arm: str, step: int, metric: int) -> list[float]:
    """One metric (its index in METRIC_KEYS) of every seed of `arm` measured at `step`."""
    key = METRIC_KEYS[metric]
    return [m[key] for m in record["measurements"] if m["arm"] == arm and m["step"] == step and key in m]


def scored_baseline_steps(record: dict) -> list[int]:
    return sorted({m["step"] for m in record["measurements"] if m["arm"] == ROUND3_BASELINE})


def nearest(steps: list[int], target: int) -> int:
    return min(steps, key=lambda step: (abs(step - target), step))


@dataclass
class Comparison:
    where: str  # "equal steps" | "equal compute"
    baseline_step: int
    target_step: int  # where it falls before snapping to a scored checkpoint
    rows: list[tuple[Metric, list[float], list[float], Gap | None]]  # metric, baseline's, recipe's, recipe - baseline


def compare(record: dict, recipe: str) -> list[Comparison]:
    scored = scored_baseline_steps(record)
    if not scored:
        raise ValueError(f"the record has no measurement of the baseline {ROUND3_BASELINE}")
    own, _ = recipe_steps(record, recipe)
    comparisons = []
    for where, target in meeting_steps(record, recipe).items():
        step = nearest(scored, target)
        rows = []
        for index, metric in enumerate(metrics_of(record)):
            base, mine = values(record, ROUND3_BASELINE, step, index), values(record, recipe, own, index)
            rows.append((metric, base, mine, gap(base, mine, metric)))
        comparisons.append(Comparison(where, step, target, rows))
    return comparisons


def pays(comparison: Comparison, record: dict) -> str:
    """The study's verdict (round3_report.pays: better FID or NLL beyond the spread, with a probe lead beyond it)
    on one comparison: "**yes**", "no: why", or undecided when a side has one seed."""
    rows = [(metric, mine, None, difference) for metric, _, mine, difference in comparison.rows]
    return study_pays(Answer(comparison.where, comparison.baseline_step, rows), fid_label(record["fid_samples"]))


def render(record: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    labels = {arm.key: arm.label for arm in ROUND3_ARMS}
    ceiling = record.get("ceiling") or {}
    lines = ["# Round 3: every recipe against the baseline", "",
             f"Generated by `python -m star.study.round3_record` from [measurements.json](measurements.json) "
             f"({len(record['measurements'])} measurements). Mean ± sample sd over seeds (n = seeds); a gap is "
             "real when it exceeds 2 × the larger sd of the two sides. Recipe minus baseline: a negative FID or NLL "
             "gap and a positive probe gap favour the recipe.", ""]
    if ceiling.get("fid") is not None:
        lines += [f"The tokenizer's ceiling (test images decoded from their tokens): {fid_label(record['fid_samples'])} "
                  f"{ceiling['fid']:.2f}, precision {ceiling.get('precision')}, recall {ceiling.get('recall')}.", ""]
    verdicts = []
    for recipe in (arm.key for arm in ROUND3_ARMS if arm.key != ROUND3_BASELINE):
        own, start = recipe_steps(record, recipe)
        if not values(record, recipe, own, METRIC_KEYS.index("nll")):
            continue  # not measured (yet)
        lines += [f"## {labels[recipe]}", "",
                  f"{own:,} own steps" + (f" from the baseline's step {start:,}" if start else "") + ".", "",
                  "| where | baseline step | metric | baseline (n) | recipe (n) | gap, recipe − baseline |",
                  "|---|---|---|---|---|---|"]
        for comparison in compare(record, recipe):
            snapped = "" if comparison.baseline_step == comparison.target_step else f" (for {comparison.target_step:,})"
            for metric, base, mine, difference in comparison.rows:
                lines.append(f"| {comparison.where} | {comparison.baseline_step:,}{snapped} | {metric.name} | "
                             f"{cell(base, metric.digits)} ({len(base)}) | {cell(mine, metric.digits)} ({len(mine)}) | "
                             f"{difference.words(metric.digits) if difference else '–'} |")
            if comparison.where == "equal compute":
                verdicts.append((labels[recipe], pays(comparison, record)))
        lines.append("")
    lines += ["## Does it pay?", "",
              "At equal compute: better FID (either CFG) or NLL beyond two spreads, keeping a probe lead beyond two "
              "spreads.", "", "| recipe | pays |", "|---|---|"]
    lines += [f"| {label} | {verdict} |" for label, verdict in verdicts]
    (out / "answers.md").write_text("\n".join(lines) + "\n")
    plot_curves(record, out / "curves.png")
    return out / "answers.md"


def plot_curves(record: dict, path: Path) -> Path:
    """The baseline's mean ± sd by training compute (plain-step equivalents), each recipe's last checkpoint at its
    compute: FID without CFG, NLL, the probe."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = scored_baseline_steps(record)
    for axis, index in zip(axes, (0, 2, 3)):
        metric = metrics_of(record)[index]
        means = [mean_sd(values(record, ROUND3_BASELINE, s, index)) if values(record, ROUND3_BASELINE, s, index)
                 else (np.nan, None) for s in steps]
        mean = np.array([m for m, _ in means])
        sd = np.array([s or 0.0 for _, s in means])
        axis.plot(steps, mean, "o-", color="black", label=arm_by_key()[ROUND3_BASELINE].label)
        axis.fill_between(steps, mean - sd, mean + sd, color="black", alpha=0.15)
        recipes = [arm for arm in ROUND3_ARMS if arm.key != ROUND3_BASELINE]
        for order, arm in enumerate(recipes):
            own, _ = recipe_steps(record, arm.key)
            found = values(record, arm.key, own, index)
            if found:
                m, s = mean_sd(found)
                # side by side, so that recipes meeting the baseline at the same compute stay apart
                shift = (order - (len(recipes) - 1) / 2) * 0.01 * baseline_steps(record)
                axis.errorbar([meeting_steps(record, arm.key)["equal compute"] + shift], [m], yerr=[s or 0.0],
                              fmt="s", capsize=3, label=arm.label)
        axis.set_xlabel("training compute (plain steps)")
        axis.set_title(metric.name)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.12))
    figure.suptitle("Round 3: the baseline's curve and each recipe at its compute (mean ± sd over seeds)")
    return plots.save_figure(figure, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record", type=Path, help="measurements.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for answers.md and curves.png")
    args = parser.parse_args(argv)
    try:
        answers = render(load_record(args.record), args.out)
    except (OSError, ValueError, KeyError) as error:  # unreadable, malformed, or no baseline to compare with
        print(f"error: {args.record}: {error}", file=sys.stderr)
        return 2
    print(answers.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

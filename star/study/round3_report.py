"""runs/study-round3/report.md: round 3's answers. For each recipe (R2-R6) against the baseline (R1), at equal
training compute and at equal steps: FID at the full sample count without and with CFG (precision and recall beside
it), held-out NLL and the probe at the last position, each gap judged by the two-spread rule (long_report's `Gap`),
and whether the recipe pays: better generation or likelihood than the baseline at equal compute beyond the spread,
while keeping a probe lead beyond it.

Conventions. Equal compute: training CPU seconds (`total_cpu_s`: a fine-tune's include its init checkpoint's). The
baseline's curve measures (NLL, probe) are read off its checkpoints linearly at the recipe's CPU seconds; its FID at
the full count, scored at a few checkpoints only, at the nearest of those (the table names it). Equal steps: a
fine-tune's steps count the baseline steps it started from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from star.io import write_json_atomic
from star.runtime import cpu_description
from star.study.long_arms import FINE_TUNE_WARMUP_FRACTION, ROUND3_BASELINE, STAR_STEP_COST, arm_table
from star.study.long_report import (
    Gap,
    Metric,
    all_runs_table,
    at_compute,
    by_arm,
    cell,
    compute_of,
    curve,
    fid_of,
    figures,
    final_metrics,
    has_metric,
    metrics,
    step_of,
    time_lines,
)
from star.study.report import fid_label, mean_sd


def _entry(samples: int, tag: str, key: str):
    return lambda point: point["fid"][f"n{samples}"][tag][key]


def answer_metrics(num_samples: int, cfg_scale: float) -> list[Metric]:
    """What each recipe is judged by, in the order of the tables."""
    n, cfg = fid_label(num_samples), f"cfg{cfg_scale:g}"
    return [Metric(f"{n} no CFG", fid_of(num_samples, "cfg1"), True, 2),
            Metric("precision, no CFG", _entry(num_samples, "cfg1", "precision"), False),
            Metric("recall, no CFG", _entry(num_samples, "cfg1", "recall"), False),
            Metric(f"{n} CFG {cfg_scale:g}", fid_of(num_samples, cfg), True, 2),
            Metric(f"precision, CFG {cfg_scale:g}", _entry(num_samples, cfg, "precision"), False),
            Metric(f"recall, CFG {cfg_scale:g}", _entry(num_samples, cfg, "recall"), False),
            Metric("held-out NLL, label (nats/token)", lambda p: p["nll"]["conditional"]["nats_per_token"], True, 4),
            Metric("probe, last position", lambda p: p["probe"]["rows"][-1]["accuracy"], False)]


def cpu_text(seconds: float) -> str:
    """CPU seconds as the tables print them: whole seconds, or two decimals below 100 (the smoke preset's)."""
    return f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.2f}"


@dataclass(frozen=True)
class Reading:
    mean: float
    sd: float | None  # over seeds; None with one seed
    where: str  # the checkpoint read, or the interpolation


def checkpoint_values(runs: list[dict], metric: Metric) -> list[tuple[int, float, list[float]]]:
    """(step, mean CPU seconds, every seed's value) of each checkpoint that measured the metric, by step."""
    marks = []
    for step in sorted({step_of(p) for r in runs for p in r["points"] if has_metric(p, metric)}):
        points = [p for r in runs for p in r["points"] if step_of(p) == step and has_metric(p, metric)]
        values = [metric.value(p) for p in points]
        if all(v is not None for v in values):
            marks.append((step, float(np.mean([compute_of(p) for p in points])), values))
    return marks


def read_baseline(base: list[dict], metric: Metric, axis: str, x: float, interpolate: bool) -> Reading | None:
    """The baseline at step or CPU seconds `x` (axis "step" / "cpu_s"): its checkpoint there; else, with
    `interpolate`, linear between the checkpoints around x; else its nearest checkpoint that measured the metric."""
    marks = checkpoint_values(base, metric)
    if not marks:
        return None
    position = {"step": 0, "cpu_s": 1}[axis]
    xs = [mark[position] for mark in marks]
    if interpolate and x not in xs and xs[0] <= x <= xs[-1]:
        mean, sd = at_compute(curve(base, metric, axis), x)
        where = f"between its checkpoints at {cpu_text(x) + ' CPU-s' if axis == 'cpu_s' else f'step {x:.0f}'}"
        return Reading(mean, sd if len(base) > 1 else None, where)
    step, cpu, values = min(marks, key=lambda mark: abs(mark[position] - x))
    mean, sd = mean_sd(values)
    return Reading(mean, sd, f"step {step}, {cpu_text(cpu)} CPU-s")


def compare(recipe: list[float], base: Reading | None, metric: Metric) -> Gap | None:
    """The recipe's mean minus the baseline's, judged against the larger of the two seed spreads."""
    if not recipe or base is None:
        return None
    mean, sd = mean_sd(recipe)
    difference = mean - base.mean
    spread = max(sd, base.sd) if sd is not None and base.sd is not None else None
    return Gap(difference, spread, difference < 0 if metric.lower_is_better else difference > 0)


@dataclass(frozen=True)
class Answer:
    """One recipe against the baseline on one axis (equal compute or equal steps)."""
    axis: str
    x: float  # the recipe's last checkpoint on that axis
    rows: list[tuple[Metric, list[float], Reading | None, Gap | None]]

    def gap(self, name_start: str) -> Gap | None:
        return next((g for m, _, _, g in self.rows if m.name.startswith(name_start)), None)


def answer(base: list[dict], recipe: list[dict], metric_list: list[Metric], axis: str) -> Answer:
    last = recipe[0].get("total_steps", recipe[0]["steps"])
    points = [p for r in recipe for p in r["points"] if step_of(p) == last]
    x = float(last) if axis == "step" else float(np.mean([compute_of(p) for p in points]))
    rows = []
    for m in metric_list:
        values = [m.value(p) for p in points if has_metric(p, m) and m.value(p) is not None]
        curve_measure = not m.name.startswith(("FID", "precision", "recall"))
        reading = read_baseline(base, m, axis, x, interpolate=curve_measure)
        rows.append((m, values, reading, compare(values, reading, m)))
    return Answer(axis, x, rows)


def pays(at_compute_answer: Answer, fid_name: str) -> str:
    """yes / no / undecided, with why: better FID (either) or NLL beyond the spread, and a probe lead beyond it."""
    quality = [at_compute_answer.gap(name) for name in (f"{fid_name} no CFG", f"{fid_name} CFG", "held-out NLL")]
    probe = at_compute_answer.gap("probe")
    if probe is None or any(g is None for g in quality):
        return "not measured"
    if probe.real is None or any(g.real is None for g in quality):
        return "undecided: one seed, no spread to judge by"
    better = [g for g in quality if g.better and g.real]
    lead = probe.better and probe.real
    if better and lead:
        return "**yes**"
    reasons = ([] if better else ["no FID or NLL gain beyond the spread"]) + ([] if lead else
                                                                            ["no probe lead beyond the spread"])
    return "no: " + "; ".join(reasons)


def _value(reading: Reading | None, digits: int) -> str:
    if reading is None:
        return "–"
    return f"{reading.mean:.{digits}f}" + (f" ± {reading.sd:.{digits}f}" if reading.sd is not None else "")


def answer_table(result: Answer) -> list[str]:
    lines = ["| measure | recipe | baseline | read at | gap (recipe - baseline) |", "|---|---|---|---|---|"]
    for m, values, reading, g in result.rows:
        lines.append(f"| {m.name} | {cell(values, m.digits)} | {_value(reading, m.digits)} | "
                     f"{reading.where if reading else '–'} | {'–' if g is None else g.words(m.digits)} |")
    return lines + [""]


def summary_table(answers: dict[str, tuple[str, Answer]], fid_name: str) -> list[str]:
    lines = [f"| recipe | CPU-s at its last checkpoint | {fid_name} no CFG | {fid_name} CFG | held-out NLL | probe, "
             "last position | pays? |", "|---|---|---|---|---|---|---|"]
    for label, result in answers.values():
        cells = []
        for name in (f"{fid_name} no CFG", f"{fid_name} CFG", "held-out NLL", "probe"):
            g = result.gap(name)
            digits = next(m.digits for m, *_ in result.rows if m.name.startswith(name))
            cells.append("–" if g is None else g.words(digits))
        lines.append(f"| {label} | {cpu_text(result.x)} | " + " | ".join(cells) + f" | {pays(result, fid_name)} |")
    return lines + [""]


def headroom_lines(ceiling_fid: float | None, base: list[dict] | None, plan) -> list[str]:
    """The baseline's last checkpoint beside the ceiling: the ceiling at most half the baseline's FID leaves the
    arms room to differ by their generators rather than the tokenizer."""
    if ceiling_fid is None or not base:
        return []
    n, last = fid_label(plan.num_samples), max(step_of(p) for r in base for p in r["points"])
    lines = []
    for metric in final_metrics(plan.num_samples, plan.cfg_scale):
        values = [metric.value(p) for r in base for p in r["points"] if step_of(p) == last and has_metric(p, metric)]
        if values:
            mean = float(np.mean(values))
            lines.append(f"- the baseline at step {last}, {metric.name}: {cell(values, 2)}; ceiling / baseline = "
                         f"{ceiling_fid / mean:.2f} ({'at most' if ceiling_fid <= mean / 2 else 'more than'} half)")
    return [f"Headroom: the ceiling's {n} against the baseline's at its last checkpoint (the round asks for a "
            "ratio of at most 0.5):", "", *lines, ""] if lines else []


def ceiling_lines(study: dict, plan, base: list[dict] | None = None) -> list[str]:
    vq, ceilings = study["vq"], {int(n): c for n, c in study["ceilings"].items()}
    full = ceilings.get(plan.num_samples, {})
    n = fid_label(plan.num_samples)

    def number(value, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    return ["## The tokenizer's ceiling", "",
            "Test images decoded from their tokens, scored as a generator's samples would be (class-balanced):", "",
            f"| VQ steps | VQ flags | {n} | precision | recall | held-out PSNR (dB) | codebook use |",
            "|---|---|---|---|---|---|---|",
            f"| {vq.get('steps', plan.vq_steps)} | `{' '.join(plan.vq_flags) or '(none)'}` | "
            f"{number(full.get('fid'), 2)} | {number(full.get('precision'), 3)} | {number(full.get('recall'), 3)} | "
            f"{number(vq.get('holdout_psnr'), 2)} | {number(vq.get('holdout_codebook_usage'), 3)} |", "",
            *headroom_lines(full.get("fid"), base, plan)]


def part_lines(study: dict, arm_keys: list[str]) -> list[str]:
    """Seconds per part: the shared stages, and each arm's training and scoring (summed over its seeds)."""
    parts: dict[str, list[float]] = {}
    for name, (wall, cpu) in study["stage_seconds"].items():
        kind, _, rest = name.partition("_")
        arm = next((key for key in arm_keys if rest.startswith(key + "_seed")), None)
        part = "shared (data, VQ, tokens, ceiling)" if arm is None else (
            f"train {arm}" if kind == "train" else f"score {arm}")
        totals = parts.setdefault(part, [0.0, 0.0])
        totals[0] += wall
        totals[1] += cpu or 0.0
    order = ["shared (data, VQ, tokens, ceiling)", *(f"{kind} {key}" for key in arm_keys for kind in ("train", "score"))]
    lines = ["| part | stages' wall s (summed) | CPU s |", "|---|---|---|"]
    return lines + [f"| {part} | {parts[part][0]:.0f} | {parts[part][1]:.0f} |" for part in order if part in parts]


def settings_lines(plan, results: list[dict]) -> list[str]:
    arms = {arm.key: arm for arm in arm_table(plan.preset)}
    lengths = {r["arm"]: (r["steps"], r.get("step_offset", 0)) for r in results}
    fine_tunes = [key for key, arm in arms.items() if arm.fine_tune_of and key in lengths]
    tune = ""
    if fine_tunes:
        steps, offset = lengths[fine_tunes[0]]
        tune = (f" The fine-tune starts from the baseline's checkpoint at step {offset} (same seed; AdamW's moments "
                f"carried over; the teacher starts as that checkpoint, decay `auto` over its own {steps} steps) and "
                f"trains {steps} ST-AR steps = (baseline steps - {offset}) / {STAR_STEP_COST} (STAR_STEP_COST, the "
                f"long round's measured ST-AR / plain step), with lr and self-guided weights warmed up over "
                f"{FINE_TUNE_WARMUP_FRACTION:.0%} of its steps.")
    base = lengths.get(ROUND3_BASELINE, (None, 0))[0]
    return [f"GPT {plan.gpt}, batch {plan.batch_size}, lr {plan.lr}, the fast step ({' '.join(plan.train_flags)}). "
            f"The baseline trains {base} steps, the recipes from scratch {plan.steps}.{tune} Every checkpoint "
            f"({', '.join(f'{f:.0%}' for f in plan.milestones)} of each run, and the baseline's at the steps where "
            f"each recipe ends at equal steps and, predicted, at equal compute): held-out NLL, the probe, "
            f"{fid_label(plan.curve_samples)} without and with CFG {plan.cfg_scale:g}; each run's last checkpoint "
            f"and the baseline's answer checkpoints also {fid_label(plan.num_samples)}. Inception in "
            f"{plan.fid_precision}.", "",
            "Equal compute is training CPU seconds; a fine-tune's count its start's (`total_cpu_s` = the init "
            "checkpoint's `cpu_s` + its own). The baseline's NLL and probe are read linearly between its checkpoints "
            "at the recipe's CPU seconds; its FID at the full count at its nearest checkpoint that has it (named in "
            "each table). Equal steps: a fine-tune's steps count the baseline steps it started from (branch step + "
            "its own).", "",
            "Decision rule: a gap counts when it exceeds two seed spreads (2 x the larger sd of the two arms). A "
            "recipe **pays** when, at equal compute, its FID (without or with CFG) or its held-out NLL is better than "
            "the baseline's beyond the spread, and its probe at the last position leads beyond the spread.", ""]


def record_from_results(results: list[dict], plan, ceiling: dict | None) -> dict:
    """The flat record of a round's finished runs (their result.json): every checkpoint scored at the full sample
    count, with the ceiling. The study writes it beside its report so that the numbers can be kept (committed) apart
    from the run folders; star/study/round3_record.py redraws the answers from it."""
    cfg = f"cfg{plan.cfg_scale:g}"
    measurements = []
    for result in results:
        for point in result["points"]:
            fid = point.get("fid", {}).get(f"n{plan.num_samples}")
            if not fid:
                continue
            measurements.append({"arm": result["arm"], "seed": result["seed"], "step": point["step"],
                                 "fid_no_cfg": fid["cfg1"]["fid"], "fid_cfg": fid[cfg]["fid"],
                                 "nll": point["nll"]["conditional"]["nats_per_token"],
                                 "probe_last": point["probe"]["rows"][-1]["accuracy"]})
    return {"preset": plan.preset, "fid_samples": plan.num_samples, "cfg_scale": plan.cfg_scale,
            "ceiling": ceiling, "measurements": measurements}


def render_round3(study: dict, plan, out: Path, command: str) -> Path:
    grouped = by_arm(study["results"])
    invocations = study.get("invocations", [])
    fid_name = fid_label(plan.num_samples)
    lines = [f"# Round 3: ST-AR recipes at equal compute (preset: {plan.preset})", "",
             f"Command: `{command}`. Machine: {os.cpu_count()} cores of {cpu_description()[0]}; {plan.jobs} runs side "
             f"by side on {plan.threads_per_job} thread(s) each. Ran in {len(invocations)} invocation(s)"
             + (" (in one piece)." if len(invocations) == 1 else ", each resuming from the stages already finished."),
             "", *settings_lines(plan, study["results"])]
    if unfinished := study.get("unfinished"):
        lines += [f"**Partial report:** {len(unfinished)} planned run(s) not yet trained and scored: "
                  f"{', '.join(unfinished)}. Every answer below uses only the finished runs; rerun "
                  f"`make study PRESET={plan.preset}` (finished stages are skipped) to complete the round.", ""]
    base = grouped.get(ROUND3_BASELINE)
    lines += ceiling_lines(study, plan, base)
    metric_list = answer_metrics(plan.num_samples, plan.cfg_scale)
    recipes = [key for key in grouped if key != ROUND3_BASELINE]
    at_compute_answers = {key: (grouped[key][0]["label"], answer(base, grouped[key], metric_list, "cpu_s"))
                          for key in recipes} if base else {}
    lines += ["## The answers", ""]
    if not at_compute_answers:
        lines += ["(the baseline R1 or every recipe is missing: nothing to compare)", ""]
    else:
        lines += [f"Each recipe's last checkpoint against {base[0]['label']} at equal training compute (negative "
                  "FID / NLL gaps and positive probe gaps favour the recipe):", "",
                  *summary_table(at_compute_answers, fid_name)]
    for key in recipes if base else []:
        label = grouped[key][0]["label"]
        at_steps = answer(base, grouped[key], metric_list, "step")
        lines += [f"### {label} ({len(grouped[key])} seed(s))", "",
                  f"At equal compute ({cpu_text(at_compute_answers[key][1].x)} CPU-s):", "",
                  *answer_table(at_compute_answers[key][1]),
                  f"At equal steps (step {at_steps.x:.0f}):", "", *answer_table(at_steps)]
    curves, finals = metrics(plan.curve_samples, plan.cfg_scale), final_metrics(plan.num_samples, plan.cfg_scale)
    made = figures(grouped, curves, out / "figures") if study["results"] else {}
    lines += ["## Every run at its last checkpoint (mean ± sd over seeds)", "",
              *all_runs_table(grouped, curves, finals),
              "## Figures", "", *[f"![{name}](figures/{path.name})" for name, path in made.items()],
              "", "## Time", "", "Invocations: " + "; ".join(
                  f"{i['started']} → {i.get('ended', 'interrupted')}" for i in invocations), "",
              "By part:", "", *part_lines(study, [arm.key for arm in arm_table(plan.preset)]), "",
              "By stage kind:", "", *time_lines(study)]
    lines += ["", "The numbers behind the answers, apart from the run folders: [measurements.json](measurements.json) "
              "(`python -m star.study.round3_record` redraws the answers from it)."]
    full = {int(n): c for n, c in study["ceilings"].items()}.get(plan.num_samples, {})
    ceiling = {"fid": full.get("fid"), "precision": full.get("precision"), "recall": full.get("recall"),
               "psnr_db": study["vq"].get("holdout_psnr"), "codebook_use": study["vq"].get("holdout_codebook_usage")}
    write_json_atomic(out / "measurements.json", record_from_results(study["results"], plan, ceiling))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

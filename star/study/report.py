"""runs/study/report.md: one table of all arms (mean ± sd over seeds), the gaps against the seed spread, a
plain verdict, the figures and the per-stage timings."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from star import plots
from star.runtime import cpu_description


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one seed)."""
    values = [float(v) for v in values]
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"  # not measured for these runs
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def group(results: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for result in results:
        grouped.setdefault(result["arm"], []).append(result)
    return grouped


def last_probe(result: dict) -> float:
    return result["probe"]["rows"][-1]["accuracy"]


def noise_sd(grouped: dict[str, list[dict]], key: str) -> float | None:
    """The seed spread: the largest sd of FID (`key`) among arms with two or more seeds."""
    sds = [mean_sd([r["eval"][key]["fid"] for r in runs])[1] for runs in grouped.values() if len(runs) > 1]
    return max(sds) if sds else None


def compare(grouped, a: str, b: str, key: str) -> dict | None:
    """FID of arm b minus arm a (negative: b is better), against two seed spreads."""
    if a not in grouped or b not in grouped:
        return None
    fa, fb = ([r["eval"][key]["fid"] for r in grouped[k]] for k in (a, b))
    sd = noise_sd(grouped, key)
    gap = float(np.mean(fb) - np.mean(fa))
    return {"gap": gap, "sd": sd, "exceeds": None if sd is None else abs(gap) > 2 * sd}


def table(grouped: dict[str, list[dict]], cfg_tag: str, cfg_scale: float, n_label: str) -> list[str]:
    head = (f"| arm | seeds | steps | {n_label} no CFG | {n_label} CFG {cfg_scale:g} | prec / rec (no CFG) | "
            f"prec / rec (CFG) | probe, last step | probe, best step | held-out NLL (nats/token) | training loss "
            f"(L_AR) | train s | images/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for runs in grouped.values():
        e = [r["eval"] for r in runs]
        pr = {t: f"{fmt([x[t]['precision'] for x in e], 3)} / {fmt([x[t]['recall'] for x in e], 3)}"
              for t in ("cfg1", cfg_tag)}
        lines.append(
            f"| {runs[0]['label']} | {len(runs)} | {fmt([r['steps'] for r in runs], 0)} | "
            f"{fmt([x['cfg1']['fid'] for x in e])} | {fmt([x[cfg_tag]['fid'] for x in e])} | {pr['cfg1']} | "
            f"{pr[cfg_tag]} | {fmt([last_probe(r) for r in runs], 3)} | "
            f"{fmt([max(row['accuracy'] for row in r['probe']['rows']) for r in runs], 3)} | "
            f"{fmt([r['nll']['conditional']['nats_per_token'] for r in runs if 'nll' in r], 4)} | "
            f"{fmt([r['final_loss_ar'] for r in runs], 3)} | {fmt([r['train_loop_s'] for r in runs], 0)} | "
            f"{fmt([r['images_per_s'] for r in runs], 1)} |")
    return lines


def verdict(grouped, cfg_tag: str) -> list[str]:
    lines = []
    questions = (("3_star", "1_llamagen", "equal epochs"), ("3_star", "2_llamagen_compute", "equal compute"))
    for star_key, base_key, what in questions:
        for tag, name in (("cfg1", "without CFG"), (cfg_tag, "with CFG")):
            c = compare(grouped, base_key, star_key, tag)
            if c is None:
                continue
            better = "beats" if c["gap"] < 0 else "does not beat"
            if c["exceeds"] is None:
                noise = "one seed per arm, so no spread to compare the gap with"
            else:
                noise = (f"the gap {'exceeds' if c['exceeds'] else 'is within'} two seed spreads "
                         f"(2 x sd = {2 * c['sd']:.2f})")
            lines.append(f"- At {what}, {name}: ST-AR {better} LlamaGen by FID "
                         f"({c['gap']:+.2f} = arm 3 - baseline); {noise}.")
    if not lines:
        return ["- Arms 1/2 and 3 were not all run: no verdict."]
    settled = compare(grouped, "2_llamagen_compute", "3_star", "cfg1")
    if settled is None or settled["gap"] >= 0 or not settled["exceeds"]:
        lines.append("- So this study does NOT show ST-AR beating the baseline given the same compute. To find out: "
                     "three or more seeds for arms 2 and 3 (the spread decides), runs long enough that the loss "
                     "curves flatten (more steps or epochs), a larger GPT, and FID-10k against the full test split "
                     "- i.e. more compute than this machine's study budget, most of it Inception features.")
    return lines


def gap_lines(grouped, cfg_tag: str) -> list[str]:
    lines = ["| arm vs arm 1 | FID gap no CFG | > 2 sd? | FID gap CFG | > 2 sd? | probe gap (last step) |",
             "|---|---|---|---|---|---|"]
    base = grouped.get("1_llamagen")
    for key, runs in grouped.items():
        if key == "1_llamagen" or base is None:
            continue
        cells = []
        for tag in ("cfg1", cfg_tag):
            c = compare(grouped, "1_llamagen", key, tag)
            cells += [f"{c['gap']:+.2f}", "n/a" if c["exceeds"] is None else ("yes" if c["exceeds"] else "no")]
        probe_gap = np.mean([last_probe(r) for r in runs]) - np.mean([last_probe(r) for r in base])
        lines.append(f"| {runs[0]['label']} | " + " | ".join(cells) + f" | {probe_gap:+.3f} |")
    return lines


def make_figures(study: dict, figures: Path, cfg_tag: str, cfg_scale: float) -> dict[str, Path]:
    grouped = group(study["results"])
    losses = {f"{r['label']} s{r['seed']}": r["log"] for r in study["results"]}
    probes = {}
    for runs in grouped.values():
        steps = [row["step"] for row in runs[0]["probe"]["rows"]]
        table_ = np.array([[row["accuracy"] for row in r["probe"]["rows"]] for r in runs])  # [seeds, steps]
        probes[runs[0]["label"]] = [{"step": s, "accuracy": float(table_[:, i].mean()),
                                     "spread": float(table_[:, i].std(ddof=1)) if len(runs) > 1 else 0.0}
                                    for i, s in enumerate(steps)]
    labels = [runs[0]["label"] for runs in grouped.values()]
    series = {}
    for tag, name in (("cfg1", "no CFG"), (cfg_tag, f"CFG {cfg_scale:g}")):
        stats = [mean_sd([r["eval"][tag]["fid"] for r in runs]) for runs in grouped.values()]
        series[name] = ([m for m, _ in stats], [s or 0.0 for _, s in stats])
    chance = study["results"][0]["probe"].get("chance") if study["results"] else None
    return {
        "loss": plots.plot_loss_curves(losses, figures / "loss_curves.png"),
        "probe": plots.plot_probe_curves(probes, figures / "probe_by_step.png", chance=chance),
        "fid": plots.plot_fid_bars(labels, series, figures / "fid_per_arm.png", ceiling=study["ceiling"]["fid"]),
        "samples": plots.plot_sample_grids({runs[0]["label"] + f" (CFG {cfg_scale:g})": runs[0]["eval"][cfg_tag]["grid"]
                                            for runs in grouped.values()}, figures / "samples_per_arm.png"),
    }


BF16_NOTE = ": these FIDs compare with each other, not with fp32 FIDs elsewhere"


def fid_label(num_samples: int) -> str:
    """FID-5k for 5,000 samples, FID-200 for 200: FIDs compare only at the same N."""
    return f"FID-{num_samples // 1000}k" if num_samples >= 1000 else f"FID-{num_samples}"


def render(study: dict, plan, out: Path, command: str) -> Path:
    cfg_tag = f"cfg{plan.cfg_scale:g}"
    grouped = group(study["results"])
    figures = make_figures(study, out / "figures", cfg_tag, plan.cfg_scale) if study["results"] else {}
    n = study["results"][0]["eval"]["cfg1"]["num_samples"] if study["results"] else plan.num_samples
    ref_n = study["ceiling"].get("num_reference", "?")
    n_label = fid_label(n)
    vq, ceiling = study["vq"], study["ceiling"]
    stage_total = sum(wall for wall, _ in study["stage_seconds"].values())
    lines = [f"# ST-AR vs LlamaGen on Fashion-MNIST (preset: {plan.preset})", "",
             f"Command: `{command}`. Machine: {os.cpu_count()} cores of {cpu_description()[0]},"
             f" {study['seconds'] / 60:.1f} min wall this invocation; the stages of every finished run add up to"
             f" {stage_total / 60:.0f} min wall (roughly a fresh run's cost here; per-stage times below).", "",
             f"Data: `{plan.data}` (train {plan.data / 'train'}, FID reference = the {ref_n} test images). "
             f"GPT: {plan.gpt}. Batch {plan.batch_size}, lr {plan.lr}, {plan.steps} steps for equal-epoch arms. "
             f"{n_label}: {n} samples per arm and setting, class-balanced, against the {ref_n} test images "
             f"(clean-fid features, Inception in {plan.fid_precision}{BF16_NOTE if plan.fid_precision == 'bf16' else ''})."
             f" Probe: middle layer, null class, view 0 of the first {plan.probe_limit} train "
             f"images vs every test image's centre crop.", "",
             "## Result", "", *verdict(grouped, cfg_tag), "",
             "## All arms (mean ± sd over seeds)", "", *table(grouped, cfg_tag, plan.cfg_scale, n_label), "",
             f"VQ ceiling ({ceiling['num_samples']} test images' tokens decoded, class-balanced): "
             f"{fid_label(ceiling['num_samples'])} {ceiling['fid']:.2f}, precision {ceiling['precision']:.3f}, "
             f"recall {ceiling['recall']:.3f}; VQ held-out PSNR {vq['holdout_psnr']:.2f} dB, codebook usage "
             f"{100 * vq['holdout_codebook_usage']:.1f}% ({vq.get('holdout_codes_used', '?')} codes).", "",
             "## Gaps against the seed spread", "",
             "A gap counts as real when it exceeds two seed spreads (2 x the largest sd among multi-seed arms).", "",
             *gap_lines(grouped, cfg_tag), ""]
    for result in study["results"]:
        if result.get("equal_compute"):
            c = result["equal_compute"]
            unit = c.get("unit", "s")
            lines.append(f"Arm 2 (seed {result['seed']}): arm 3 trained {c['time_arm3_s']:.0f} {unit}, arm 1 "
                         f"{c['time_arm1_s']:.0f} {unit} (ratio {c['ratio']:.2f}) -> {c['steps']} steps."
                         + (" WARNING: a ratio this low means other jobs disturbed the timing; rerun arms 1-3 on a "
                            "quiet machine (delete arms/2_llamagen_compute first)." if c["ratio"] < 1.2 else ""))
    decays = sorted({(r["arm"], r["teacher_decay"]) for r in study["results"] if "star" in r["arm"]})
    lines += ["", "Teacher decays: " + ", ".join(f"{k} {d:g}" for k, d in decays), "", "## Figures", ""]
    lines += [f"![{name}](figures/{path.name})" for name, path in figures.items()]
    lines += ["", "## Time per stage", "", "Wall and CPU seconds (user + system, all threads) per stage; on a machine "
              "shared with other jobs the CPU time is the better guide to an idle run.", "",
              "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {name} | {wall:.0f} | {'?' if cpu is None else f'{cpu:.0f}'} |"
              for name, (wall, cpu) in study["stage_seconds"].items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

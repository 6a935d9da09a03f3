"""The long preset (`make study PRESET=long`): does ST-AR help once runs are long enough for the problem it
fixes to appear? Every run is checkpointed at fixed fractions of its length and scored at each checkpoint
(held-out NLL with and without the label, the probe, FID without and with CFG), so the comparison at equal
steps and at equal compute is read off curves rather than off one extra arm.

Order of work: the shared stages (data, VQ, tokens, the VQ ceiling); every run trained, `plan.jobs` side by
side; the held-out NLL of the candidate ST-AR arms' last checkpoints, and one more seed for the best of them;
every checkpoint scored. Each stage is one of the project's commands, skipped when already done, so an
interrupted study resumes where it stopped.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from star.checkpoint_folder import RUN_LOG
from star.checkpoint_folder import checkpoint_folder as run_checkpoint_folder
from star.io import write_json_atomic
from star.study import commands
from star.study.arms import Arm
from star.study.pipeline import stage_ceiling, stage_tokenize, stage_vq, vq_files, write_model_json
from star.study.stages import StageFailed, StudyPlan, run_stage, stage_times, timed_inline, write_plan_record

_print_lock = threading.Lock()


def run_dir(plan: StudyPlan, arm: Arm, seed: int) -> Path:
    return plan.out / "arms" / arm.key / f"seed{seed}"


def arm_steps(plan: StudyPlan, arm: Arm) -> int:
    return plan.short_steps if arm.short else round(plan.steps * arm.length)


def milestone_steps(plan: StudyPlan, arm: Arm) -> list[int]:
    """The checkpointed and scored steps: the preset's fractions of its steps (shared by every long arm, for
    comparisons at equal steps), then the same fractions of a longer arm's own length; a short run's last step."""
    steps = arm_steps(plan, arm)
    if arm.short:
        return [steps]
    common = {max(1, round(fraction * plan.steps)) for fraction in plan.milestones}
    beyond = {round(fraction * steps) for fraction in plan.milestones if fraction * steps > plan.steps}
    return sorted({step for step in common if step <= steps} | beyond | {steps})


def seeds_of(plan: StudyPlan, arm: Arm) -> list[int]:
    return list(plan.main_seeds if arm.main else plan.other_seeds)


def extra_seed(plan: StudyPlan) -> int:
    return max(plan.other_seeds) + 1


def in_parallel(plan: StudyPlan, tasks: list[tuple[str, Callable[[], object]]]) -> list:
    """Run named tasks `plan.jobs` at a time; every task runs even when one fails, then the failures raise."""
    failures: list[str] = []

    def guarded(name: str, task: Callable[[], object]):
        try:
            return task()
        except StageFailed as error:
            with _print_lock:
                print(f"  [fail] {name}: {error}", flush=True)
            failures.append(f"{name}: {error}")
            return None

    with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
        results = list(pool.map(lambda item: guarded(*item), tasks))
    if failures:
        raise StageFailed(f"{len(failures)} task(s) failed:\n  " + "\n  ".join(failures))
    return results


# ----------------------------------------------------------------------------------------------------------
# Training and scoring one run


def train_run(plan: StudyPlan, arm: Arm, seed: int) -> dict:
    steps, milestones = arm_steps(plan, arm), milestone_steps(plan, arm)
    flags = [*arm.flags, *([] if arm.star else ["--no-star"]), *plan.train_flags]
    if len(milestones) > 1:
        flags += ["--ckpt-at", ",".join(str(step) for step in milestones[:-1])]
    train_dir = run_dir(plan, arm, seed) / "train"
    return run_stage(plan, f"train_{arm.key}_seed{seed}", commands.train_argv(
        plan.out / "shards" / "train", train_dir, plan.model_json, steps, plan.batch_size, plan.lr, seed, flags),
        [train_dir / RUN_LOG])


def checkpoint_folder(plan: StudyPlan, arm: Arm, seed: int, step: int) -> Path:
    return run_checkpoint_folder(run_dir(plan, arm, seed) / "train", step)


def nll_at(plan: StudyPlan, arm: Arm, seed: int, step: int) -> dict:
    out = run_dir(plan, arm, seed) / "eval" / f"step{step}" / "nll.json"
    run_stage(plan, f"nll_{arm.key}_seed{seed}_step{step}", commands.nll_argv(
        checkpoint_folder(plan, arm, seed, step), plan.out / "shards" / "test", out), [out])
    return json.loads(out.read_text())


def fid_at(plan: StudyPlan, arm: Arm, seed: int, step: int, num_samples: int, cfg: float) -> dict:
    vq_ckpt, vq_config = vq_files(plan)
    name = f"{arm.key}_seed{seed}_step{step}_n{num_samples}_cfg{cfg:g}"
    samples = run_dir(plan, arm, seed) / "eval" / f"step{step}" / f"samples_n{num_samples}_cfg{cfg:g}"
    run_stage(plan, f"sample_{name}", commands.sample_argv(checkpoint_folder(plan, arm, seed, step), samples,
                                                           vq_ckpt, vq_config, cfg, num_samples, seed),
              [samples / "samples.npz"])
    metrics = samples / "metrics.json"
    run_stage(plan, f"fid_{name}", commands.fid_argv(samples / "samples.npz", plan.data / "test", metrics,
                                                     plan.out / "fid_cache", plan.fid_precision), [metrics])
    return {**json.loads(metrics.read_text()), "grid": str(samples / "grid.png")}


def probe_at(plan: StudyPlan, arm: Arm, seed: int, step: int) -> dict:
    out = run_dir(plan, arm, seed) / "eval" / f"step{step}" / "probe"
    run_stage(plan, f"probe_{arm.key}_seed{seed}_step{step}", commands.probe_argv(
        checkpoint_folder(plan, arm, seed, step), plan.out / "shards" / "train", plan.out / "shards" / "test", out,
        plan.probe_positions, plan.probe_limit), [out / "probe.json"])
    return json.loads((out / "probe.json").read_text())


def score_checkpoint(plan: StudyPlan, arm: Arm, seed: int, step: int) -> dict:
    """Everything measured at one checkpoint; the run's last one also gets FID at the full sample count."""
    last = step == arm_steps(plan, arm)
    counts = [plan.curve_samples] + ([plan.num_samples] if last and not arm.short else [])
    fids = {f"n{n}": {f"cfg{cfg:g}": fid_at(plan, arm, seed, step, n, cfg) for cfg in (1.0, plan.cfg_scale)}
            for n in counts}
    return {"step": step, "nll": nll_at(plan, arm, seed, step), "probe": probe_at(plan, arm, seed, step),
            "fid": fids}


def read_log(plan: StudyPlan, arm: Arm, seed: int) -> list[dict]:
    log = run_dir(plan, arm, seed) / "train" / RUN_LOG
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def run_result(plan: StudyPlan, arm: Arm, seed: int, scored: list[dict]) -> dict:
    """One run's record for the report: its checkpoints' scores with the training compute spent to reach each."""
    log = read_log(plan, arm, seed)
    by_step = {record["step"]: record for record in log}
    config = json.loads((run_dir(plan, arm, seed) / "train" / "config.json").read_text())
    points = [{**point, "cpu_s": by_step[point["step"]].get("cpu_s"), "train_loss": by_step[point["step"]]["loss"],
               "train_loss_ar": by_step[point["step"]]["loss_ar"]} for point in scored]
    result = {"arm": arm.key, "label": arm.label, "seed": seed, "steps": arm_steps(plan, arm), "short": arm.short,
              "star": arm.star, "teacher_decay": (config["star"] or {}).get("teacher_decay"), "points": points,
              "log": [{k: r.get(k) for k in ("step", "loss", "loss_ar", "cpu_s", "time")} for r in log]}
    write_json_atomic(run_dir(plan, arm, seed) / "result.json", result)
    return result


# ----------------------------------------------------------------------------------------------------------
# The study


def best_candidate(plan: StudyPlan, arms: list[Arm],
                   final_nll: Callable[[Arm, int], float] | None = None) -> tuple[Arm | None, dict]:
    """The candidate ST-AR arm with the lowest mean held-out NLL (with the label) at its last checkpoint.
    final_nll(arm, seed): that NLL for one run; by default from the run's nll stage (run if not yet done)."""
    if final_nll is None:
        def final_nll(arm: Arm, seed: int) -> float:
            return nll_at(plan, arm, seed, arm_steps(plan, arm))["conditional"]["nats_per_token"]
    means = {}
    for arm in (a for a in arms if a.candidate):
        means[arm.key] = float(np.mean([final_nll(arm, seed) for seed in seeds_of(plan, arm)]))
    if not means:
        return None, means
    best = min(means, key=means.get)
    return next(arm for arm in arms if arm.key == best), means


def shared_stages(plan: StudyPlan, prepare_data) -> tuple[dict, dict]:
    timed_inline(plan, "data", prepare_data, [plan.data / "train" / "complete.json",
                                              plan.data / "test" / "complete.json"])
    vq_metrics = stage_vq(plan)
    stage_tokenize(plan)
    ceilings = {n: stage_ceiling(plan, n) for n in sorted({plan.curve_samples, plan.num_samples})}
    write_model_json(plan)
    return vq_metrics, ceilings


def record_invocation(plan: StudyPlan, ended: bool = False) -> list[dict]:
    """invocations.json: when each invocation of the study began and whether it finished (the report says
    whether the study ran in one piece)."""
    path = plan.out / "invocations.json"
    invocations = json.loads(path.read_text()) if path.is_file() else []
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    if ended:
        invocations[-1]["ended"] = now
    else:
        invocations.append({"started": now})
    write_json_atomic(path, invocations)
    return invocations


def collect_long_finished(plan: StudyPlan) -> dict:
    """--report-only: the finished runs' records (result.json), nothing is run."""
    keys = [arm.key for arm in plan.arms]
    results = [json.loads(path.read_text()) for path in sorted((plan.out / "arms").glob("*/seed*/result.json"))]
    results = sorted((r for r in results if r["arm"] in keys), key=lambda r: (keys.index(r["arm"]), r["seed"]))
    if not results:
        raise FileNotFoundError(f"no finished runs under {plan.out / 'arms'}: run the study first (without "
                                "--report-only)")
    ceilings = {}
    for count in sorted({plan.curve_samples, plan.num_samples}):
        folder = plan.out / "vq" / ("ceiling" if count == plan.num_samples else f"ceiling_n{count}")
        ceilings[count] = json.loads((folder / "metrics.json").read_text())
    invocations = plan.out / "invocations.json"
    unfinished = [f"{arm.key} seed {seed}" for arm in plan.arms for seed in seeds_of(plan, arm)
                  if not (run_dir(plan, arm, seed) / "result.json").is_file()]
    candidates = [arm for arm in plan.arms if arm.candidate]  # a short arm's third seed is not the extra one
    best = next((r["arm"] for r in results
                 if r["seed"] == extra_seed(plan) and r["arm"] in {arm.key for arm in candidates}), None)
    nll_means = {}
    if plan.extra_seed_for_best and best is None:
        run_results = {(r["arm"], r["seed"]): r for r in results}
        if candidates and all((arm.key, seed) in run_results for arm in candidates for seed in seeds_of(plan, arm)):
            # every candidate's planned seeds are scored: the best is known before its extra seed is (read from
            # the results, since --report-only runs nothing)
            best_arm, nll_means = best_candidate(plan, candidates, lambda arm, seed: run_results[(arm.key, seed)][
                "points"][-1]["nll"]["conditional"]["nats_per_token"])
            best = best_arm.key
        unfinished.append(f"{best} seed {extra_seed(plan)}" if best else
                          f"seed {extra_seed(plan)} of the best ST-AR arm by held-out NLL")
    return {"vq": json.loads((plan.out / "vq" / "metrics.json").read_text()), "ceilings": ceilings,
            "results": results, "best_candidate": best, "candidate_nll": nll_means, "seconds": 0.0,
            "stage_seconds": stage_times(plan), "unfinished": unfinished,
            "invocations": json.loads(invocations.read_text()) if invocations.is_file() else []}


def run_long_study(plan: StudyPlan, prepare_data, train_only: bool = False) -> dict:
    plan.out.mkdir(parents=True, exist_ok=True)
    write_plan_record(plan)
    record_invocation(plan)
    started = time.time()
    vq_metrics, ceilings = shared_stages(plan, prepare_data)
    runs = [(arm, seed) for arm in plan.arms for seed in seeds_of(plan, arm)]
    in_parallel(plan, [(f"train {a.key} seed {s}", lambda a=a, s=s: train_run(plan, a, s)) for a, s in runs])
    best, nll_means = best_candidate(plan, plan.arms) if plan.extra_seed_for_best else (None, {})
    if best is not None:
        print(f"== best ST-AR arm by held-out NLL: {best.key} ({nll_means}); seed {extra_seed(plan)} added", flush=True)
        runs.append((best, extra_seed(plan)))
        train_run(plan, best, extra_seed(plan))
    if train_only:
        record_invocation(plan, ended=True)
        return {}
    tasks = [(f"score {a.key} seed {s} step {step}", lambda a=a, s=s, step=step: (a, s, score_checkpoint(plan, a, s, step)))
             for a, s in runs for step in milestone_steps(plan, a)]
    scored: dict[tuple[str, int], list[dict]] = {}
    for arm, seed, point in in_parallel(plan, tasks):
        scored.setdefault((arm.key, seed), []).append(point)
    results = [run_result(plan, arm, seed, sorted(scored[(arm.key, seed)], key=lambda p: p["step"]))
               for arm, seed in runs]
    return {"vq": vq_metrics, "ceilings": ceilings, "results": results, "best_candidate": best.key if best else None,
            "candidate_nll": nll_means, "seconds": time.time() - started, "stage_seconds": stage_times(plan),
            "invocations": record_invocation(plan, ended=True)}

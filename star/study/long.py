"""The long preset (`make study PRESET=long`): does ST-AR help once runs are long enough for the problem it
fixes to appear? Every run is checkpointed at fixed fractions of its length and scored at each checkpoint
(held-out NLL with and without the label, the probe, FID without and with CFG), so the comparison at equal
steps and at equal compute is read off curves rather than off one extra arm.

Order of work: the shared stages (data, VQ, tokens, the VQ ceiling); every run trained, `plan.jobs` side by
side, a fine-tune (an arm with `fine_tune_of`: round3's R4, the GPU preset's L8) after the run it continues; the
held-out NLL of the candidate ST-AR arms' last checkpoints, and one more seed for the best of them;
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
from star.study.long_arms import FINE_TUNE_WARMUP_FRACTION, arm_table, baseline_arm
from star.study.pipeline import stage_ceiling, stage_tokenize, stage_vq, vq_files, write_model_json
from star.study.stages import StageFailed, StudyPlan, run_stage, stage_times, timed_inline, write_plan_record

_print_lock = threading.Lock()


def run_dir(plan: StudyPlan, arm: Arm, seed: int) -> Path:
    return plan.out / "arms" / arm.key / f"seed{seed}"


def arm_steps(plan: StudyPlan, arm: Arm) -> int:
    if arm.fine_tune_of:
        return fine_tune_steps(plan, arm)
    return plan.short_steps if arm.short else round(plan.steps * arm.length)


def table_arm(plan: StudyPlan, key: str) -> Arm:
    return next(arm for arm in arm_table(plan.preset) if arm.key == key)


def branch_step(plan: StudyPlan, arm: Arm) -> int:
    """Where a fine-tune starts: the step of its base arm's checkpoint, init_fraction of that arm's run."""
    return round(arm.init_fraction * arm_steps(plan, table_arm(plan, arm.fine_tune_of)))


def fine_tune_steps(plan: StudyPlan, arm: Arm) -> int:
    """A fine-tune's own steps: the base run's steps after the branch, (1 - f) x S, divided by the fine-tune step's
    cost in plain steps, so that branch + fine-tune costs what the whole base run does."""
    base_steps = arm_steps(plan, table_arm(plan, arm.fine_tune_of))
    return max(1, round((base_steps - branch_step(plan, arm)) / arm.step_cost))


def step_offset(plan: StudyPlan, arm: Arm) -> int:
    """The steps a run started from: a fine-tune's branch step (its steps count on from its base's), else 0."""
    return branch_step(plan, arm) if arm.fine_tune_of else 0


def answer_steps(plan: StudyPlan, arm: Arm) -> list[int]:
    """plan.equal_compute_checkpoints: the baseline's steps where every other long arm of the table ends, at equal
    steps (a fine-tune counting its base's steps) and at equal compute (its steps x step_cost, plus a fine-tune's
    branch), within the baseline's run; [] for any other arm."""
    table = arm_table(plan.preset)
    if not plan.equal_compute_checkpoints or arm != baseline_arm(table):
        return []
    points = set()
    for other in (other for other in table if other != arm and not other.short):
        own, offset = arm_steps(plan, other), step_offset(plan, other)
        points |= {offset + own, round(offset + own * other.step_cost)}
    return sorted({min(point, arm_steps(plan, arm)) for point in points})


def milestone_steps(plan: StudyPlan, arm: Arm) -> list[int]:
    """The checkpointed and scored steps: the preset's fractions of its steps (shared by every long arm, for
    comparisons at equal steps), then the same fractions of a longer arm's own length, the steps fine-tunes branch
    off at and the answer steps; a fine-tune's: the fractions of its own steps; a short run's last step."""
    steps = arm_steps(plan, arm)
    if arm.short:
        return [steps]
    if arm.fine_tune_of:
        return sorted({max(1, round(fraction * steps)) for fraction in plan.milestones} | {steps})
    common = {max(1, round(fraction * plan.steps)) for fraction in plan.milestones}
    beyond = {round(fraction * steps) for fraction in plan.milestones if fraction * steps > plan.steps}
    branches = {branch_step(plan, other) for other in arm_table(plan.preset) if other.fine_tune_of == arm.key}
    return sorted({step for step in common if step <= steps} | beyond | branches | set(answer_steps(plan, arm))
                  | {steps})


def full_fid_steps(plan: StudyPlan, arm: Arm) -> list[int]:
    """The checkpoints also scored with num_samples: a long run's last, and the baseline's answer steps."""
    return [] if arm.short else sorted({arm_steps(plan, arm), *answer_steps(plan, arm)})


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


def init_checkpoint(plan: StudyPlan, arm: Arm, seed: int) -> Path:
    """The checkpoint a fine-tune starts from: its base arm's, of the same seed, at the branch step."""
    return checkpoint_folder(plan, table_arm(plan, arm.fine_tune_of), seed, branch_step(plan, arm))


def fine_tune_flags(plan: StudyPlan, arm: Arm, seed: int) -> list[str]:
    start = init_checkpoint(plan, arm, seed)
    if not (start / "meta.json").is_file():
        raise StageFailed(f"{arm.key} seed {seed} continues {arm.fine_tune_of} seed {seed} from its checkpoint at step "
                          f"{branch_step(plan, arm)}, and {start} does not exist: train {arm.fine_tune_of} first "
                          f"(--arms {arm.fine_tune_of.split('_')[0]},{arm.key.split('_')[0]})")
    return commands.fine_tune_flags(start, max(1, round(FINE_TUNE_WARMUP_FRACTION * arm_steps(plan, arm))))


def train_run(plan: StudyPlan, arm: Arm, seed: int) -> dict:
    steps, milestones = arm_steps(plan, arm), milestone_steps(plan, arm)
    flags = [*arm.flags, *([] if arm.star else ["--no-star"]), *plan.train_flags]
    if len(milestones) > 1:
        flags += ["--ckpt-at", ",".join(str(step) for step in milestones[:-1])]
    if arm.fine_tune_of:
        flags += fine_tune_flags(plan, arm, seed)
    train_dir = run_dir(plan, arm, seed) / "train"
    return run_stage(plan, f"train_{arm.key}_seed{seed}", commands.train_argv(
        plan.out / "shards" / "train", train_dir, plan.model_json, steps, plan.batch_size, plan.lr, seed, flags),
        [train_dir / RUN_LOG])


def checkpoint_folder(plan: StudyPlan, arm: Arm, seed: int, step: int) -> Path:
    return run_checkpoint_folder(run_dir(plan, arm, seed) / "train", step)


def train_all(plan: StudyPlan, runs: list[tuple[Arm, int]],
              train: Callable[[Arm, int], object] | None = None) -> None:
    """Train every run, plan.jobs side by side, seed by seed. A fine-tune is queued after every other run of its
    seed and starts only once the run it continues (same seed) has finished, when its branch checkpoint is
    complete; it fails if that run failed. Queued after it, a waiting fine-tune only ever waits for a run already
    started."""
    train = train or (lambda arm, seed: train_run(plan, arm, seed))
    finished = {(arm.key, seed): threading.Event() for arm, seed in runs}
    failed: set[tuple[str, int]] = set()

    def task(arm: Arm, seed: int):
        base = (arm.fine_tune_of, seed)
        if base in finished:
            finished[base].wait()
            if base in failed:
                raise StageFailed(f"{arm.key} seed {seed} not trained: {arm.fine_tune_of} seed {seed}, which it "
                                  "continues, failed")
        try:
            return train(arm, seed)
        except BaseException:
            failed.add((arm.key, seed))
            raise
        finally:
            finished[(arm.key, seed)].set()

    # seed-major, so that a study stopped part way has one seed of every arm; within a seed, fine-tunes come last
    # (stable: in their order), after the run they continue
    ordered = sorted(runs, key=lambda run: (run[1], bool(run[0].fine_tune_of)))
    in_parallel(plan, [(f"train {a.key} seed {s}", lambda a=a, s=s: task(a, s)) for a, s in ordered])


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
    """Everything measured at one checkpoint; a long run's last one (and the baseline's answer steps) also get FID
    at the full sample count."""
    counts = [plan.curve_samples] + ([plan.num_samples] if step in full_fid_steps(plan, arm) else [])
    fids = {f"n{n}": {f"cfg{cfg:g}": fid_at(plan, arm, seed, step, n, cfg) for cfg in (1.0, plan.cfg_scale)}
            for n in counts}
    return {"step": step, "nll": nll_at(plan, arm, seed, step), "probe": probe_at(plan, arm, seed, step),
            "fid": fids}


def read_log(plan: StudyPlan, arm: Arm, seed: int) -> list[dict]:
    log = run_dir(plan, arm, seed) / "train" / RUN_LOG
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def run_result(plan: StudyPlan, arm: Arm, seed: int, scored: list[dict]) -> dict:
    """One run's record for the report: its checkpoints' scores with the training compute spent to reach each.
    `cpu_s` is the run's own; `total_cpu_s` adds a fine-tune's start (its init checkpoint's cpu_s), and
    `total_step` the steps it started from: a fine-tune's point on its baseline's axes."""
    log = read_log(plan, arm, seed)
    by_step = {record["step"]: record for record in log}
    config = json.loads((run_dir(plan, arm, seed) / "train" / "config.json").read_text())
    offset = step_offset(plan, arm)
    points = [{**point, "cpu_s": by_step[point["step"]].get("cpu_s"),
               "total_cpu_s": by_step[point["step"]].get("total_cpu_s", by_step[point["step"]].get("cpu_s")),
               "total_step": offset + point["step"], "train_loss": by_step[point["step"]]["loss"],
               "train_loss_ar": by_step[point["step"]]["loss_ar"]} for point in scored]
    result = {"arm": arm.key, "label": arm.label, "seed": seed, "steps": arm_steps(plan, arm), "short": arm.short,
              "star": arm.star, "teacher_decay": (config["star"] or {}).get("teacher_decay"), "points": points,
              "step_offset": offset, "total_steps": offset + arm_steps(plan, arm),
              "init_cpu_s": config.get("init_cpu_s", 0.0), "init_from": arm.fine_tune_of or None,
              "log": [{k: r.get(k) for k in ("step", "loss", "loss_ar", "cpu_s", "total_cpu_s", "time")} for r in log]}
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
    train_all(plan, runs)
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

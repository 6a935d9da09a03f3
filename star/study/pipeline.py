"""The study's orchestration: data -> VQ -> tokens -> one training run per (arm, seed) -> samples, FID and
probe per run -> report. Every stage is one of the project's own commands (star/study/commands.py), run by
star/study/stages.py: skipped when done, so a rerun resumes where the last one stopped (and the commands
themselves resume inside a stage).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from star.checkpoint_folder import RUN_LOG
from star.io import write_json_atomic
from star.study import commands
from star.study.arms import Arm, arm_seeds
from star.study.stages import (
    StageFailed,
    StudyPlan,
    run_stage,
    stage_times,
    timed_inline,
    write_plan_record,
)

VQ_CONFIG = {"codebook_size": 512, "codebook_embed_dim": 8, "encoder_ch_mult": [1, 2, 2], "decoder_ch_mult": [1, 2, 2],
             "z_channels": 64, "ch": 32, "num_res_blocks": 1}


# ----------------------------------------------------------------------------------------------------------
# Shared stages


def stage_vq(plan: StudyPlan) -> dict:
    folder = plan.out / "vq"
    folder.mkdir(parents=True, exist_ok=True)
    config_in = folder / "vq_config_in.json"
    if not config_in.is_file():
        write_json_atomic(config_in, {"config": {**VQ_CONFIG, "codebook_size": plan.codebook_size}})
    run_stage(plan, "vq_train", commands.vq_train_argv(plan.data / "train", folder, config_in, plan.vq_steps,
                                                       plan.vq_batch_size, plan.vq_flags),
              [folder / "vq.pt", folder / "metrics.json"],
              side_by_side=False)
    return json.loads((folder / "metrics.json").read_text())


def vq_files(plan: StudyPlan) -> tuple[Path, Path]:
    return plan.out / "vq" / "vq.pt", plan.out / "vq" / "vq.json"


def stage_tokenize(plan: StudyPlan) -> None:
    vq_ckpt, vq_config = vq_files(plan)
    for split, views in (("train", "tencrop"), ("test", "center")):
        shards = plan.out / "shards" / split
        run_stage(plan, f"tokenize_{split}", commands.tokenize_argv(plan.data / split, shards, vq_ckpt, vq_config,
                                                                    views), [shards / "manifest.json"],
                  side_by_side=False)


def balanced_subset(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first count // classes samples of every class (all of them when count covers the split):
    the ceiling is scored on as many images, as class-balanced, as each arm's samples (FID is biased by N)."""
    classes = np.unique(labels)
    per_class = count // len(classes)
    if count >= len(labels) or per_class == 0:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes]))


def decode_test_tokens(plan: StudyPlan, npz: Path, count: int) -> None:
    """Test centre-crop tokens decoded by the VQ: the images the best possible generator would produce, as many
    (class-balanced) as one arm's samples."""
    import torch

    from star.data.manifest import shard_tokens
    from star.eval.sample import tokens_to_uint8
    from star.io import atomic_path
    from star.vq.model import VQConfig, load_vq

    vq_ckpt, vq_config = vq_files(plan)
    tokens, labels = shard_tokens(plan.out / "shards" / "test", view=0)  # [N, 64]
    keep = balanced_subset(labels, count)
    tokens, labels = tokens[keep], labels[keep]
    vq = load_vq(vq_ckpt, VQConfig.resolve(vq_config))
    images = np.concatenate([tokens_to_uint8(vq, torch.from_numpy(tokens[i : i + 500]), int(tokens.shape[1] ** 0.5))
                             for i in range(0, len(tokens), 500)])  # [N, 32, 32, 3]
    npz.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(npz) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, arr_0=images, labels=labels)


def stage_ceiling(plan: StudyPlan, count: int = 0) -> dict:
    """FID of `count` (default: an arm's num_samples) test images decoded from their tokens."""
    count = count or plan.num_samples
    suffix = "" if count == plan.num_samples else f"_n{count}"
    folder = plan.out / "vq" / f"ceiling{suffix}"
    npz, metrics = folder / "samples.npz", folder / "metrics.json"
    timed_inline(plan, f"ceiling_decode{suffix}", lambda: decode_test_tokens(plan, npz, count), [npz])
    run_stage(plan, f"ceiling_fid{suffix}", commands.fid_argv(npz, plan.data / "test", metrics,
                                                                plan.out / "fid_cache", plan.fid_precision), [metrics],
              side_by_side=False)
    return json.loads(metrics.read_text())


def write_model_json(plan: StudyPlan) -> None:
    manifest = json.loads((plan.out / "shards" / "train" / "manifest.json").read_text())
    config = {**plan.gpt, "vocab_size": int(manifest["codebook_size"])}
    if not plan.model_json.is_file() or json.loads(plan.model_json.read_text()) != config:
        write_json_atomic(plan.model_json, config)


# ----------------------------------------------------------------------------------------------------------
# One run = (arm, seed)


def run_folder(plan: StudyPlan, arm: Arm, seed: int) -> Path:
    return plan.out / "arms" / arm.key / f"seed{seed}"


def train_seconds(run: Path) -> float | None:
    """The training loop's own clock (the last log record's `time`): startup and evaluation excluded."""
    log = run / "train" / RUN_LOG
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return float(records[-1]["time"]) if records else None


def train_cost(plan: StudyPlan, arm: Arm, seed: int) -> tuple[float | None, str]:
    """A training run's compute: the CPU seconds of its stage (less exposed than wall time to other jobs on a
    shared machine; wall x cores on an idle one), else the training loop's own clock."""
    marker = plan.out / "stages" / f"train_{arm.key}_seed{seed}.json"
    if marker.is_file() and json.loads(marker.read_text()).get("cpu_seconds"):
        return float(json.loads(marker.read_text())["cpu_seconds"]), "CPU s"
    return train_seconds(run_folder(plan, arm, seed)), "loop wall s"


def equal_compute_steps(plan: StudyPlan, arms_by_key: dict[str, Arm], seed: int) -> tuple[int, dict]:
    """Arm 2's steps: steps_1 x (arm 3 compute / arm 1 compute), measured on the same seed (else a main seed)."""
    for candidate in [seed, *plan.main_seeds]:
        (t1, unit1), (t3, unit3) = (train_cost(plan, arms_by_key[k], candidate) for k in ("1_llamagen", "3_star"))
        if t1 and t3 and unit1 == unit3:
            break
    else:
        raise StageFailed("arm 2 (equal compute) needs the measured training times of arms 1 and 3: run them first "
                          "(--arms 1,3 or include them in --arms)")
    # ST-AR does strictly more work per step; a ratio below 1 means other jobs disturbed the timing
    steps = max(plan.steps, round(plan.steps * t3 / t1))
    return steps, {"time_arm1_s": t1, "time_arm3_s": t3, "unit": unit1, "ratio": t3 / t1, "from_seed": candidate,
                   "disturbed": t3 / t1 < 1.2}


def arm_train_flags(plan: StudyPlan, arm: Arm, steps: int) -> list[str]:
    flags = list(arm.flags)
    if not arm.star:
        flags.append("--no-star")
    return flags


def run_arm_seed(plan: StudyPlan, arm: Arm, seed: int, arms_by_key: dict[str, Arm]) -> dict:
    folder = run_folder(plan, arm, seed)
    name = f"{arm.key}_seed{seed}"
    vq_ckpt, vq_config = vq_files(plan)
    steps, compute = plan.steps, None
    if arm.equal_compute:
        recorded = folder / "equal_compute.json"  # fixed once chosen, so a rerun resumes the same run
        if recorded.is_file():
            compute = json.loads(recorded.read_text())
            steps = compute["steps"]
        else:
            steps, compute = equal_compute_steps(plan, arms_by_key, seed)
            compute["steps"] = steps
            write_json_atomic(recorded, compute)
    train_dir = folder / "train"
    train = run_stage(plan, f"train_{name}", commands.train_argv(
        plan.out / "shards" / "train", train_dir, plan.model_json, steps, plan.batch_size, plan.lr, seed,
        arm_train_flags(plan, arm, steps)), [train_dir / RUN_LOG])
    evaluations = {}
    for cfg in (1.0, plan.cfg_scale):
        tag = f"cfg{cfg:g}"
        samples = folder / f"samples_{tag}"
        run_stage(plan, f"sample_{name}_{tag}", commands.sample_argv(train_dir, samples, vq_ckpt, vq_config, cfg,
                                                                     plan.num_samples, seed),
                  [samples / "samples.npz"])
        metrics = samples / "metrics.json"
        fid = run_stage(plan, f"fid_{name}_{tag}", commands.fid_argv(samples / "samples.npz", plan.data / "test",
                                                                     metrics, plan.out / "fid_cache",
                                                                     plan.fid_precision), [metrics])
        evaluations[tag] = {**json.loads(metrics.read_text()), "fid_seconds": fid["seconds"],
                            "grid": str(samples / "grid.png")}
    probe_dir = folder / "probe"
    run_stage(plan, f"probe_{name}", commands.probe_argv(train_dir, plan.out / "shards" / "train",
                                                         plan.out / "shards" / "test", probe_dir,
                                                         plan.probe_positions, plan.probe_limit),
              [probe_dir / "probe.json"])
    nll = folder / "nll.json"
    run_stage(plan, f"nll_{name}", commands.nll_argv(train_dir, plan.out / "shards" / "test", nll), [nll])
    log = [json.loads(line) for line in (train_dir / RUN_LOG).read_text().splitlines() if line.strip()]
    loop_seconds = float(log[-1]["time"])
    result = {"arm": arm.key, "label": arm.label, "seed": seed, "steps": steps, "equal_compute": compute,
              "train_wall_s": train["seconds"], "train_loop_s": loop_seconds,
              "images_per_s": steps * plan.batch_size / max(loop_seconds, 1e-9),
              "final_loss_ar": log[-1]["loss_ar"], "log": [{k: r[k] for k in ("step", "loss_ar", "loss")} for r in log],
              "teacher_decay": (json.loads((train_dir / "config.json").read_text())["star"] or {}).get("teacher_decay"),
              "eval": evaluations, "probe": json.loads((probe_dir / "probe.json").read_text()),
              "nll": json.loads(nll.read_text())}
    write_json_atomic(folder / "result.json", result)
    return result


def gap_is_close(results: list[dict], key: str = "cfg1") -> bool:
    """Arms 3 vs 1: is the FID gap within two seed spreads (then a third seed is worth its time)?"""
    by_arm = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r["eval"][key]["fid"])
    a, b = by_arm.get("1_llamagen", []), by_arm.get("3_star", [])
    if len(a) < 2 or len(b) < 2:
        return False
    spread = max(float(np.std(a, ddof=1)), float(np.std(b, ddof=1)))
    return abs(float(np.mean(a)) - float(np.mean(b))) <= 2 * spread


def collect_finished(plan: StudyPlan) -> dict:
    """--report-only: whatever finished runs exist, nothing is run."""
    keys = [arm.key for arm in plan.arms]
    results = [json.loads(p.read_text()) for p in sorted((plan.out / "arms").glob("*/seed*/result.json"))]
    results = sorted((r for r in results if r["arm"] in keys), key=lambda r: (keys.index(r["arm"]), r["seed"]))
    for name in ("vq/metrics.json", "vq/ceiling/metrics.json"):
        if not (plan.out / name).is_file():
            raise FileNotFoundError(f"{plan.out / name} missing: run the study first (without --report-only)")
    return {"vq": json.loads((plan.out / "vq" / "metrics.json").read_text()),
            "ceiling": json.loads((plan.out / "vq" / "ceiling" / "metrics.json").read_text()), "results": results,
            "seconds": 0.0, "stage_seconds": stage_times(plan)}


def run_study(plan: StudyPlan, prepare_data, reuse_only: bool = False) -> dict:
    if reuse_only:
        return collect_finished(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    write_plan_record(plan)
    started = time.time()
    timed_inline(plan, "data", prepare_data, [plan.data / "train" / "complete.json", plan.data / "test" / "complete.json"])
    vq_metrics = stage_vq(plan)
    stage_tokenize(plan)
    ceiling = stage_ceiling(plan)
    write_model_json(plan)
    arms_by_key = {arm.key: arm for arm in plan.arms}
    from star.study.arms import ARMS

    arms_by_key.update({arm.key: arm for arm in ARMS if arm.key not in arms_by_key})
    results = []
    for arm in sorted(plan.arms, key=lambda a: a.equal_compute):  # arm 2 needs arms 1 and 3 timed first
        for seed in arm_seeds(arm, plan.main_seeds, plan.other_seeds):
            print(f"== arm {arm.key}, seed {seed}", flush=True)
            results.append(run_arm_seed(plan, arm, seed, arms_by_key))
    if plan.third_seed_if_close and gap_is_close(results):
        extra = max(plan.main_seeds) + 1
        print(f"== arms 1 and 3 are within two spreads: a third seed ({extra})", flush=True)
        for arm in plan.arms:
            if arm.main:
                results.append(run_arm_seed(plan, arm, extra, arms_by_key))
    results.sort(key=lambda r: ([a.key for a in plan.arms].index(r["arm"]), r["seed"]))  # table order
    return {"vq": vq_metrics, "ceiling": ceiling, "results": results, "seconds": time.time() - started,
            "stage_seconds": stage_times(plan)}

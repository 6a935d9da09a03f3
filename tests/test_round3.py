"""Round 3 (`make study PRESET=round3`): the fine-tune arm's length, start and compute accounting, the order in which
runs train, the VQ's own flags, the equal-compute reading on total_cpu_s and the verdict. The round3-smoke study end
to end is in tests/test_long_study.py (it reuses the long smoke's data, VQ and tokens)."""
import threading
import time
from pathlib import Path

import pytest

from star.study.long import (
    answer_steps,
    arm_steps,
    branch_step,
    fine_tune_flags,
    full_fid_steps,
    milestone_steps,
    step_offset,
    train_all,
)
from star.study.long_arms import GPU_ARMS, ONE_VIEW_STEP_COST, ROUND3_ARMS, STAR_STEP_COST
from star.study.presets import DEFAULT_ARMS, PRESETS
from star.study.stages import StageFailed, StudyPlan

PLAIN_STEP_CPU_S = 0.31  # the long round's baseline step (GPT_SMALL, batch 64, the fast step)


def plan_of(preset: str, out: Path = Path("x"), table=ROUND3_ARMS) -> StudyPlan:
    return StudyPlan(out=out, data=Path("y"), arms=list(table), preset=preset, **PRESETS[preset][0])


def test_the_fine_tune_branches_at_two_thirds_and_costs_the_baseline_run():
    plan = plan_of("round3")
    arms = {arm.key: arm for arm in ROUND3_ARMS}
    base, tune = arms["R1_llamagen"], arms["R4_star_finetune"]
    assert arm_steps(plan, base) == 8000 and branch_step(plan, tune) == 5333 == step_offset(plan, tune)
    assert arm_steps(plan, tune) == round((8000 - 5333) / STAR_STEP_COST) == 1301
    # branch + fine-tune at the measured step costs: the baseline's whole run, to within a step's rounding
    cost = PLAIN_STEP_CPU_S * (5333 + 1301 * STAR_STEP_COST)
    assert cost == pytest.approx(PLAIN_STEP_CPU_S * 8000, rel=1e-3)
    # the baseline keeps the branch checkpoint and one at each recipe's end at equal steps (3000; 5333 + 1301) and,
    # predicted, at equal compute (3000 x 2.05; 3000 x 1.2; the fine-tune's, the baseline's last)
    assert answer_steps(plan, base) == [3000, round(3000 * ONE_VIEW_STEP_COST), round(3000 * STAR_STEP_COST), 6634,
                                        8000]
    assert milestone_steps(plan, base) == [1000, 2000, 3000, 3600, 5333, 6150, 6634, 8000]
    assert full_fid_steps(plan, base) == [3000, 3600, 6150, 6634, 8000]
    assert milestone_steps(plan, tune) == [434, 867, 1301] and full_fid_steps(plan, tune) == [1301]
    assert milestone_steps(plan, arms["R6_star_one_view"]) == [1000, 2000, 3000]
    assert answer_steps(plan, arms["R2_star_paper"]) == []
    # every arm has all three seeds; none waits for an extra one
    assert all(arm.main for arm in ROUND3_ARMS) and PRESETS["round3"][0]["extra_seed_for_best"] is False


def test_the_gpu_preset_has_a_fine_tune_and_the_long_preset_is_unchanged():
    gpu = plan_of("gpu", table=GPU_ARMS)
    arms = {arm.key: arm for arm in GPU_ARMS}
    assert "L8" in DEFAULT_ARMS["gpu"].split(",")
    assert branch_step(gpu, arms["L8_star_finetune"]) in milestone_steps(gpu, arms["L1_llamagen"])
    assert gpu.vq_flags == plan_of("round3").vq_flags  # round 3's tokenizer: the long round's capped the GPU run
    long = plan_of("long", table=GPU_ARMS[:-1])
    assert milestone_steps(long, arms["L1_llamagen"]) == [300, 1000, 2000, 3000, 5333, 8000]
    assert full_fid_steps(long, arms["L1_llamagen"]) == [8000]  # no answer checkpoints outside round 3


def test_round3_has_its_own_tokenizer_flags_and_folder(tmp_path, monkeypatch):
    from star.cli import parse_config
    from star.study import pipeline
    from star.study.__main__ import build_plan, parse_args
    from star.vq.train import VQTrainConfig

    plan, _ = build_plan(parse_args(["--preset", "round3", "--out", str(tmp_path / "study")]))
    assert [a.key for a in plan.arms] == [a.key for a in ROUND3_ARMS]
    assert build_plan(parse_args(["--preset", "round3"]))[0].out == Path("runs/study-round3")
    ran = {}

    def fake_stage(plan, name, argv, done=None, side_by_side=True):
        ran[name] = argv
        (tmp_path / "study" / "vq" / "metrics.json").write_text("{}")

    monkeypatch.setattr(pipeline, "run_stage", fake_stage)
    pipeline.stage_vq(plan)
    config = parse_config(VQTrainConfig, ran["vq_train"][2:])  # the preset's flags reach the VQ command as its own
    assert (config.steps, config.lr_schedule, config.min_lr_fraction, config.disc_weight) == (3000, "cosine", 0.05, 0)


def test_a_fine_tune_waits_for_its_baseline_and_fails_with_it(tmp_path):
    plan = plan_of("round3-smoke", tmp_path)
    arms = {arm.key: arm for arm in ROUND3_ARMS}
    events, lock = [], threading.Lock()

    def fake_train(arm, seed):
        with lock:
            events.append(("start", arm.key, seed, time.monotonic()))
        time.sleep(0.3 if not arm.star else 0.05)
        if arm.key == "R1_llamagen" and seed == 1:
            raise StageFailed("R1 seed 1 broke")
        with lock:
            events.append(("end", arm.key, seed, time.monotonic()))

    # the fine-tunes listed first: they are still queued after every other run, and wait for their own baseline
    runs = [(arms["R4_star_finetune"], 0), (arms["R4_star_finetune"], 1), (arms["R1_llamagen"], 0),
            (arms["R1_llamagen"], 1), (arms["R2_star_paper"], 0)]
    with pytest.raises(StageFailed, match="R4_star_finetune seed 1 not trained: R1_llamagen seed 1"):
        train_all(plan, runs, fake_train)
    when = {(kind, key, seed): at for kind, key, seed, at in events}
    assert when[("start", "R4_star_finetune", 0)] >= when[("end", "R1_llamagen", 0)]
    assert ("start", "R4_star_finetune", 1) not in when  # its baseline failed: never started
    assert when[("start", "R2_star_paper", 0)] < when[("start", "R4_star_finetune", 0)]
    # seed by seed: every seed-0 run is started before any seed-1 run, so a study stopped early has seed 0 of all
    assert when[("start", "R2_star_paper", 0)] < when[("start", "R1_llamagen", 1)]
    # alone (--arms R4) before its baseline has trained: one line naming the missing checkpoint and the way out
    with pytest.raises(StageFailed, match=r"train R1_llamagen first \(--arms R1,R4\)"):
        fine_tune_flags(plan, arms["R4_star_finetune"], 0)


def _run(cpu: float, points: list[tuple[int, float, float, float]], offset: int = 0) -> dict:
    """A result: (own step, own cpu_s, NLL, FID-5k or None) per checkpoint; a fine-tune's start adds `cpu` and
    `offset`."""
    made = []
    for step, cpu_s, nll, fid in points:
        point = {"step": step, "total_step": offset + step, "cpu_s": cpu_s, "total_cpu_s": cpu + cpu_s,
                 "nll": {"conditional": {"nats_per_token": nll}}, "probe": {"rows": [{"accuracy": 0.5 - nll / 10}]},
                 "fid": {"n20": {"cfg1": {"fid": 50.0, "precision": 0.5, "recall": 0.5}}}}
        if fid is not None:
            point["fid"]["n5000"] = {tag: {"fid": fid, "precision": 0.6, "recall": 0.4} for tag in ("cfg1", "cfg2")}
        made.append(point)
    return {"arm": "x", "label": "x", "steps": points[-1][0], "total_steps": offset + points[-1][0], "points": made}


def test_equal_compute_reads_the_baseline_at_the_fine_tunes_total_cpu_seconds():
    from star.study.round3_report import answer, answer_metrics, pays

    baseline = [_run(0.0, [(100, 10.0, 4.0, None), (200, 20.0, 3.0, 90.0), (300, 30.0, 2.8, 80.0)]),
                _run(0.0, [(100, 12.0, 4.2, None), (200, 22.0, 3.2, 92.0), (300, 32.0, 3.0, 82.0)])]
    # branched at the baseline's step 200 (21 CPU-s), 50 own steps of 7 CPU-s: 28 CPU-s in all, at total step 250
    tune = [_run(21.0, [(50, 7.0, 2.5, 70.0)], offset=200), _run(21.0, [(50, 7.0, 2.6, 71.0)], offset=200)]
    rows = {m.name: (values, reading, g) for m, values, reading, g in
            answer(baseline, tune, answer_metrics(5000, 2.0), "cpu_s").rows}
    values, reading, g = rows["held-out NLL, label (nats/token)"]
    assert values == [2.5, 2.6]
    assert reading.mean == pytest.approx(3.1 + (2.9 - 3.1) * (28 - 21) / 10)  # linear, at total_cpu_s = 28
    assert "28.00 CPU-s" in reading.where and g.better and g.real
    fid_values, fid_reading, fid_gap = rows["FID-5k no CFG"]
    assert fid_reading.where == "step 300, 31.00 CPU-s" and fid_reading.mean == pytest.approx(81.0)  # nearest scored
    assert fid_gap.gap == pytest.approx(70.5 - 81.0) and fid_gap.real
    at_steps = answer(baseline, tune, answer_metrics(5000, 2.0), "step")
    assert at_steps.x == 250  # the fine-tune's own 50 steps on top of the baseline's 200
    assert "**yes**" in pays(answer(baseline, tune, answer_metrics(5000, 2.0), "cpu_s"), "FID-5k")
    worse = [_run(21.0, [(50, 7.0, 3.5, 90.0)], offset=200), _run(21.0, [(50, 7.0, 3.6, 91.0)], offset=200)]
    assert pays(answer(baseline, worse, answer_metrics(5000, 2.0), "cpu_s"), "FID-5k").startswith("no: no FID or NLL")


def test_headroom_puts_the_ceiling_beside_the_baselines_last_fid():
    """The round's requirement: the ceiling at most half the baseline's FID at its last checkpoint, said per CFG."""
    from types import SimpleNamespace

    from star.study.round3_report import headroom_lines

    plan = SimpleNamespace(num_samples=5000, cfg_scale=2.0)
    baseline = [_run(0.0, [(200, 20.0, 3.0, 90.0), (300, 30.0, 2.8, 80.0)]),
                _run(0.0, [(200, 22.0, 3.2, 92.0), (300, 32.0, 3.0, 84.0)])]
    lines = headroom_lines(37.0, baseline, plan)
    no_cfg = next(line for line in lines if "FID-5k no CFG" in line)
    assert "step 300" in no_cfg and "82.00 ± 2.83" in no_cfg and "= 0.45 (at most half)" in no_cfg
    assert headroom_lines(50.0, baseline, plan)[3].endswith("= 0.61 (more than half)")
    assert headroom_lines(None, baseline, plan) == [] and headroom_lines(37.0, None, plan) == []

"""Held-out NLL, and the long study: runs scored at fixed fractions of their length, in parallel, end to end."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_study import idx_folder  # noqa: F401 (the hand-made Fashion-MNIST stand-in)

from star.data.manifest import shard_tokens
from star.eval.nll import NllConfig, bits_per_dim, run_nll
from star.eval.understanding import AnalysisModel
from star.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    from conftest import TINY_GPT

    folder = tmp_path_factory.mktemp("nll")
    (folder / "gpt.json").write_text(json.dumps(TINY_GPT))
    train(TrainConfig(shards=str(tiny_shards), out=str(folder / "run"), model=str(folder / "gpt.json"), steps=6,
                      batch_size=8, lr=3e-3, num_workers=0, progress=False, self_guided=False, ckpt_at="1"))
    return folder / "run"


def test_nll_is_the_eval_mode_next_token_cross_entropy(trained_run, tiny_shards, tmp_path):
    from star.eval.generator import load_generator

    result = run_nll(NllConfig(AnalysisModel(str(trained_run)), shards=str(tiny_shards), out=str(tmp_path / "n.json")))
    model = load_generator(str(trained_run)).eval()
    tokens, labels = shard_tokens(tiny_shards)
    batch = torch.from_numpy(tokens)
    with torch.no_grad():
        for name, given in (("conditional", torch.from_numpy(labels)),
                            ("unconditional", torch.full((len(labels),), model.config.null_class))):
            logits = model(batch[:, :-1], given).logits  # [N, T, V]: position t predicts token t
            expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.reshape(-1)).item()
            assert result[name]["nats_per_token"] == pytest.approx(expected, rel=1e-5)
    assert result["images"] == len(labels) and json.loads((tmp_path / "n.json").read_text()) == result
    assert result["conditional"]["nats_per_token"] != result["unconditional"]["nats_per_token"]
    # bits per dimension: the whole grid's NLL in bits over H x W x 3 values
    assert bits_per_dim(2.0, 64, 32) == pytest.approx(2.0 * 64 / math.log(2) / (32 * 32 * 3))
    assert result["conditional"]["bits_per_dim"] == pytest.approx(
        bits_per_dim(result["conditional"]["nats_per_token"], 64, 32))


def test_nll_improves_with_training_and_refuses_a_foreign_grid(trained_run, tiny_shards, tmp_path):
    early = run_nll(NllConfig(AnalysisModel(str(trained_run / "checkpoints" / "step-0000001")),
                              shards=str(tiny_shards), out=str(tmp_path / "a.json")))
    late = run_nll(NllConfig(AnalysisModel(str(trained_run)), shards=str(tiny_shards), out=str(tmp_path / "b.json")))
    assert late["conditional"]["nats_per_token"] < early["conditional"]["nats_per_token"]
    from star.data.synthetic import SyntheticLayout, write_synthetic_shards

    write_synthetic_shards(tmp_path / "big", SyntheticLayout(20, num_classes=3, grid=4, codebook_size=256))
    with pytest.raises(ValueError, match="block_size"):
        run_nll(NllConfig(AnalysisModel(str(trained_run)), shards=str(tmp_path / "big"), out=str(tmp_path / "c.json")))


def test_nll_command_exits_2_on_a_bad_flag(trained_run, tmp_path, capsys):
    import runpy
    import sys

    sys.argv = ["evaluate/run.py", "nll", "--ckpt", str(trained_run), "--shards", "x", "--out", "y", "--limit", "-1"]
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path("evaluate/run.py", run_name="__main__")
    assert exit_info.value.code == 2 and "--limit" in capsys.readouterr().err


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def milestone_config(shards, out, model, steps: int, **overrides) -> TrainConfig:
    fields = dict(shards=str(shards), out=str(out), model=str(model), steps=steps, batch_size=8, lr=2e-3,
                  num_workers=0, ckpt_every=2, keep_checkpoints=1, log_every=4, ckpt_at="1,3", self_guided=False,
                  progress=False)
    return TrainConfig(**{**fields, **overrides})


def test_milestone_checkpoints_survive_pruning_and_log_compute(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    train(milestone_config(tiny_shards, out, tiny_gpt_json, steps=6))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000003", "step-0000006"]
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 6]  # every checkpoint gets a record, besides --log-every's
    cpu = [r["cpu_s"] for r in log]
    assert cpu == sorted(cpu) and cpu[-1] > 0
    # the CPU seconds carry on across a resume (the compute axis of the study's curves)
    meta = json.loads((out / "checkpoints" / "step-0000006" / "meta.json").read_text())
    train(milestone_config(tiny_shards, out, tiny_gpt_json, steps=8, resume="auto"))
    assert read_log(out)[-1]["cpu_s"] > meta["cpu_s"] > 0
    with pytest.raises(ValueError, match="--ckpt-at"):
        milestone_config(tiny_shards, out, tiny_gpt_json, steps=8, ckpt_at="10,x")


def test_milestones_are_shared_fractions_and_the_long_baseline_adds_its_own():
    from pathlib import Path

    from star.study.long import milestone_steps
    from star.study.long_arms import LONG_ARMS
    from star.study.presets import PRESETS
    from star.study.stages import StudyPlan

    plan = StudyPlan(out=Path("x"), data=Path("y"), arms=list(LONG_ARMS), preset="long", **PRESETS["long"][0])
    arms = {arm.key: arm for arm in LONG_ARMS}
    assert milestone_steps(plan, arms["L3_star"]) == [300, 1000, 2000, 3000]
    assert milestone_steps(plan, arms["L1_llamagen"]) == [300, 1000, 2000, 3000, 5333, 8000]
    assert milestone_steps(plan, arms["S2_star_w010"]) == [300]


@pytest.fixture(scope="module")
def long_smoke(tmp_path_factory, idx_folder):  # noqa: F811
    """The long-smoke study of arms L1 and L3, run once: (its argv, its out folder)."""
    from star.study.__main__ import main

    root = tmp_path_factory.mktemp("long")
    argv = ["--preset", "long-smoke", "--out", str(root / "study"), "--data-root", str(root / "fm"), "--idx-folder",
            str(idx_folder), "--arms", "L1,L3"]
    assert main(argv) == 0
    return argv, root / "study"


def test_long_study_end_to_end_scores_every_checkpoint_and_resumes(long_smoke, capsys):
    from star.study.__main__ import main

    argv, out = long_smoke
    results = {(r["arm"], r["seed"]): r for r in json.loads((out / "study.json").read_text())["results"]}
    # L3 is the only candidate: it gets the extra seed; the baseline runs 8/3 as long
    assert set(results) == {("L1_llamagen", 0), ("L3_star", 0), ("L3_star", 1)}
    assert [p["step"] for p in results[("L1_llamagen", 0)]["points"]] == [3, 6, 8, 16]
    for result in results.values():
        for point in result["points"]:
            assert point["nll"]["conditional"]["nats_per_token"] > 0 and point["cpu_s"] > 0
            assert set(point["fid"]["n20"]) == {"cfg1", "cfg2"} and point["probe"]["rows"]
        cpu = [p["cpu_s"] for p in result["points"]]
        assert cpu == sorted(cpu)
    report = (out / "report.md").read_text()
    for heading in ("(a) Does ST-AR", "(b) Once runs are long", "(c) Are the paper", "(d) What does dropout",
                    "at equal steps", "at equal training compute"):
        assert heading in report
    for png in ("long_by_step", "long_by_cpu_s", "long_training_loss"):
        assert (out / "figures" / f"{png}.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(argv) == 0  # a rerun redoes nothing
    assert "[run ]" not in capsys.readouterr().out
    assert len(json.loads((out / "invocations.json").read_text())) == 2
    assert np.isfinite(results[("L3_star", 1)]["teacher_decay"])


def test_gpu_preset_smoke_runs_the_same_pipeline(long_smoke, tmp_path):
    """The GPU preset's smoke mode on this CPU (its data, VQ and tokens are the long smoke's: same settings)."""
    from star.study.__main__ import main

    argv, source = long_smoke
    out = tmp_path / "gpu"
    copy_shared_stages(source, out)
    data_root = argv[argv.index("--data-root") + 1]
    assert main(["--preset", "gpu-smoke", "--out", str(out), "--data-root", data_root]) == 0
    results = json.loads((out / "study.json").read_text())["results"]
    assert sorted((r["arm"], r["seed"]) for r in results) == [("L1_llamagen", 0), ("L3_star", 0)]  # no extra seed
    assert json.loads((out / "plan.json").read_text())["gpt"]["n_head"] == 2
    assert "## (a) Does ST-AR" in (out / "report.md").read_text()


def test_a_report_of_a_partly_finished_study_names_the_runs_it_lacks(long_smoke, tmp_path):
    import shutil

    from star.study.__main__ import main

    argv, source = long_smoke
    out = tmp_path / "study"
    shutil.copytree(source, out)
    whole_plan = [*argv[:argv.index("--arms")], "--report-only"]  # every long arm, of which only L1 and L3 ran
    whole_plan[whole_plan.index("--out") + 1] = str(out)
    assert main(whole_plan) == 0
    partial = next(line for line in (out / "report.md").read_text().splitlines() if "Partial report" in line)
    assert "L6_star_auto seed 0" in partial and "S5_star_mask0 seed 0" in partial
    assert "L1_llamagen" not in partial and "L3_star seed 0" not in partial
    assert main([*whole_plan[:-1], "--arms", "L1,L3", "--report-only"]) == 0
    assert "Partial report" not in (out / "report.md").read_text()
    extra = out / "arms" / "L3_star" / "seed1" / "result.json"  # the best arm's extra seed: not yet scored
    for seed in (0, 1):  # a short arm's seeds 0 and 1: its seed 1 is not the extra seed
        short_run = out / "arms" / "S1_star_w025" / f"seed{seed}" / "result.json"
        short_run.parent.mkdir(parents=True)
        short_run.write_text(json.dumps({**json.loads(extra.read_text()), "arm": "S1_star_w025", "seed": seed}))
    extra.unlink()
    assert main([*whole_plan[:-1], "--arms", "L1,L3,S1", "--report-only"]) == 0
    report = (out / "report.md").read_text()
    partial = next(line for line in report.splitlines() if "Partial report" in line)
    assert "1 planned run(s)" in partial and "L3_star seed 1" in partial  # L3: the only candidate, so the best
    assert "(gets seed 1): L3_star" in report
    (out / "arms" / "L3_star" / "seed0" / "result.json").unlink()  # a candidate's planned seed missing: best unknown
    assert main([*whole_plan[:-1], "--arms", "L1,L3,S1", "--report-only"]) == 0
    partial = next(line for line in (out / "report.md").read_text().splitlines() if "Partial report" in line)
    assert "L3_star seed 0" in partial and "seed 1 of the best ST-AR arm by held-out NLL" in partial


def test_the_decision_rule_and_the_equal_compute_reading():
    from star.study.long_report import Gap, Metric, at_compute, curve, gap, trend_sentence

    nll = Metric("nll", lambda point: point["v"], lower_is_better=True)
    close = gap([3.00, 3.02, 3.04], [2.99, 3.01, 3.03], nll)  # -0.01, sd 0.02: within two spreads
    assert close.gap == pytest.approx(-0.01) and close.sd == pytest.approx(0.02) and close.real is False
    far = gap([3.00, 3.02, 3.04], [2.80, 2.81, 2.82], nll)
    assert far.real is True and far.better
    assert gap([3.0], [2.0, 2.1], nll).real is None  # one seed: no spread to judge by
    assert "beyond 2 sd" in far.words(2) and "one seed" in Gap(1.0, None, False).words(1)
    def seed(at_100: float, at_200: float) -> dict:
        return {"points": [{"step": 100, "v": at_100}, {"step": 200, "v": at_200}]}

    baseline = [seed(4.0, 3.0), seed(4.1, 3.1)]
    trend = trend_sentence({"L1_llamagen": baseline, "L6_star_auto": [seed(4.3, 2.5)]}, nll, "L6_star_auto")
    assert "+0.25" in trend and "-0.55" in trend and "reverses" in trend and "no spread" in trend
    trend = trend_sentence({"L1_llamagen": baseline, "L6_star_auto": [seed(4.0, 2.0), seed(4.1, 2.1)]}, nll,
                           "L6_star_auto")
    assert "ST-AR is ahead beyond the seed spread" in trend
    runs = [{"points": [{"step": 100, "cpu_s": 10.0, "v": 4.0}, {"step": 200, "cpu_s": 20.0, "v": 3.0}]},
            {"points": [{"step": 100, "cpu_s": 12.0, "v": 4.2}, {"step": 200, "cpu_s": 22.0, "v": 3.2}]}]
    by_compute = curve(runs, nll, "cpu_s")
    assert by_compute["x"] == [11.0, 21.0] and by_compute["mean"] == pytest.approx([4.1, 3.1])
    assert at_compute(by_compute, 16.0)[0] == pytest.approx(3.6)  # halfway between its checkpoints
    assert at_compute(by_compute, 30.0) is None  # beyond the run: no reading


def copy_shared_stages(source, out) -> None:
    """Another study folder that starts with `source`'s data, VQ, tokens and ceiling already done."""
    import shutil

    (out / "stages").mkdir(parents=True)
    for stage in source.glob("stages/*.json"):
        if stage.name.startswith(("data", "vq_", "tokenize_", "ceiling_")):
            shutil.copy(stage, out / "stages")
    for folder in ("vq", "shards", "fid_cache"):
        shutil.copytree(source / folder, out / folder)


def test_round3_smoke_fine_tunes_the_baseline_and_reports_each_recipe(long_smoke, tmp_path, capsys):
    """round3-smoke on the long smoke's data, VQ and tokens (the same settings): the baseline, the fine-tune and the
    one-view step end to end; the report of the whole round names the recipes not yet run."""
    from pathlib import Path

    from star.study.__main__ import main
    from star.study.long_arms import ROUND3_ARMS

    argv, source = long_smoke
    out = tmp_path / "round3"
    copy_shared_stages(source, out)
    data_root = argv[argv.index("--data-root") + 1]
    round3 = ["--preset", "round3-smoke", "--out", str(out), "--data-root", data_root, "--arms", "R1,R4,R6"]
    assert main(round3) == 0
    results = {r["arm"]: r for r in json.loads((out / "study.json").read_text())["results"]}
    assert sorted(results) == ["R1_llamagen", "R4_star_finetune", "R6_star_one_view"]
    # R1 (16 steps) keeps R4's branch (11) and each recipe's end at equal steps and at equal compute
    assert [p["step"] for p in results["R1_llamagen"]["points"]] == [6, 7, 11, 12, 13, 15, 16]
    # the fine-tune starts from R1's checkpoint at its branch step; its compute counts that checkpoint's
    tune = results["R4_star_finetune"]
    config = json.loads((out / "arms" / "R4_star_finetune" / "seed0" / "train" / "config.json").read_text())
    start = out / "arms" / "R1_llamagen" / "seed0" / "train" / "checkpoints" / "step-0000011"
    assert tune["step_offset"] == 11 and Path(config["settings"]["init_from"]) == start
    assert config["settings"]["warmup_steps"] == config["settings"]["star_warmup_steps"] == 1
    start_cpu = json.loads((start / "meta.json").read_text())["cpu_s"]
    assert start_cpu > 0 and config["init_cpu_s"] == pytest.approx(start_cpu)
    for point in tune["points"]:
        assert point["total_cpu_s"] == pytest.approx(start_cpu + point["cpu_s"], abs=0.02)
        assert point["total_step"] == 11 + point["step"]
    report = (out / "report.md").read_text()
    for heading in ("## The tokenizer's ceiling", "## The answers", "pays?", "At equal compute", "At equal steps",
                    "### R4 ST-AR fine-tune of R1", "### R6 ST-AR one view", "## Time", "train R4_star_finetune",
                    "score R6_star_one_view"):
        assert heading in report
    # the flat record beside the report: every checkpoint with FID at the full count (here every one: the curve count
    # is the full count), one seed each, readable by round3_record
    from star.study import round3_record

    record = round3_record.load_record(out / "measurements.json")
    assert record["preset"] == "round3-smoke" and record["fid_samples"] == 20
    measured = {(m["arm"], m["step"]): m for m in record["measurements"]}
    assert set(measured) == ({("R1_llamagen", p["step"]) for p in results["R1_llamagen"]["points"]}
                             | {("R4_star_finetune", 2), ("R6_star_one_view", 6)})
    tune_end = tune["points"][-1]
    assert tune_end["step"] == 2 and measured[("R4_star_finetune", 2)]["nll"] == tune_end["nll"]["conditional"][
        "nats_per_token"]
    assert round3_record.meeting_steps(record, "R4_star_finetune")["equal steps"] == 11 + 2
    assert round3_record.main([str(out / "measurements.json"), "--out", str(tmp_path / "record")]) == 0
    assert "R6 ST-AR one view" in (tmp_path / "record" / "answers.md").read_text()
    capsys.readouterr()
    assert main(round3) == 0  # a rerun redoes nothing
    assert "[run ]" not in capsys.readouterr().out
    assert main([*round3[:-2], "--report-only"]) == 0  # the whole round: R2, R3, R5 not yet run
    partial = next(line for line in (out / "report.md").read_text().splitlines() if "Partial report" in line)
    assert all(f"{arm.key} seed 0" in partial for arm in ROUND3_ARMS if arm.key[:2] in ("R2", "R3", "R5"))
    assert "R4_star_finetune" not in partial

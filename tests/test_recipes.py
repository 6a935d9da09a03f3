"""Recipes for ST-AR at equal compute: a fine-tune from a baseline checkpoint (AdamW carried over, the compute it
started from in every log record), lr and self-guided-weight warmups (functions of the step: resume stays exact),
and the cheaper step (--star-every, one view)."""
import json
import math

import pytest
import torch
from test_train import read_log, run_config

from star.train.loop import train
from star.train.schedule import is_self_guided, lr_at, star_weight_scale
from star.train.star_settings import StarSettings


def test_schedules_are_linear_ramps_of_the_step():
    assert [lr_at(1e-3, step, 4) for step in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert lr_at(1e-3, 0, 0) == 1e-3  # no warmup: LlamaGen's constant lr
    assert [star_weight_scale(step, 2) for step in range(3)] == [0.5, 1.0, 1.0]
    assert [is_self_guided(step, 3) for step in range(6)] == [True, False, False, True, False, False]


def test_warmups_reach_the_optimizer_and_the_loss(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=5, warmup_steps=4, star_warmup_steps=2))
    log = read_log(tmp_path / "run")
    assert [r["lr"] for r in log] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3])
    assert [r["mim_weight"] for r in log] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert [r["contrastive_weight"] for r in log] == [0.25, 0.5, 0.5, 0.5, 0.5]
    first = log[0]  # the total uses the ramped weights
    expected = first["loss_ar"] + 0.5 * first["loss_mim"] + 0.25 * (first["loss_step"] + first["loss_view"]) / 2
    assert first["loss"] == pytest.approx(expected, abs=1e-4)


def test_a_run_resumed_mid_warmup_equals_the_uninterrupted_run(tiny_shards, tiny_gpt_json, tmp_path):
    warm = dict(warmup_steps=6, star_warmup_steps=6)
    train(run_config(tiny_shards, tmp_path / "full", tiny_gpt_json, steps=8, **warm))
    train(run_config(tiny_shards, tmp_path / "cut", tiny_gpt_json, steps=4, **warm))
    train(run_config(tiny_shards, tmp_path / "cut", tiny_gpt_json, steps=8, resume="auto", **warm))
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))
    for a, b in zip(full, cut):
        assert a["lr"] == b["lr"] and a["mim_weight"] == b["mim_weight"], a["step"]
        for term in ("loss", "loss_ar", "loss_mim", "loss_step", "loss_view"):
            assert a[term] == pytest.approx(b[term], abs=1e-6), (a["step"], term)


def _adamw_steps(folder) -> dict[str, float]:
    state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    return {name: float(entry["step"]) for name, entry in state.items()}


def test_a_fine_tune_carries_adamw_over_and_counts_the_baseline_compute(tiny_shards, tiny_gpt_json, tmp_path,
                                                                        capsys):
    train(run_config(tiny_shards, tmp_path / "base", tiny_gpt_json, steps=2, self_guided=False))
    baseline = tmp_path / "base" / "checkpoints" / "step-0000002"
    baseline_cpu_s = json.loads((baseline / "meta.json").read_text())["cpu_s"]
    assert baseline_cpu_s > 0
    result = train(run_config(tiny_shards, tmp_path / "tune", tiny_gpt_json, steps=3, init_from=str(baseline)))
    assert result["start_step"] == 0 and result["steps"] == 3  # the fine-tune's own steps count from 0
    assert "AdamW moments carried over" in capsys.readouterr().out
    config = json.loads((tmp_path / "tune" / "config.json").read_text())
    assert config["init_cpu_s"] == baseline_cpu_s
    log = read_log(tmp_path / "tune")
    assert all(r["total_cpu_s"] == pytest.approx(baseline_cpu_s + r["cpu_s"], abs=0.011) for r in log)
    steps = _adamw_steps(tmp_path / "tune" / "checkpoints" / "step-0000003")
    student = {v for k, v in steps.items() if k.startswith("student.")}
    projector = {v for k, v in steps.items() if k.startswith("projector.")}
    assert student == {5.0} and projector == {3.0}  # the student's AdamW continues; the new projector starts fresh

    train(run_config(tiny_shards, tmp_path / "fresh", tiny_gpt_json, steps=1, init_from=str(baseline),
                     init_optimizer=False))
    assert "AdamW starts fresh (--no-init-optimizer)" in capsys.readouterr().out
    assert set(_adamw_steps(tmp_path / "fresh" / "checkpoints" / "step-0000001").values()) == {1.0}


def test_a_fine_tune_of_an_official_checkpoint_says_it_has_no_optimizer_state(tiny_shards, fixtures_dir, tmp_path,
                                                                              capsys):
    train(run_config(tiny_shards, tmp_path / "run", fixtures_dir / "gpt_small.json", steps=1,
                     init_from=str(fixtures_dir / "gpt_small.pt")))
    assert "no optimizer.pt" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init_cpu_s"] is None  # unknown compute
    record = read_log(tmp_path / "run")[0]
    assert record["total_cpu_s"] == record["cpu_s"]


def test_star_every_trains_with_self_guided_terms_on_every_kth_step(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=6, star_every=3))
    log = read_log(tmp_path / "run")
    assert all(math.isfinite(r[k]) for r in log for k in ("loss", "loss_ar", "loss_mim", "loss_step", "loss_view"))
    for record in log:
        on = (record["step"] - 1) % 3 == 0
        terms = (record["loss_mim"], record["loss_step"], record["loss_view"])
        assert all(t > 0 for t in terms) if on else all(t == 0 for t in terms), record
        assert (record["mim_weight"] == 1.0) is on
        if not on:  # a next-token step on the same views: its loss is the next-token loss
            assert record["loss"] == record["loss_ar"] > 0


def test_one_view_star_with_mim_and_step_trains(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=2, views_per_image=1,
                     star_settings=StarSettings(use_view=False)))
    log = read_log(tmp_path / "run")
    assert all(r["loss_mim"] > 0 and r["loss_step"] > 0 and r["loss_view"] == 0 for r in log)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["views_per_image"] == 1


def test_bad_recipe_flags_are_refused_with_the_flag_named(tiny_shards, tiny_gpt_json, tmp_path):
    for flag, value in (("warmup_steps", -1), ("star_warmup_steps", -2), ("star_every", 0)):
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} {value}"):
            run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, **{flag: value})


def test_star_every_trains_on_two_processes(tiny_shards, tiny_gpt_json, tmp_path):
    """DDP needs every trainable parameter in every step's graph: the next-token steps of --star-every keep the
    projector in it (times 0)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import CPU_ENV, TWO_CPU_PROCESSES

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": str(repo)}
    command = [sys.executable, *TWO_CPU_PROCESSES, str(repo / "train" / "run.py"), "--shards", str(tiny_shards),
               "--model", str(tiny_gpt_json), "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "8",
               "--num-workers", "0", "--log-every", "1", "--ckpt-every", "3", "--projector-hidden", "64",
               "--no-progress", "--star-every", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["loss_mim"] > 0 for r in read_log(tmp_path / "run")] == [True, False, True]

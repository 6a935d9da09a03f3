"""The trainer's side of run safety: nothing a user does by mistake destroys a run, every setting is checked
first, and a poisoned step never reaches a checkpoint."""
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from star.cli import parse_config
from star.images import IMAGE_EXTENSIONS
from star.train.config import TrainConfig
from star.train.loop import NonFiniteGradient, NonFiniteLoss, train
from star.train.plan import build_model_config
from star.train.star_settings import StarSettings, resolve_teacher_decay

REPO = Path(__file__).resolve().parents[1]


def run_config(shards, out, model, **overrides) -> TrainConfig:
    fields = dict(shards=str(shards), out=str(out), model=str(model), steps=4, batch_size=8, lr=2e-3, num_workers=0,
                  log_every=1, ckpt_every=2, keep_checkpoints=0, token_dropout=0.0, dropout=0.0, progress=False,
                  deterministic=True, projector_hidden=32)
    fields.update(overrides)
    return TrainConfig(**fields)


def run_command():
    spec = importlib.util.spec_from_file_location("train_run", REPO / "train" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "-8"], "--batch-size -8: must be > 0"),
    (["--steps", "-1"], "--steps -1: must be >= 0"),
    (["--epochs", "nan"], "--epochs nan"),
    (["--grad-accum", "0"], "--grad-accum 0: must be >= 1"),
    (["--mask-ratio", "1"], "--mask-ratio 1.0: must be in [0, 1)"),
    (["--mask-ratio", "nan"], "--mask-ratio nan"),
    (["--teacher-decay", "1.5"], "--teacher-decay 1.5: must be in [0, 1]"),
    (["--teacher-decay", "fast"], "--teacher-decay 'fast': give a number in [0, 1] or 'auto'"),
    (["--class-dropout", "2"], "--class-dropout 2.0: must be in [0, 1]"),
    (["--contrastive-temperature", "0"], "--contrastive-temperature 0.0: must be a finite number > 0"),
    (["--num-positions", "0"], "--num-positions 0: must be >= 1"),
    (["--num-positions", "1"], "and >= 2 with L_step"),
    (["--views-per-image", "1"], "--views-per-image 1: ST-AR's L_view"),
    (["--precision", "no"], "invalid choice: 'no'"),
    (["--lr", "nan"], "--lr nan"),
    (["--grad-clip", "0"], "--grad-clip 0.0: must be > 0"),
])
def test_bad_settings_exit_2_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_config(TrainConfig, ["--shards", "s", "--out", "o", *flags])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_good_corner_values_are_accepted():
    config = parse_config(TrainConfig, ["--shards", "s", "--out", "o", "--teacher-decay", "auto", "--no-step",
                                        "--num-positions", "1", "--no-star", "--views-per-image", "1"])
    assert config.star_settings.teacher_decay == "auto" and not config.self_guided
    assert StarSettings(teacher_decay="0.99").teacher_decay == 0.99  # the library gets the same parsing


def test_teacher_decay_auto_keeps_the_papers_horizon_ratio():
    assert resolve_teacher_decay("auto", 250_000) == pytest.approx(0.9999)
    assert resolve_teacher_decay("auto", 1000) == pytest.approx(0.975)
    assert resolve_teacher_decay("auto", 10_000_000) == 0.9999  # clamped to the paper's value
    assert resolve_teacher_decay("auto", 10) == 0.0
    assert resolve_teacher_decay(0.99, 10) == 0.99


def test_model_json_class_dropout_is_honoured_unless_the_flag_overrides(tmp_path):
    spec = tmp_path / "gpt.json"
    spec.write_text(json.dumps({"dim": 64, "n_layer": 2, "n_head": 4, "class_dropout_prob": 0.3}))
    assert build_model_config(TrainConfig(shards="s", out="o", model=str(spec))).class_dropout_prob == 0.3
    assert build_model_config(TrainConfig(shards="s", out="o", model=str(spec), class_dropout=0.0)).class_dropout_prob == 0
    spec.write_text(json.dumps({"dim": 64, "n_layer": 2, "n_head": 4, "class_dropout_prob": 1.5}))
    with pytest.raises(ValueError, match="class_dropout_prob=1.5 must be a number in"):
        build_model_config(TrainConfig(shards="s", out="o", model=str(spec)))


# ----------------------------------------------------------------------------------------------------------
# Run folders


def test_existing_run_folder_is_refused_without_resume(tiny_shards, tiny_gpt_json, tmp_path, capsys):
    out = tmp_path / "run"
    train(run_config(tiny_shards, out, tiny_gpt_json, self_guided=False))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = run_command()(["--shards", str(tiny_shards), "--out", str(out), "--model", str(tiny_gpt_json),
                          "--steps", "2", "--batch-size", "8", "--num-workers", "0", "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err
    assert "already holds a run" in error and "--resume auto" in error and len(error.strip().splitlines()) == 1
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "nothing of the earlier run may change"
    with pytest.raises(ValueError, match="already holds a run.*--resume auto"):
        train(run_config(tiny_shards, out, tiny_gpt_json, self_guided=False))


@pytest.mark.parametrize("extension", IMAGE_EXTENSIONS)
def test_out_is_refused_for_shards_and_for_every_image_extension(tmp_path, extension):
    from star.data.out_folder import foreign_output

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-000000.tar").write_bytes(b"")
    assert "is a token-shard folder" in foreign_output(shards)
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / f"photo{extension.upper()}").write_bytes(b"")
    assert "holds image class folders (cat/)" in foreign_output(images)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "grid.png").write_bytes(b"")  # a picture beside the checkpoints: still a run folder
    assert foreign_output(run) is None


def test_second_trainer_on_a_folder_is_refused_and_a_stale_lock_is_taken_over(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": host, "purpose": "train/run.py --out X"}))
    with pytest.raises(ValueError, match=rf"in use by train/run.py --out X \(pid {os.getpid()} on this host\)"):
        train(run_config(tiny_shards, out, tiny_gpt_json, self_guided=False, steps=1))
    assert not (out / "log.jsonl").exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a holder killed with -9 leaves its lock behind
    gone.wait()
    (out / ".lock").write_text(json.dumps({"pid": gone.pid, "host": host, "purpose": "train/run.py"}))
    summary = train(run_config(tiny_shards, out, tiny_gpt_json, self_guided=False, steps=1))
    assert summary["steps"] == 1 and not (out / ".lock").exists(), "taken over, then released on exit"


# ----------------------------------------------------------------------------------------------------------
# Poisoned steps


class InfiniteGradient(torch.autograd.Function):
    """Adds 0 to the loss, and an infinite gradient to its input: a finite loss with a poisoned backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


def test_finite_loss_with_infinite_gradient_stops_before_the_update(tiny_shards, tiny_gpt_json, tmp_path, monkeypatch):
    import star.train.loop as loop

    real, calls = loop.micro_batch_losses, {"n": 0}

    def poisoned(batch, *args, **kwargs):
        calls["n"] += 1
        terms = real(batch, *args, **kwargs)
        if calls["n"] == 3:  # a finite loss whose backward is infinite
            terms["loss"] = terms["loss"] + InfiniteGradient.apply(terms["loss_ar"].reshape(1))
        return terms

    monkeypatch.setattr(loop, "micro_batch_losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteGradient, match=r"gradient norm \((inf|nan)\) at step 3 .* not applied.*step-0000002, was"):
        train(run_config(tiny_shards, out, tiny_gpt_json, self_guided=False, steps=6))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    weights = load_file(out / "checkpoints" / "step-0000002" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_huge_learning_rate_never_leaves_a_non_finite_checkpoint(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    with pytest.raises((NonFiniteLoss, ValueError, RuntimeError)) as caught:
        train(run_config(tiny_shards, out, tiny_gpt_json, self_guided=False, steps=8, ckpt_every=1, lr=1e8))
    assert "non-finite" in str(caught.value) or "NaN" in str(caught.value)
    for folder in (out / "checkpoints").glob("step-*"):
        for name in ("model.safetensors",):
            assert all(torch.isfinite(w).all() for w in load_file(folder / name).values()), folder
    newest = sorted((out / "checkpoints").glob("step-*"))
    if newest:
        assert newest[-1].name in str(caught.value), "the message names the newest good checkpoint"


# ----------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt"])
def test_resume_auto_falls_back_past_a_truncated_checkpoint(tiny_shards, tiny_gpt_json, tmp_path, damaged):
    out = tmp_path / "run"
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=4))
    target = out / "checkpoints" / "step-0000004" / damaged
    target.write_bytes(target.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*step-0000004/{damaged}"):
        summary = train(run_config(tiny_shards, out, tiny_gpt_json, steps=6, resume="auto"))
    assert summary["steps"] == 6 and [r["step"] for r in read_log(out)] == list(range(1, 7))
    config = json.loads((out / "config.json").read_text())
    assert config["resumed_from"].endswith("step-0000002") and config["start_step"] == 2
    assert "step-0000004" in config["skipped_on_resume"][0]


def test_teacher_decay_auto_is_resolved_and_recorded(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    summary = train(run_config(tiny_shards, out, tiny_gpt_json, steps=2, ckpt_every=2,
                               star_settings=StarSettings(teacher_decay="auto", contrastive_layer=1)))
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["star_settings"]["teacher_decay"] == "auto"
    assert config["star"]["teacher_decay"] == summary["teacher_decay"] == resolve_teacher_decay("auto", 2) == 0.0


def test_star_checkpoint_missing_its_teacher_is_an_error(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=2))
    (out / "checkpoints" / "step-0000002" / "teacher.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks teacher.safetensors"):
        train(run_config(tiny_shards, out, tiny_gpt_json, steps=4, resume="auto"))


def test_resume_refuses_a_different_run_and_applies_a_new_lr(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=2, self_guided=False))
    other_heads = tmp_path / "heads.json"
    other_heads.write_text(json.dumps({**json.loads(tiny_gpt_json.read_text()), "n_head": 2}))
    with pytest.raises(ValueError) as caught:
        train(run_config(tiny_shards, out, other_heads, steps=4, resume="auto", seed=1, batch_size=4))
    message = str(caught.value)
    for difference in ("model n_head: checkpoint 4, now 2", "seed: checkpoint 0, now 1",
                       "global_batch: checkpoint 8, now 4", "self_guided: checkpoint False, now True",
                       "--allow-batch-change continues with this run's --batch-size"):
        assert difference in message
    assert "May change on resume: lr, weight_decay, grad_clip" in message
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=4, resume="auto", self_guided=False, lr=5e-4,
                     weight_decay=0.1))
    config = json.loads((out / "config.json").read_text())
    assert config["changed_on_resume"] == ["lr: checkpoint 0.002, now 0.0005",
                                           "weight_decay: checkpoint 0.05, now 0.1"]
    assert [r["lr"] for r in read_log(out)] == [2e-3, 2e-3, 5e-4, 5e-4], "the log records the lr really used"
    optimizer = torch.load(out / "checkpoints" / "step-0000004" / "optimizer.pt", weights_only=True)
    assert [g["weight_decay"] for g in optimizer["param_groups"]] == [0.1, 0.0]
    assert all(math.isclose(g["lr"], 5e-4) for g in optimizer["param_groups"])


# ----------------------------------------------------------------------------------------------------------
# Data


def test_stream_loader_refuses_a_truncated_shard_before_training(tiny_shards, tiny_gpt_json, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards, ignore=shutil.ignore_patterns("cache"))
    victim = sorted(shards.glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    with pytest.raises(ValueError, match=rf"--shards {shards}: .*{victim.name}"):
        train(run_config(shards, tmp_path / "run", tiny_gpt_json, loader="stream"))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_neither_steps_nor_epochs_is_an_error_before_any_step(tiny_shards, tiny_gpt_json, tmp_path):
    with pytest.raises(ValueError, match="give --steps or --epochs"):
        train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=0, epochs=0.0))
    assert not (tmp_path / "run" / "log.jsonl").exists() and not (tmp_path / "run" / ".lock").exists()


def test_checkpoints_in_the_older_meta_format_still_resume(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=2))
    meta_path = out / "checkpoints" / "step-0000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    old = {"step": 2, "tokenizer_sha256": meta["tokenizer_sha256"], "star": True, "views": 2, "seed": 0,
           "world_size": 1, "batches_consumed_per_process": 2,
           "model": json.loads((meta_path.parent / "config.json").read_text())["config"]}  # the old meta.json
    meta_path.write_text(json.dumps(old))
    summary = train(run_config(tiny_shards, out, tiny_gpt_json, steps=4, resume="auto"))
    assert summary["steps"] == 4 and [r["step"] for r in read_log(out)] == [1, 2, 3, 4]

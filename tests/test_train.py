"""The trainer on tiny shards (8x8 tokens, a 2-layer GPT): learning, exact resume, errors, NaN stop, 2 processes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_ENV, TWO_CPU_PROCESSES  # noqa: E402

from star.train.loop import NonFiniteLoss, TrainConfig, train
from star.train.token_loader import EpochBatchSampler

REPO = Path(__file__).resolve().parents[1]


def run_config(shards, out, model, **overrides) -> TrainConfig:
    fields = dict(shards=str(shards), out=str(out), model=str(model), steps=8, batch_size=8, lr=2e-3, num_workers=0,
                  log_every=1, ckpt_every=4, token_dropout=0.0, dropout=0.0, progress=False, deterministic=True,
                  projector_hidden=64)
    fields.update(overrides)
    return TrainConfig(**fields)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("self_guided", [True, False])
def test_tiny_model_loss_falls(tiny_shards, tiny_gpt_json, tmp_path, self_guided):
    train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=30, log_every=5, ckpt_every=30,
                     self_guided=self_guided))
    log = read_log(tmp_path / "run")
    assert log[-1]["loss_ar"] < log[0]["loss_ar"] - 0.3, log
    assert set(log[0]) >= {"step", "loss", "loss_ar", "loss_mim", "loss_step", "loss_view", "grad_norm", "lr",
                           "images_per_s", "tokens_per_s", "memory_gb"}
    if self_guided:
        assert all(r["loss_mim"] > 0 and r["loss_step"] > 0 and r["loss_view"] > 0 for r in log)
        expected = log[-1]["loss_ar"] + log[-1]["loss_mim"] + 0.5 * (log[-1]["loss_step"] + log[-1]["loss_view"]) / 2
        assert abs(log[-1]["loss"] - expected) < 1e-4
    else:
        assert all(r["loss_mim"] == r["loss_step"] == r["loss_view"] == 0 for r in log)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["star"] is not None) is self_guided and config["lr"] == 2e-3
    assert config["model"]["n_layer"] == 2 and config["settings"]["steps"] == 30


def test_resumed_run_equals_uninterrupted_run(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "full", tiny_gpt_json, steps=8))
    # The interrupted run stops after its step-4 checkpoint (as if killed before step 5), then resumes.
    train(run_config(tiny_shards, tmp_path / "cut", tiny_gpt_json, steps=4))
    train(run_config(tiny_shards, tmp_path / "cut", tiny_gpt_json, steps=8, resume="auto"))
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))
    for a, b in zip(full, cut):
        for term in ("loss", "loss_ar", "loss_mim", "loss_step", "loss_view"):
            assert a[term] == pytest.approx(b[term], abs=1e-6), (a["step"], term)
    from safetensors.torch import load_file

    final_full = load_file(tmp_path / "full" / "checkpoints" / "step-0000008" / "model.safetensors")
    final_cut = load_file(tmp_path / "cut" / "checkpoints" / "step-0000008" / "model.safetensors")
    assert all(torch.allclose(final_full[k], final_cut[k], atol=1e-6) for k in final_full)


def test_checkpoints_are_complete_and_pruned(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=6, ckpt_every=2, keep_checkpoints=2))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000004", "step-0000006"]
    folder = tmp_path / "run" / "checkpoints" / "step-0000006"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "teacher.safetensors", "projector.safetensors",
                                                   "optimizer.pt", "config.json", "meta.json"}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 6 and len(meta["tokenizer_sha256"]) == 64
    from star.weights_io import load_gpt

    model = load_gpt(folder)  # our own checkpoint loads for sampling
    assert model.config.block_size == 64
    from safetensors.torch import load_file

    from star.eval.generator import load_generator

    teacher = load_generator(str(tmp_path / "run"), weights="teacher")  # the newest checkpoint's EMA teacher
    stored = load_file(folder / "teacher.safetensors")
    assert all(torch.equal(teacher.state_dict()[k], stored[k]) for k in stored)
    assert not all(torch.equal(model.state_dict()[k], stored[k]) for k in stored), "teacher lags the student"


def test_tensorboard_without_the_package_is_a_clear_error(tiny_shards, tiny_gpt_json, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, tensorboard=True))


def test_mismatched_model_and_shards_are_errors(tiny_shards, tmp_path):
    small_vocab = tmp_path / "vocab.json"
    small_vocab.write_text(json.dumps({"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "num_classes": 3,
                                       "block_size": 64}))
    with pytest.raises(ValueError, match="codebook size 256 > model vocab_size 128"):
        train(run_config(tiny_shards, tmp_path / "a", small_vocab))
    wrong_grid = tmp_path / "grid.json"
    wrong_grid.write_text(json.dumps({"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "num_classes": 3,
                                      "block_size": 256}))
    with pytest.raises(ValueError, match="8x8 = 64 tokens != model block_size 256"):
        train(run_config(tiny_shards, tmp_path / "b", wrong_grid))
    few_classes = tmp_path / "classes.json"
    few_classes.write_text(json.dumps({"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "num_classes": 2,
                                       "block_size": 64}))
    with pytest.raises(ValueError, match="3 classes > model num_classes 2"):
        train(run_config(tiny_shards, tmp_path / "c", few_classes))


def test_resume_with_another_tokenizer_is_refused(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=2, ckpt_every=2))
    meta_path = tmp_path / "run" / "checkpoints" / "step-0000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenizer_sha256: checkpoint '000000000000"):
        train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=4, resume="auto"))


def test_non_finite_loss_stops_with_step_and_term(tiny_shards, tiny_gpt_json, tmp_path, monkeypatch):
    import star.train.objectives as objectives

    real = objectives.star_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["loss_mim"] = terms["loss_mim"] * float("nan")
        return terms

    monkeypatch.setattr(objectives, "star_losses", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss_mim, loss =.*newest checkpoint, \S+step-0000002, was"):
        train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=6, ckpt_every=2))
    # The step-2 checkpoint is intact and nothing later was written.
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]


def test_ranks_read_disjoint_batches_and_resume_position():
    samplers = [EpochBatchSampler(50, 12, rank, 3, seed=1) for rank in range(3)]
    streams = [iter(s) for s in samplers]
    for _epoch in range(2):
        seen = []
        for _ in range(samplers[0].steps_per_epoch):  # 50 // 12 = 4 steps per epoch
            batches = [next(stream) for stream in streams]
            seen += [i for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == 48
    resumed = iter(EpochBatchSampler(50, 12, 1, 3, seed=1, start_step=5))
    fresh = iter(EpochBatchSampler(50, 12, 1, 3, seed=1))
    for _ in range(5):
        next(fresh)
    assert [next(resumed) for _ in range(6)] == [next(fresh) for _ in range(6)]
    with pytest.raises(ValueError, match="global batch 60 must be a multiple .* at most the 50 samples"):
        EpochBatchSampler(50, 60, 0, 3, seed=1)


def test_select_views_refuses_a_library_callers_bad_views():
    import numpy as np

    from star.train.token_loader import select_views

    grids, boxes, flips = np.zeros((2, 4, 4), np.uint16), np.zeros((2, 4), np.float32), np.zeros(2, bool)
    rng = np.random.default_rng(0)
    assert select_views(grids, boxes, flips, 2, "index", rng)[0].shape == (2, 16)
    with pytest.raises(ValueError, match="views_per_sample=3 of the 2 stored views"):
        select_views(grids, boxes, flips, 3, "index", rng)
    with pytest.raises(ValueError, match="view_match='pixel'"):
        select_views(grids, boxes, flips, 2, "pixel", rng)


def test_two_process_cpu_training(tiny_shards, tiny_gpt_json, tmp_path):
    env = {**os.environ, **CPU_ENV}
    command = [sys.executable, *TWO_CPU_PROCESSES, str(REPO / "train" / "run.py"),
               "--shards", str(tiny_shards), "--model", str(tiny_gpt_json), "--out", str(tmp_path / "run"),
               "--steps", "4", "--batch-size", "8", "--num-workers", "0", "--log-every", "2", "--ckpt-every", "4",
               "--projector-hidden", "64", "--no-progress", "--lr", "1e-3"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_per_process"] == 4
    assert [r["step"] for r in read_log(tmp_path / "run")] == [2, 4]
    assert (tmp_path / "run" / "checkpoints" / "step-0000004" / "meta.json").is_file()


def test_kill_minus_9_loses_only_the_steps_since_the_last_checkpoint(tiny_shards, tiny_gpt_json, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    common = [sys.executable, str(REPO / "train" / "run.py"), "--shards", str(tiny_shards), "--model", str(tiny_gpt_json),
              "--out", str(out), "--batch-size", "8", "--num-workers", "0", "--log-every", "1", "--ckpt-every", "3",
              "--projector-hidden", "64", "--no-progress", "--lr", "1e-3", "--deterministic", "--dropout", "0",
              "--token-dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(common + ["--steps", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-0000006" / "meta.json").is_file():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    last = int(checkpoints[-1].split("-")[1])
    assert last >= 6 and all((out / "checkpoints" / name / "meta.json").is_file() for name in checkpoints)
    # Resume to a fixed end; the log holds each step once, and the resumed steps match an uninterrupted run.
    end = last + 4
    resumed = subprocess.run(common + ["--steps", str(end), "--resume", "auto"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, end + 1))
    reference = subprocess.run([c if c != str(out) else str(tmp_path / "ref") for c in common] + ["--steps", str(end)],
                               env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    for a, b in zip(read_log(tmp_path / "ref"), log):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]


def test_stream_loader_yields_views_of_real_samples(tiny_shards):
    from star.data.manifest import Manifest
    from star.data.shards import decode_sample, iter_shard
    from star.train.token_loader import stream_loader

    manifest = Manifest.load(tiny_shards)
    stored = {}
    for shard in manifest.shard_paths(tiny_shards):
        for members in iter_shard(shard):
            sample = decode_sample(members)
            stored.setdefault(sample.class_id, []).append(sample.tokens.reshape(10, -1).astype("int64"))
    batches = iter(stream_loader(tiny_shards, 2, 4, seed=0, view_match="geometry", rank=0, workers=0, shuffle_buffer=8))
    for _ in range(3):
        batch = next(batches)
        assert batch.tokens.shape == (4, 2, 64) and batch.view_match.shape == (4, 2, 64)
        for tokens, label in zip(batch.tokens.numpy(), batch.labels.tolist()):
            # both views are distinct stored views of one training image of that class
            owners = [grids for grids in stored[label]
                      if all(any((view == g).all() for g in grids) for view in tokens)]
            assert owners, "both views must come from one stored sample of the labelled class"


def test_tiny_model_learns_with_the_stream_loader(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=30, log_every=5, ckpt_every=30,
                     loader="stream", deterministic=False))
    log = read_log(tmp_path / "run")
    assert log[-1]["loss_ar"] < log[0]["loss_ar"] - 0.3, log
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["loader"] == "stream"


def test_init_from_an_official_llamagen_checkpoint(tiny_shards, fixtures_dir, tmp_path):
    from safetensors.torch import load_file

    from star.weights import load_llamagen_state_dict

    # The fixture GPT (vocab 512, 10 classes, 8x8 tokens) accepts the tiny shards (codebook 256, 3 classes).
    train(run_config(tiny_shards, tmp_path / "run", fixtures_dir / "gpt_small.json", steps=1, ckpt_every=1, lr=0.0,
                     init_from=str(fixtures_dir / "gpt_small.pt")))
    official = load_llamagen_state_dict(fixtures_dir / "gpt_small.pt")
    folder = tmp_path / "run" / "checkpoints" / "step-0000001"
    for name in ("model.safetensors", "teacher.safetensors"):
        saved = load_file(folder / name)
        assert saved.keys() == official.keys()
        assert all(torch.equal(saved[k], official[k]) for k in official), name


@pytest.mark.parametrize("self_guided", [True, False])
def test_bf16_precision_trains_through_the_real_trainer_on_cpu(tiny_shards, tiny_gpt_json, tmp_path, self_guided):
    """Accelerate's mixed_precision="bf16" on CPU: a dtype mismatch in the ST-AR or plain step shows up here."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # earlier tests in this process set up Accelerate in fp32 (it is a singleton)
    out = tmp_path / "run"
    try:
        train(run_config(tiny_shards, out, tiny_gpt_json, steps=3, log_every=1, ckpt_every=3, self_guided=self_guided,
                         precision="bf16"))
    finally:
        AcceleratorState._reset_state()
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == "bf16"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(record["loss"]) for record in log)
    if self_guided:
        assert all(record["loss_mim"] > 0 for record in log), "the teacher and MIM terms ran under autocast"

"""The same command is the same method however the global batch is split: 1 process, 1 process with --grad-accum 2
and 2 processes with --grad-accum 2 (a batch of 8 each time, dropout off) log the same losses at step 1 and
close ones after, because every draw depends on (seed, step, image) and the InfoNCE negatives are the whole global
batch (`--negatives global`). `--negatives local` keeps each micro-batch's own negatives, and the split shows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_ENV, TWO_CPU_PROCESSES

from star.train.loop import TrainConfig, train
from star.train.star_settings import StarSettings

REPO = Path(__file__).resolve().parents[1]
TERMS = ("loss", "loss_ar", "loss_mim", "loss_step", "loss_view")
FLAGS = {"steps": 2, "batch_size": 8, "lr": 2e-3, "num_workers": 0, "log_every": 1, "ckpt_every": 2,
         "token_dropout": 0.0, "dropout": 0.0, "progress": False, "deterministic": True, "projector_hidden": 64}


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def record_draws(monkeypatch) -> dict:
    """Wrap the trainer's micro_batch_losses: per (step, image index), the draws it was given."""
    import star.train.loop as loop

    real, seen, calls = loop.micro_batch_losses, {}, {"n": 0}

    def recording(batch, trainable, star_settings, model_config, draws, *rest, **options):
        for row, image in enumerate(batch.indices.tolist()):
            seen[(calls["n"], image)] = (bool(draws.drop_label[row]), draws.mask_scores[row].clone(),
                                         draws.positions[row].clone())
        calls["n"] += 1
        return real(batch, trainable, star_settings, model_config, draws, *rest, **options)

    monkeypatch.setattr(loop, "micro_batch_losses", recording)
    return seen


def by_step(seen: dict, micro_batches: int) -> dict:
    return {(call // micro_batches, image): draws for (call, image), draws in seen.items()}


def test_accumulation_changes_neither_the_draws_nor_the_losses(tiny_shards, tiny_gpt_json, tmp_path, monkeypatch):
    logs, draws = {}, {}
    for accum, negatives in ((1, "global"), (2, "global"), (2, "local")):
        seen = record_draws(monkeypatch)
        out = tmp_path / f"accum{accum}-{negatives}"
        train(TrainConfig(shards=str(tiny_shards), out=str(out), model=str(tiny_gpt_json), grad_accum=accum,
                          star_settings=StarSettings(negatives=negatives), **FLAGS))
        logs[accum, negatives], draws[accum, negatives] = read_log(out), by_step(seen, accum)
    one, two = draws[1, "global"], draws[2, "global"]
    assert len(one) == len(two) == 16 and one.keys() == two.keys()
    for key, (dropped, mask_scores, positions) in one.items():
        assert dropped == two[key][0] and torch.equal(mask_scores, two[key][1]), key
        assert torch.equal(positions, two[key][2]), key
    assert any(dropped for dropped, _, _ in one.values()), "class dropout drew something (0.1 of 16 images)"
    for term in TERMS:
        assert logs[2, "global"][0][term] == pytest.approx(logs[1, "global"][0][term], abs=2e-5), term
        assert logs[2, "global"][1][term] == pytest.approx(logs[1, "global"][1][term], abs=2e-4), term
    # a micro-batch's own 4 images are fewer, easier negatives than the step's 8
    assert logs[2, "local"][0]["loss_step"] < logs[1, "global"][0]["loss_step"] - 0.1


def test_two_processes_with_accumulation_log_the_one_process_losses(tiny_shards, tiny_gpt_json, tmp_path):
    """2 processes x --grad-accum 2 x 2 images against 1 process x 8 images: every micro-batch's rows sit at their
    place in the gathered global batch, and DDP's mean gradient is the one-process gradient (step 2)."""
    train(TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "one"), model=str(tiny_gpt_json), **FLAGS))
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in FLAGS.items() if name not in
             ("progress", "deterministic")]
    command = [sys.executable, *TWO_CPU_PROCESSES, str(REPO / "train" / "run.py"), "--shards", str(tiny_shards),
               "--model", str(tiny_gpt_json), "--out", str(tmp_path / "two"), "--grad-accum", "2", "--no-progress",
               "--deterministic", *flags]
    result = subprocess.run(command, env={**os.environ, **CPU_ENV, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["batch_per_process"] == 2
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for term in TERMS:
        assert two[0][term] == pytest.approx(one[0][term], abs=2e-5), term
        assert two[1][term] == pytest.approx(one[1][term], abs=2e-4), term


def test_stream_batches_never_hold_an_image_twice(tiny_shards, monkeypatch):
    """3 small shards resampled with a shuffle buffer bring images back while their first copy is still buffered:
    the stream loader's batches hold distinct images (the sample keys' ids), and every image is a real sample."""
    import star.train.token_loader as token_loader

    batches = iter(token_loader.stream_loader(tiny_shards, 2, 8, seed=0, view_match="index", rank=0, workers=0,
                                              shuffle_buffer=16))
    seen = set()
    for _ in range(30):
        ids = next(batches).indices.tolist()
        assert len(set(ids)) == 8, ids
        seen.update(ids)
    assert len(seen) == 24, "ids name the 24 stored images"
    monkeypatch.setattr(token_loader, "collate_views", lambda batch: [item[3] for item in batch])
    items = [(None, 0, None, image) for image in (1, 2, 1, 3, 1, 4, 5, 6)]
    assert list(token_loader.distinct_batches(3)(iter(items))) == [[1, 2, 3], [1, 4, 5]], \
        "a repeated image waits for the next batch, in arrival order"

"""A GPU cluster's day one, rehearsed with CPU processes and faked host names: the first launch survives a slow
token-cache build, a preempted job resumes on another node by itself, shards can be remote, batches hold a
global shuffle's spread of classes, and sampling survives a crash."""
import functools
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CPU_ENV, TINY_GPT, TWO_CPU_PROCESSES

from star.data.synthetic import SyntheticLayout, write_synthetic_shards
from star.lock import FolderLocked, folder_lock
from star.train.loop import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def run_config(shards, out, model, **overrides) -> TrainConfig:
    fields = dict(shards=str(shards), out=str(out), model=str(model), steps=2, batch_size=8, lr=2e-3,
                  num_workers=0, log_every=1, ckpt_every=2, progress=False, self_guided=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def test_first_launch_survives_a_cache_build_longer_than_the_collective_timeout(tiny_shards, tiny_gpt_json, tmp_path):
    """Rank 0 builds the token cache for 15 s while rank 1 waits; the process group gives up after 6 s. The
    waiting rank polls for the cache instead of sitting in a collective, so the launch trains."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for path in tiny_shards.iterdir():
        if path.is_file():
            (shards / path.name).write_bytes(path.read_bytes())
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent("""
        import time
        import star.train.token_cache as cache
        _fill_all = cache._fill_all
        def slow_fill_all(*args, **kwargs):
            time.sleep(15)  # a cold network filesystem, 1.28M images
            return _fill_all(*args, **kwargs)
        cache._fill_all = slow_fill_all
    """))
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}"}
    command = [sys.executable, *TWO_CPU_PROCESSES, str(REPO / "train" / "run.py"), "--shards", str(shards),
               "--model", str(tiny_gpt_json), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8",
               "--num-workers", "0", "--no-star", "--no-progress", "--dist-timeout", "0.1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2
    # the stream loader across the two ranks: each resamples its own shards with its own seed
    stream = [arg if arg != str(tmp_path / "run") else str(tmp_path / "stream") for arg in command]
    result = subprocess.run(stream + ["--loader", "stream"], env={**os.environ, **CPU_ENV, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "stream" / "checkpoints" / "step-0000002" / "meta.json").is_file()
    # --prepare-only builds it ahead of a launch: the next launch finds it
    prepared = subprocess.run([sys.executable, str(REPO / "train" / "run.py"), "--shards", str(shards),
                               "--prepare-only", "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert prepared.returncode == 0 and "token cache" in prepared.stdout, prepared.stderr[-2000:]
    assert len(list((tmp_path / "c").glob("tokens-*/cache.json"))) == 1


LOCK_HOLDER = """
import socket, sys, time
sys.path.insert(0, {repo!r})
socket.gethostname = lambda: {host!r}
from star.lock import folder_lock
with folder_lock({folder!r}, "train/run.py on {host}", lease_s=3.0, refresh_s=0.5):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_lock(folder: Path, host: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(repo=str(REPO), host=host, folder=str(folder))],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_lock_from_a_preempted_node_is_taken_over_once_its_lease_lapses(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    holder = hold_lock(tmp_path, "node-a")
    try:
        time.sleep(4)  # longer than the lease: the live holder keeps refreshing it
        with pytest.raises(FolderLocked, match="pid .* on host node-a"):
            with folder_lock(tmp_path, "requeued job", lease_s=3.0):
                pass
    finally:
        holder.kill()  # preempted: no clean-up, its lock stays behind
        holder.wait()
    with pytest.raises(FolderLocked):  # not stale yet
        with folder_lock(tmp_path, "requeued job", lease_s=3.0):
            pass
    time.sleep(3.5)
    with pytest.warns(UserWarning, match="not refreshed it for"):
        with folder_lock(tmp_path, "requeued job", lease_s=3.0):
            assert json.loads((tmp_path / ".lock").read_text())["host"] == "node-b"
    assert not (tmp_path / ".lock").exists()


def test_break_lock_takes_over_a_live_holder(tmp_path):
    holder = hold_lock(tmp_path, "node-a")
    try:
        with pytest.warns(UserWarning, match="--break-lock was given"):
            with folder_lock(tmp_path, "a person who knows", break_lock=True):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_requeued_job_on_another_node_resumes_by_itself(tiny_shards, tiny_gpt_json, tmp_path, monkeypatch):
    import socket

    out = tmp_path / "run"
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=2))
    (out / ".lock").write_text(json.dumps({"pid": 12345, "host": "node-a", "purpose": "train/run.py"}))
    old = time.time() - 600
    os.utime(out / ".lock", (old, old))  # node-a was preempted ten minutes ago, mid-run
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    with pytest.warns(UserWarning, match="taking over the lock"):
        summary = train(run_config(tiny_shards, out, tiny_gpt_json, steps=4, resume="auto"))
    assert summary["steps"] == 4 and not (out / ".lock").exists()


# ----------------------------------------------------------------------------------------------------------
# Remote shards


@pytest.fixture()
def http_shards(tiny_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_stream_loader_trains_from_urls_and_pipes(tiny_shards, tiny_gpt_json, tmp_path, http_shards):
    for name, location in (("http", http_shards), ("pipe", f"pipe:cat {tiny_shards}/{{}}")):
        summary = train(run_config(location, tmp_path / name, tiny_gpt_json, loader="stream", steps=3))
        assert summary["steps"] == 3
    # the map loader builds its cache from a remote location too, into a local --cache-dir
    summary = train(run_config(http_shards, tmp_path / "map", tiny_gpt_json, cache_dir=str(tmp_path / "cache")))
    assert summary["steps"] == 2 and list((tmp_path / "cache").glob("tokens-*/cache.json"))
    with pytest.raises(ValueError, match="give --cache-dir"):
        train(run_config(http_shards, tmp_path / "nocache", tiny_gpt_json))


# ----------------------------------------------------------------------------------------------------------
# Classes per batch


def classes_per_batch(shards: Path, batches: int = 12) -> float:
    from star.train.token_loader import stream_loader

    loader = stream_loader(shards, 1, 64, seed=0, view_match="index", rank=0, workers=0, shuffle_buffer=100)
    stream = iter(loader)
    return float(np.mean([len(set(next(stream).labels.tolist())) for _ in range(batches)]))


def test_stream_batches_hold_a_global_shuffles_spread_of_classes(tmp_path):
    layout = SyntheticLayout(2000, num_classes=50, grid=2, views=1, codebook_size=64, image_size=8)
    write_synthetic_shards(tmp_path / "shuffled", layout, shard_size=200)
    write_synthetic_shards(tmp_path / "listing", layout, shard_size=200, order="listing")
    global_shuffle = 50 * (1 - (1 - 1 / 50) ** 64)  # expected distinct classes in 64 uniform draws: 36.3
    assert classes_per_batch(tmp_path / "shuffled") == pytest.approx(global_shuffle, rel=0.1)
    assert classes_per_batch(tmp_path / "listing") < 0.5 * global_shuffle  # class-ordered shards: 5 classes each


def test_probe_limit_draws_a_class_balanced_random_subset(tmp_path):
    from star.data.manifest import shard_tokens

    layout = SyntheticLayout(300, num_classes=3, grid=2, views=1, codebook_size=64, image_size=8)
    write_synthetic_shards(tmp_path / "s", layout, shard_size=100, order="listing")  # class 0 fills the first shard
    tokens, labels = shard_tokens(tmp_path / "s", limit=30)
    assert np.bincount(labels).tolist() == [10, 10, 10] and tokens.shape == (30, 4)
    again, _ = shard_tokens(tmp_path / "s", limit=30)
    other, _ = shard_tokens(tmp_path / "s", limit=30, seed=1)
    assert np.array_equal(tokens, again) and not np.array_equal(tokens, other)


# ----------------------------------------------------------------------------------------------------------
# Sampling at scale


def test_sampling_resumes_from_its_finished_batches(tmp_path, small_vq, monkeypatch):
    from star.eval import sample
    from star.eval.sample import SampleConfig, run_sampling
    from star.gpt.generate import SamplingSettings
    from star.gpt.model import GPT, GPTConfig
    from star.weights_io import save_gpt

    save_gpt(GPT(GPTConfig.resolve({**TINY_GPT, "num_classes": 3})), tmp_path / "gpt")
    settings = dict(ckpt=str(tmp_path / "gpt"), vq_ckpt=str(small_vq[0]), vq_config=str(small_vq[1]),
                    sampling=SamplingSettings(cfg_scale=2.0), num_samples=10, batch_size=3, progress=False)
    whole = run_sampling(SampleConfig(out=str(tmp_path / "whole"), **settings))
    made = []
    real_generate = sample.generate

    def crash_after_two(*args, **kwargs):
        if len(made) == 2:
            raise RuntimeError("killed")
        made.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", crash_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        run_sampling(SampleConfig(out=str(tmp_path / "crashed"), **settings))
    monkeypatch.setattr(sample, "generate", real_generate)
    resumed = run_sampling(SampleConfig(out=str(tmp_path / "crashed"), **settings))
    assert whole["reused_batches"] == 0 and resumed["reused_batches"] == 2
    a, b = np.load(tmp_path / "whole" / "samples.npz"), np.load(tmp_path / "crashed" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert a["arr_0"].shape == (10, 32, 32, 3)
    assert not list((tmp_path / "crashed").glob(".parts-*")), "the batches are removed once merged"

"""Careless or hostile input: nothing outside its folders is read, written or run; no flag destroys what the
tool did not create; no training on the wrong data; no hang; one clear line instead of a traceback."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import TINY_GPT
from test_tokenize import config_for, make_folder, noise_image

from star.data.extract import run_tokenize
from star.data.manifest import Manifest
from star.train.loop import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def run_config(shards, out, model, **overrides) -> TrainConfig:
    fields = dict(shards=str(shards), out=str(out), model=str(model), steps=4, batch_size=8, lr=2e-3,
                  num_workers=0, log_every=1, ckpt_every=2, keep_checkpoints=0, progress=False, self_guided=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def copy_shards(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


def edit_manifest(folder: Path, edit) -> None:
    record = json.loads((folder / "manifest.json").read_text())
    edit(record)
    (folder / "manifest.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------------------------------------
# Nothing outside its folders is read, written or run


def test_a_manifest_cannot_run_a_command_or_read_outside_its_folder(tiny_shards, tiny_gpt_json, tmp_path):
    evil = tmp_path / "evil.sh"
    marker = tmp_path / "ran"
    evil.write_text(f"touch {marker}\n")
    for name in ("pipe:sh evil.sh;cat shard-000000.tar", "../outside.tar", str(tiny_shards / "shard-000000.tar")):
        folder = copy_shards(tiny_shards, tmp_path / f"s{abs(hash(name))}")
        (folder / "evil.sh").write_text(evil.read_text())
        edit_manifest(folder, lambda m: m["shards"][0].update(file=name))
        for loader in ("stream", "map"):
            with pytest.raises(ValueError, match="not a plain file name inside the shard folder"):
                train(run_config(folder, tmp_path / f"run-{loader}-{abs(hash(name))}", tiny_gpt_json, loader=loader))
    assert not marker.exists()


def test_symlinks_out_of_data_are_not_followed_unless_asked(tmp_path, small_vq):
    make_folder(tmp_path / "data", per_class=1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    noise_image(7).save(outside / "secret.png")
    (tmp_path / "data" / "system").symlink_to(outside)  # a "class folder" that is a link to /etc, say
    run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq))
    manifest = Manifest.load(tmp_path / "out")
    assert "system" not in manifest.classes and manifest.num_samples == 3
    assert any("outside --data" in item.reason for item in manifest.rejected)
    run_tokenize(config_for(tmp_path / "data", tmp_path / "out2", small_vq, follow_links=True))
    assert Manifest.load(tmp_path / "out2").num_samples == 4


# ----------------------------------------------------------------------------------------------------------
# No flag destroys what the tool did not create


def test_preview_never_replaces_a_file_it_did_not_write(tiny_shards, tmp_path, small_vq):
    from star.data.inspect_shards import InspectConfig, inspect

    folder = copy_shards(tiny_shards, tmp_path / "s")
    manifest_bytes = (folder / "manifest.json").read_bytes()
    config = InspectConfig(shards=str(folder), vq_ckpt=str(small_vq[0]), vq_config=str(small_vq[1]),
                           preview=str(folder / "manifest.json"))
    with pytest.raises(ValueError, match="--preview .*manifest.json exists and is not a PNG preview"):
        inspect(config)
    assert (folder / "manifest.json").read_bytes() == manifest_bytes
    ours = InspectConfig(shards=str(folder), vq_ckpt=str(small_vq[0]), vq_config=str(small_vq[1]),
                         preview=str(tmp_path / "p.png"))
    inspect(ours)
    inspect(ours)  # its own preview is replaced
    with pytest.raises(ValueError, match="is a folder"):
        inspect(InspectConfig(shards=str(folder), vq_ckpt=str(small_vq[0]), vq_config=str(small_vq[1]),
                              preview=str(tmp_path)))


def test_save_tokens_never_replaces_the_checkpoint_or_a_foreign_file(tmp_path):
    from star.eval.sample import SampleConfig, run_sampling
    from star.gpt.model import GPT, GPTConfig
    from star.weights_io import save_gpt

    save_gpt(GPT(GPTConfig.resolve(TINY_GPT)), tmp_path / "gpt")
    weights = tmp_path / "gpt" / "model.safetensors"
    before = weights.read_bytes()
    common = dict(ckpt=str(tmp_path / "gpt"), out=str(tmp_path / "s"), tokens_only=True, num_samples=2,
                  progress=False)
    with pytest.raises(ValueError, match="is an input of this command"):
        run_sampling(SampleConfig(**common, save_tokens=str(weights)))
    assert weights.read_bytes() == before
    notes = tmp_path / "notes.npy"
    np.save(notes, np.zeros(3, np.float32))  # someone's array, not a token array
    with pytest.raises(ValueError, match="not a token array written by this tool"):
        run_sampling(SampleConfig(**common, save_tokens=str(notes)))
    with pytest.raises(ValueError, match="is a folder"):
        run_sampling(SampleConfig(**common, save_tokens=str(tmp_path)))
    run_sampling(SampleConfig(**common, save_tokens=str(tmp_path / "t.npy")))
    run_sampling(SampleConfig(**common, save_tokens=str(tmp_path / "t.npy")))  # its own: replaced
    run_sampling(SampleConfig(**common, save_tokens=str(notes), overwrite=True))
    assert np.load(notes).shape == (2, 64)


def test_fid_out_never_replaces_a_manifest(tiny_shards, tmp_path):
    from star.eval.metrics import FidConfig, run_fid

    folder = copy_shards(tiny_shards, tmp_path / "s")
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    before = (folder / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="exists and is not a metrics file"):
        run_fid(FidConfig(samples=str(tmp_path / "samples.npz"), ref=str(tmp_path / "samples.npz"),
                          out=str(folder / "manifest.json")))
    assert (folder / "manifest.json").read_bytes() == before


def test_resuming_an_older_checkpoint_branches_instead_of_rewriting_history(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=6))
    later = {name: (out / "checkpoints" / name / "model.safetensors").read_bytes()
             for name in ("step-0000004", "step-0000006")}
    older = out / "checkpoints" / "step-0000002"
    with pytest.raises(ValueError, match="older than this run's newest checkpoint.*--out .*-from-2 --resume"):
        train(run_config(tiny_shards, out, tiny_gpt_json, steps=6, resume=str(older)))
    for name, weights in later.items():
        assert (out / "checkpoints" / name / "model.safetensors").read_bytes() == weights
    assert older.is_dir()
    branch = train(run_config(tiny_shards, tmp_path / "branch", tiny_gpt_json, steps=6, resume=str(older)))
    assert branch["steps"] == 6 and (tmp_path / "branch" / "checkpoints" / "step-0000006").is_dir()


def test_pruning_keeps_files_the_trainer_did_not_write(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=2, keep_checkpoints=1))
    samples = out / "checkpoints" / "step-0000002" / "samples"
    samples.mkdir()
    (samples / "samples.npz").write_bytes(b"a person's samples")
    with pytest.warns(UserWarning, match="kept 1 file"):
        train(run_config(tiny_shards, out, tiny_gpt_json, steps=4, keep_checkpoints=1, resume="auto"))
    assert (samples / "samples.npz").read_bytes() == b"a person's samples"
    assert not (out / "checkpoints" / "step-0000002" / "model.safetensors").exists()


def test_train_out_refuses_a_shard_folder_an_image_folder_and_a_file(tiny_shards, tiny_gpt_json, tmp_path):
    folder = copy_shards(tiny_shards, tmp_path / "s")
    with pytest.raises(ValueError, match="is a token-shard folder"):
        train(run_config(tiny_shards, folder, tiny_gpt_json))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_shards.iterdir() if p.is_file())
    make_folder(tmp_path / "images", per_class=1)
    with pytest.raises(ValueError, match="holds image class folders"):
        train(run_config(tiny_shards, tmp_path / "images", tiny_gpt_json))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(run_config(tiny_shards, tmp_path / "file", tiny_gpt_json))


# ----------------------------------------------------------------------------------------------------------
# No silent training on the wrong data


def test_file_names_that_collide_after_normalising_keep_their_own_keys(tmp_path, small_vq):
    for name in ("a b/x.y.z.png", "a b/x_y.z.png", "a b/x.y_z.png", "c/one.png"):
        (tmp_path / "data" / Path(name).parent).mkdir(parents=True, exist_ok=True)
        noise_image(len(name)).save(tmp_path / "data" / name)
    summary = run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq, shard_size=10))
    keys = [sample.key for sample in Manifest.load(tmp_path / "out").iter_samples()]
    assert summary["images"] == 4 and len(set(keys)) == 4  # all read back, none merged


def test_resume_on_other_shards_is_refused(tiny_shards, tiny_gpt_json, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_shards, out, tiny_gpt_json, steps=2))
    config_before = (out / "config.json").read_bytes()
    other = copy_shards(tiny_shards, tmp_path / "other")
    edit_manifest(other, lambda m: m.update(classes={"x": 0, "y": 1, "z": 2}))  # same tokens, other data
    with pytest.raises(ValueError, match="data_digest: checkpoint"):
        train(run_config(other, out, tiny_gpt_json, steps=4, resume="auto"))
    assert (out / "config.json").read_bytes() == config_before  # nothing rewritten


def test_a_swapped_weights_file_is_refused(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "a", tiny_gpt_json, steps=2))
    train(run_config(tiny_shards, tmp_path / "b", tiny_gpt_json, steps=2, seed=1))
    target = tmp_path / "a" / "checkpoints" / "step-0000002" / "model.safetensors"
    target.write_bytes((tmp_path / "b" / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="belongs to another checkpoint"):
        train(run_config(tiny_shards, tmp_path / "a", tiny_gpt_json, steps=4, resume="auto"))


def test_init_from_another_tokenizer_warns(tiny_shards, tiny_gpt_json, tmp_path):
    train(run_config(tiny_shards, tmp_path / "a", tiny_gpt_json, steps=2))
    checkpoint = tmp_path / "a" / "checkpoints" / "step-0000002"
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": "f" * 64}))
    with pytest.warns(UserWarning, match="trained on tokenizer ffffffffffff"):
        train(run_config(tiny_shards, tmp_path / "b", tiny_gpt_json, steps=1, init_from=str(checkpoint)))


def test_probe_refuses_eval_shards_with_other_classes(tiny_shards, tiny_gpt_json, tmp_path):
    from star.eval.understanding import AnalysisModel, ProbeConfig, run_probe

    train(run_config(tiny_shards, tmp_path / "run", tiny_gpt_json, steps=1))
    other = copy_shards(tiny_shards, tmp_path / "other")
    edit_manifest(other, lambda m: m.update(classes={"a": 0, "b": 1, "c": 2}))
    with pytest.raises(ValueError, match="has other classes than --shards"):
        run_probe(ProbeConfig(AnalysisModel(str(tmp_path / "run")), shards=str(tiny_shards), eval_shards=str(other),
                              out=str(tmp_path / "p")))


@pytest.mark.parametrize("fields, message", [
    ({"n_layer": 0}, "n_layer=0"),
    ({"dim": 10**6}, "dim=1000000"),
    ({"n_layer": 10**6}, "n_layer=1000000"),
    ({"dim": -64}, "dim=-64"),
    ({"dim": "64"}, "dim='64'"),
    ({"dim": 8192, "n_layer": 1000}, "B parameters"),
])
def test_model_configs_that_cannot_be_meant_are_one_line(fields, message):
    from star.gpt.config import GPTConfig

    with pytest.raises(ValueError, match=message):
        GPTConfig.resolve({**TINY_GPT, **fields})


def test_tokenize_refuses_a_token_shard_folder_as_data(tiny_shards, tmp_path, small_vq):
    with pytest.raises(ValueError, match="is a token-shard folder"):
        run_tokenize(config_for(tiny_shards, tmp_path / "out", small_vq))


def write_input_tar(path: Path, samples: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, cls in samples:
            buffer = io.BytesIO()
            noise_image(len(key)).save(buffer, format="PNG")
            for extension, payload in (("png", buffer.getvalue()), ("cls", cls)):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_webdataset_inputs_with_impossible_class_ids_are_rejected(tmp_path, small_vq):
    (tmp_path / "tars").mkdir()
    write_input_tar(tmp_path / "tars" / "in-0.tar", [("a", b"1"), ("b", b"-3"), ("c", b"1000000000"), ("d", b"0")])
    started = time.time()
    summary = run_tokenize(config_for(tmp_path / "tars", tmp_path / "out", small_vq))
    assert time.time() - started < 120  # no table of a billion class names
    manifest = Manifest.load(tmp_path / "out")
    assert summary["images"] == 2 and manifest.num_classes == 2
    reasons = " ".join(item.reason for item in manifest.rejected)
    assert "class id -3" in reasons and "class id 1000000000" in reasons


# ----------------------------------------------------------------------------------------------------------
# No hang, and one clear line instead of a traceback


def test_a_fifo_among_the_images_is_skipped_not_waited_on(tmp_path, small_vq):
    make_folder(tmp_path / "data", per_class=1)
    os.mkfifo(tmp_path / "data" / "cat" / "x.png")
    started = time.time()
    run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq))
    assert time.time() - started < 120
    rejected = {item.path: item.reason for item in Manifest.load(tmp_path / "out").rejected}
    assert "not a regular file" in rejected["cat/x.png"]


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 5678"),
    Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left\" })"),
])
def test_disk_full_while_checkpointing_is_one_line_whichever_library_notices(tmp_path, monkeypatch, error):
    from test_checkpoint import tiny_state

    from star.checkpoint_folder import CheckpointWriteError
    from star.train import run_folder

    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # the disk fills while a file is written
    with pytest.raises(CheckpointWriteError, match="no space left on device") as caught:
        run_folder.save_training_state(tmp_path, 2, tiny_state(2), keep=1)
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


@pytest.mark.parametrize("sent, code, workers", [(signal.SIGTERM, 143, 1), (signal.SIGINT, 130, 0)])
def test_a_signal_checkpoints_at_the_next_step_releases_the_lock_and_exits_with_one_line(
        tiny_shards, tiny_gpt_json, tmp_path, sent, code, workers):
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "train" / "run.py"), "--shards", str(tiny_shards), "--model",
               str(tiny_gpt_json), "--out", str(out), "--steps", "100000", "--batch-size", "8", "--num-workers",
               str(workers), "--log-every", "1", "--ckpt-every", "100000", "--no-star", "--no-progress"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "log.jsonl").is_file() or len((out / "log.jsonl").read_text().splitlines()) < 3:
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(process.pid, sent)  # as a scheduler does: the trainer and its DataLoader workers alike
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code
    assert stderr.strip().splitlines()[-1].startswith(f"stopped by {signal.Signals(sent).name} after step")
    assert "Traceback" not in stderr
    step = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"]
    assert (out / "checkpoints" / f"step-{step:07d}" / "meta.json").is_file()  # nothing done is lost
    assert not (out / ".lock").exists()
    resumed = train(run_config(tiny_shards, out, tiny_gpt_json, steps=step + 1, resume="auto", ckpt_every=1000))
    assert resumed["steps"] == step + 1


def test_config_files_that_are_not_json_are_one_line(tmp_path):
    from star.gpt.config import GPTConfig
    from star.vq.model import VQConfig

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a JSON config file"):
        VQConfig.resolve(str(weights))
    with pytest.raises(ValueError, match="not a JSON config file"):
        GPTConfig.resolve(str(weights))


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 2048}, "--image-size must be from 16 to 1024"),
    ({"crop_range": 1e9}, "--crop-range must be a number from 1 to 2"),
])
def test_tokenize_sizes_out_of_range_are_one_line(tmp_path, small_vq, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_for(tmp_path, tmp_path / "out", small_vq, **overrides)


def test_a_corrupt_image_in_a_fid_reference_folder_is_skipped(tmp_path):
    from star.eval.reference import image_source

    folder = tmp_path / "ref"
    folder.mkdir()
    for index in range(3):
        noise_image(index, size=(32, 32)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        images = list(image_source(folder))
    assert len(images) == 3


def test_untrusted_pickles_are_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch boom",))

    torch.save({"model": Boom()}, tmp_path / "evil.pt")
    from star.weights import load_llamagen_state_dict

    with pytest.raises(ValueError, match="weights_only"):
        load_llamagen_state_dict(tmp_path / "evil.pt")
    assert not Path("boom").exists()


def test_one_device_rule_for_every_command_and_pick_device():
    from star.runtime import pick_device
    from star.settings import check_device

    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        check_device(good)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError, match=f"--device {bad!r}: use auto, cpu, cuda or cuda:N"):
            check_device(bad)
    with pytest.raises(ValueError, match="device 'tpu': use auto"):
        pick_device("tpu")

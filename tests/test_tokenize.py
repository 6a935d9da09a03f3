"""Stage one end to end on tiny inputs with the small official-format VQ (32 px -> 8x8 tokens)."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CPU_ENV, TWO_CPU_PROCESSES  # noqa: E402
from PIL import Image

from star.data.extract import TokenizeConfig, run_tokenize
from star.data.inspect_shards import describe_manifest, validate_shards
from star.data.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


def noise_image(seed: int, size=(40, 36), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def make_folder(root: Path, per_class: int = 3, classes=("bird", "cat", "dog")) -> list[str]:
    paths = []
    for class_index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            path = root / name / f"img.{index}.png"  # a dot in the stem: keys must stay WebDataset-safe
            noise_image(class_index * 100 + index).save(path)
            paths.append(f"{name}/img.{index}.png")
    return paths


def config_for(data, out, small_vq, **overrides) -> TokenizeConfig:
    ckpt, vq_json = small_vq
    settings = dict(data=str(data), out=str(out), vq_ckpt=str(ckpt), vq_config=str(vq_json), image_size=32,
                    view_policy="tencrop", shard_size=2, batch_size=3, num_workers=0, progress=False)
    settings.update(overrides)
    return TokenizeConfig(**settings)


def read_all(out: Path) -> dict:
    manifest = Manifest.load(out)
    samples = {}
    for sample in manifest.iter_samples():
        assert sample.key not in samples, f"{sample.key} written twice"
        samples[sample.key] = sample
    return samples


def test_folder_round_trip(tmp_path, small_vq):
    sources = make_folder(tmp_path / "data")
    summary = run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq))
    assert summary["images"] == 9 and summary["shards"] == 5 and summary["rejected"] == 0
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.classes == {"bird": 0, "cat": 1, "dog": 2}
    assert manifest.grid == (8, 8) and manifest.codebook_size == 256 and manifest.num_views == 10
    samples = read_all(tmp_path / "out")
    assert sorted(s.source for s in samples.values()) == sorted(sources)
    sample = samples["cat/img%2E1%2Epng"]
    assert sample.class_id == 1 and sample.tokens.dtype == np.uint16 and sample.tokens.shape == (10, 8, 8)
    assert sample.source_size == (40, 36) and [v["flip"] for v in sample.views] == [False] * 5 + [True] * 5

    # The stored tokens are what the VQ gives for the view pixels.
    import torch

    from star.data.views import ViewPolicy, make_views
    from star.vq.model import VQConfig, load_vq

    vq = load_vq(small_vq[0], VQConfig.resolve(small_vq[1]))
    views = make_views(noise_image(101), ViewPolicy.parse("tencrop"), 32, 1.1, "cat/img%2E1%2Epng", 0)
    pixels = torch.from_numpy(np.stack([v.pixels for v in views])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        expected = vq.encode_indices(pixels).numpy()
    assert np.array_equal(sample.tokens.astype(np.int64), expected)

    # Readable by webdataset too, with the keys intact.
    import webdataset as wds

    shard = manifest.shard_paths(tmp_path / "out")[0]
    first = next(iter(wds.WebDataset(str(shard), shardshuffle=False, nodesplitter=None)))
    assert set(first) >= {"__key__", "tokens.npy", "cls", "json"} and first["__key__"] == "bird/img%2E0%2Epng"
    assert validate_shards(tmp_path / "out")["problems"] == []


def test_rerun_after_crash_redoes_only_missing_shards(tmp_path, small_vq):
    import socket

    make_folder(tmp_path / "data")
    config = config_for(tmp_path / "data", tmp_path / "out", small_vq)
    run_tokenize(config)
    out = tmp_path / "out"
    # A process killed mid-run leaves: a shard with a tar but no sidecar, a shard with neither, its temp files.
    (out / "shard-000001.json").unlink()
    (out / "shard-000003.json").unlink()
    (out / "shard-000003.tar").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), socket.gethostname()
    (out / f".shard-000004.tar.pid{dead_pid}@{host}.tmp").write_bytes(b"partial")
    (out / f".shard-000001.json.pid{dead_pid}@{host}.tmp").write_bytes(b"partial")
    # Temporaries this run must not touch: a live process's, another host's, and a name tokenize never writes.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        kept = [out / f".shard-000002.tar.pid{live.pid}@{host}.tmp", out / f".shard-000002.tar.pid{dead_pid}@elsewhere.tmp",
                out / ".shard-000004.tar.abc123.tmp"]
        for path in kept:
            path.write_bytes(b"someone else's")
        untouched = (out / "shard-000000.tar").stat().st_mtime_ns
        summary = run_tokenize(config)
    finally:
        live.kill()
        live.wait()
    assert summary["shards_now"] == 2 and summary["images_now"] == 4
    assert (out / "shard-000000.tar").stat().st_mtime_ns == untouched
    assert sorted(out.glob(".*.tmp")) == sorted(kept) and all(p.read_bytes() == b"someone else's" for p in kept)
    assert len(read_all(out)) == 9


def test_bad_inputs_are_skipped_and_listed(tmp_path, small_vq):
    data = tmp_path / "data"
    make_folder(data, per_class=1, classes=("a",))
    (data / "a" / "notes.txt").write_text("not an image")
    good = io.BytesIO()
    noise_image(5).save(good, format="JPEG")
    (data / "a" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    noise_image(6, mode="CMYK").save(data / "a" / "cmyk.jpg")
    noise_image(7, mode="P").save(data / "a" / "palette.png")
    noise_image(8, mode="RGBA").save(data / "a" / "alpha.png")
    noise_image(9, mode="L").save(data / "a" / "gray.png")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(data / "a" / "deep.png")
    noise_image(10, size=(12, 9)).save(data / "a" / "tiny.png")  # smaller than the 35 px frame: upscaled
    summary = run_tokenize(config_for(data, tmp_path / "out", small_vq, shard_size=4))
    assert summary["images"] == 7 and summary["rejected"] == 2
    manifest = Manifest.load(tmp_path / "out")
    reasons = {item.path: item.reason for item in manifest.rejected}
    assert set(reasons) == {"a/notes.txt", "a/truncated.jpg"}
    assert all("not a readable image" in reason for reason in reasons.values())
    assert validate_shards(tmp_path / "out")["problems"] == []


def test_empty_input_is_an_error_before_any_work(tmp_path, small_vq):
    (tmp_path / "data" / "empty_class").mkdir(parents=True)
    with pytest.raises(ValueError, match="hold no files"):
        run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq))
    with pytest.raises(ValueError, match="no input found"):
        run_tokenize(config_for(tmp_path / "nothing", tmp_path / "out", small_vq))
    assert not (tmp_path / "out").exists()


def test_output_of_another_size_or_tokenizer_is_refused(tmp_path, small_vq):
    make_folder(tmp_path / "data", per_class=1)
    run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq))
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="image_size: folder has 32, this run has 64"):
        run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq, image_size=64))
    import torch

    other_ckpt = tmp_path / "other.pt"
    checkpoint = torch.load(small_vq[0], weights_only=True)
    checkpoint["model"]["quant_conv.bias"] += 1.0  # another tokenizer of the same shape
    torch.save(checkpoint, other_ckpt)
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq, vq_ckpt=str(other_ckpt)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    (tmp_path / "out" / "plan.json").write_text("{half a pla")
    with pytest.raises(ValueError, match="plan.json is damaged"):
        run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq))


def test_webdataset_tar_inputs(tmp_path, small_vq):
    tars = tmp_path / "tars"
    tars.mkdir()
    for tar_index in range(2):
        with tarfile.open(tars / f"part-{tar_index}.tar", "w") as tar:
            for index in range(3):
                buffer = io.BytesIO()
                noise_image(tar_index * 10 + index).save(buffer, format="PNG")
                for name, payload in ((f"s{index}.png", buffer.getvalue()), (f"s{index}.cls", str(index + tar_index).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    summary = run_tokenize(config_for(tars, tmp_path / "out", small_vq, view_policy="random:2"))
    assert summary["images"] == 6 and summary["shards"] == 2
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.num_classes == 4 and manifest.num_views == 2
    samples = read_all(tmp_path / "out")
    assert samples["part-1/s2"].class_id == 3 and samples["part-1/s2"].tokens.shape == (2, 8, 8)


def test_two_processes_write_disjoint_shards(tmp_path, small_vq):
    sources = make_folder(tmp_path / "data", per_class=4)
    ckpt, vq_json = small_vq
    env = {**os.environ, **CPU_ENV}
    command = [sys.executable, *TWO_CPU_PROCESSES, str(REPO / "tokenize" / "run.py"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
               "--vq-ckpt", str(ckpt), "--vq-config", str(vq_json), "--image-size", "32", "--shard-size", "2",
               "--num-workers", "0", "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    writers = {json.loads(p.read_text())["process"] for p in out.glob("shard-*.json")}
    assert writers == {0, 1}
    samples = read_all(out)
    assert sorted(s.source for s in samples.values()) == sorted(sources)
    assert "tokenize summary" in result.stdout


def test_inspect_validates_and_previews(tmp_path, small_vq):
    make_folder(tmp_path / "data")
    out = tmp_path / "out"
    run_tokenize(config_for(tmp_path / "data", out, small_vq))
    command = [sys.executable, str(REPO / "tokenize" / "inspect_shards.py"), str(out), "--vq-ckpt", str(small_vq[0]),
               "--vq-config", str(small_vq[1]), "--preview", str(tmp_path / "preview.png")]
    healthy = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert healthy.returncode == 0, healthy.stderr[-2000:]
    assert "9 samples in 5 shards, 0 problems" in healthy.stdout
    preview = Image.open(tmp_path / "preview.png")
    assert preview.size == (10 * 34, 4 * 34)  # a row per sample (4), a column per view (10), 32 px + 2 px gaps
    # A truncated shard is found and named.
    shard = out / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    broken = subprocess.run(command[:3], capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1
    assert "shard-000002.tar" in broken.stdout and "problems" in broken.stdout
    not_shards = subprocess.run(command[:2] + [str(tmp_path / "data")], capture_output=True, text=True, timeout=300)
    assert not_shards.returncode == 2 and "manifest.json not found" in not_shards.stderr.splitlines()[-1]


def test_kill_minus_9_then_rerun_redoes_only_missing_shards(tmp_path, small_vq):
    import signal
    import time

    sources = make_folder(tmp_path / "data", per_class=20)  # 60 images, 30 shards of 2
    ckpt, vq_json = small_vq
    command = [sys.executable, str(REPO / "tokenize" / "run.py"), "--data", str(tmp_path / "data"), "--out",
               str(tmp_path / "out"), "--vq-ckpt", str(ckpt), "--vq-config", str(vq_json), "--image-size", "32",
               "--shard-size", "2", "--batch-size", "1", "--num-workers", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(list((tmp_path / "out").glob("shard-*.json"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    from star.lock import FolderLocked

    with pytest.raises(FolderLocked, match=f"pid {process.pid} on this host"):  # a second tokenizer meanwhile
        run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq, shard_size=2, batch_size=1))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / "out" / ".lock").is_file()  # left by the killed run: stale, taken over by the rerun
    done_before = {p.name for p in (tmp_path / "out").glob("shard-*.json")}
    assert 3 <= len(done_before) < 30, "the run was killed mid-way"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    shards_now = int(next(line for line in rerun.stdout.splitlines() if "shards_now" in line).split(":")[1])
    assert shards_now == 30 - len(done_before)
    assert sorted(s.source for s in read_all(tmp_path / "out").values()) == sorted(sources)
    assert not list((tmp_path / "out").glob(".*.tmp"))


def _descendants(pid: int) -> set[int]:
    """Pids of all live descendants of `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its exit status is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_minus_9_leaves_no_dataloader_workers(tmp_path, small_vq):
    import signal
    import time

    make_folder(tmp_path / "data", per_class=20)
    ckpt, vq_json = small_vq
    command = [sys.executable, str(REPO / "tokenize" / "run.py"), "--data", str(tmp_path / "data"), "--out",
               str(tmp_path / "out"), "--vq-ckpt", str(ckpt), "--vq-config", str(vq_json), "--image-size", "32",
               "--shard-size", "2", "--batch-size", "1", "--num-workers", "2", "--no-progress"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list((tmp_path / "out").glob("shard-*.json")):  # workers are up and shards are being written
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    workers = _descendants(process.pid)
    assert len(workers) >= 2, "expected the DataLoader worker processes"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 5
    while any(_running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if _running(pid)]
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"DataLoader workers {left} outlived the killed tokenizer"


# ---------------------------------------------------------------------------------------------------------------
# Settings are validated before any work
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 0}, "--image-size must be from 16 to 1024"),
    ({"image_size": -32}, "--image-size must be from 16 to 1024"),
    ({"crop_range": 0.9}, "--crop-range must be a number from 1 to 2"),
    ({"crop_range": float("nan")}, "--crop-range must be a number from 1 to 2"),
    ({"crop_range": float("inf")}, "--crop-range must be a number from 1 to 2"),
    ({"shard_size": 0}, "--shard-size must be > 0"),
    ({"batch_size": -1}, "--batch-size must be > 0"),
    ({"num_workers": -1}, "--num-workers must be >= 0"),
    ({"view_policy": "random:0"}, "integer from 1 to 64"),
    ({"view_policy": "random:65"}, "integer from 1 to 64"),
    ({"view_policy": "random:many"}, "integer from 1 to 64"),
    ({"view_policy": "TenCrop"}, "choose one of tencrop, center, random:N"),
    ({"view_policy": "Center"}, "choose one of tencrop, center, random:N"),
    ({"precision": "fp16"}, "--precision 'fp16': choose one of auto, fp32, bf16"),
    ({"device": "gpu"}, "--device 'gpu'"),
])
def test_bad_settings_are_refused_by_the_config(tmp_path, small_vq, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        config_for(tmp_path / "data", tmp_path / "out", small_vq, **overrides)
    assert config_for(tmp_path / "data", tmp_path / "out", small_vq, view_policy="random:64").policy.num_views == 64


def test_command_line_exits_2_with_one_line(tmp_path, small_vq):
    command = [sys.executable, str(REPO / "tokenize" / "run.py"), "--data", str(tmp_path), "--out", str(tmp_path / "out"),
               "--vq-ckpt", str(small_vq[0]), "--view-policy", "TenCrop"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown view policy 'TenCrop': choose one of tencrop, center, random:N" in result.stderr.splitlines()[-1]
    unknown = subprocess.run(command[:-2] + ["--views", "tencrop"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unrecognized arguments: --views" in unknown.stderr.splitlines()[-1]
    assert "Traceback" not in unknown.stderr
    assert not (tmp_path / "out").exists()


def test_bf16_is_honoured_and_recorded(tmp_path, small_vq):
    make_folder(tmp_path / "data", per_class=1)
    run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq, precision="bf16"))
    assert Manifest.load(tmp_path / "out").precision == "bf16"
    with pytest.raises(ValueError, match="precision: folder has 'bf16', this run has 'fp32'"):
        run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq, precision="fp32"))
    run_tokenize(config_for(tmp_path / "data", tmp_path / "out32", small_vq))
    assert Manifest.load(tmp_path / "out32").precision == "fp32"  # auto on CPU
    # A folder whose plan.json predates the precision record is still accepted for a rerun.
    plan_path = tmp_path / "out32" / "plan.json"
    plan_path.write_text(json.dumps({k: v for k, v in json.loads(plan_path.read_text()).items() if k != "precision"}))
    assert run_tokenize(config_for(tmp_path / "data", tmp_path / "out32", small_vq))["shards_now"] == 0
    assert json.loads(plan_path.read_text())["precision"] == "fp32"


# ---------------------------------------------------------------------------------------------------------------
# Output folders are never clobbered
# ---------------------------------------------------------------------------------------------------------------
def test_out_that_is_not_a_shard_folder_is_refused(tmp_path, small_vq):
    make_folder(tmp_path / "data", per_class=1)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "config.json").write_text("{}")
    (run_folder / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="is not empty .*holiday.jpg.* and is not a token-shard folder"):
        run_tokenize(config_for(tmp_path / "data", photos, small_vq))
    with pytest.raises(ValueError, match="is a training run folder"):
        run_tokenize(config_for(tmp_path / "data", run_folder, small_vq))
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.jpg"]
    assert sorted(p.name for p in run_folder.iterdir()) == ["config.json", "log.jsonl"]
    with pytest.raises(ValueError, match="is inside --data"):
        run_tokenize(config_for(tmp_path / "data", tmp_path / "data" / "shards", small_vq))
    assert not (tmp_path / "data" / "shards").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_tokenize(config_for(tmp_path / "data", empty, small_vq))["images"] == 3  # an empty folder is fine


def test_a_second_tokenizer_on_the_same_out_is_refused_naming_the_holder(tmp_path, small_vq):
    import socket

    from star.lock import FolderLocked

    make_folder(tmp_path / "data", per_class=1)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                               "purpose": "tokenize/run.py (rank 0 of 1)"}))
        with pytest.raises(FolderLocked, match=f"in use by tokenize/run.py .*pid {holder.pid} on this host"):
            run_tokenize(config_for(tmp_path / "data", out, small_vq))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone (kill -9 leaves the lock file), the next run takes the lock over and releases it at the end.
    assert run_tokenize(config_for(tmp_path / "data", out, small_vq))["images"] == 3
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# Inputs are listed, never silently dropped
# ---------------------------------------------------------------------------------------------------------------
def test_listing_problems_are_rejected_with_reasons_not_fatal(tmp_path, small_vq, monkeypatch):
    data = tmp_path / "data"
    make_folder(data, per_class=2, classes=("cat", "dog"))
    noise_image(50).save(data / "stray.png")  # beside the class folders: it has no class
    (data / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # dangling
    (data / "cat" / "self.png").symlink_to(data / "cat" / "self.png")  # a loop
    (data / "dog" / "again").symlink_to(data / "dog")  # a directory loop
    (data / "kitty").symlink_to(data / "cat")  # the cat folder a second time
    (data / "locked").mkdir()
    noise_image(51).save(data / "locked" / "x.png")
    real_scandir = os.scandir

    def scandir(path="."):  # tests run as root, where chmod 000 does not stop reading
        if Path(path) == data / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = run_tokenize(config_for(data, tmp_path / "out", small_vq))
    manifest = Manifest.load(tmp_path / "out")
    reasons = {item.path: item.reason for item in manifest.rejected}
    assert summary["images"] == 4 and summary["rejected"] == len(reasons) == 6
    assert "top level" in reasons["stray.png"]
    assert reasons["cat/gone.png"].startswith("dangling symlink")
    assert reasons["cat/self.png"] == "symlink loop"
    assert reasons["dog/again"].startswith("symlink loop")
    assert reasons["kitty"].startswith("same directory as cat/") and "counted once" in reasons["kitty"]
    assert reasons["locked"] == "unreadable directory: Permission denied"
    # the locked folder is still a class (its images could not be listed), the duplicate is not
    assert manifest.classes == {"cat": 0, "dog": 1, "locked": 2}
    assert sorted(s.source for s in read_all(tmp_path / "out").values()) == [
        "cat/img.0.png", "cat/img.1.png", "dog/img.0.png", "dog/img.1.png"]
    assert "rejected inputs: 6" in describe_manifest(manifest)


def test_images_only_at_the_top_level_get_a_hint(tmp_path, small_vq):
    (tmp_path / "data").mkdir()
    noise_image(1).save(tmp_path / "data" / "a.png")
    with pytest.raises(ValueError, match="holds images but no class folders"):
        run_tokenize(config_for(tmp_path / "data", tmp_path / "out", small_vq))


# ---------------------------------------------------------------------------------------------------------------
# The manifest object
# ---------------------------------------------------------------------------------------------------------------
def test_manifest_round_trip_old_manifests_and_shard_verification(tmp_path, small_vq):
    make_folder(tmp_path / "data")
    out = tmp_path / "out"
    run_tokenize(config_for(tmp_path / "data", out, small_vq))
    manifest = Manifest.load(out)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert manifest.to_dict() == on_disk and manifest.num_samples == on_disk["num_samples"] == 9
    # A manifest written before `precision` existed (and one with a field from a newer writer) still loads.
    old = {key: value for key, value in on_disk.items() if key != "precision"}
    (out / "manifest.json").write_text(json.dumps({**old, "future_field": [1, 2]}))
    reloaded = Manifest.load(out)
    assert reloaded.precision is None and reloaded.extra == {"future_field": [1, 2]}
    assert reloaded.to_dict() == {**old, "future_field": [1, 2]}  # written back unchanged
    assert [s.key for s in reloaded.iter_samples()] == [s.key for s in read_all(out).values()]
    reloaded.verify()  # healthy: no error
    # A truncated shard is named by the cheap check (its size against the manifest's), before any training...
    shard = out / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(ValueError, match=r"1 damaged shard.*shard-000002\.tar: 1,500 bytes, the manifest says"):
        reloaded.verify()
    # ... and, for a manifest that records no sizes, by the header scan
    no_sizes = {**old, "shards": [{k: v for k, v in e.items() if k != "bytes"} for e in old["shards"]]}
    (out / "manifest.json").write_text(json.dumps(no_sizes))
    with pytest.raises(ValueError, match=r"1 damaged shard.*shard-000002\.tar: truncated"):
        Manifest.load(out).verify()
    (out / "shard-000004.tar").unlink()
    assert [p.split(":")[0] for p in reloaded.shard_problems(full=True)] == [str(shard), str(out / "shard-000004.tar")]
    (out / "manifest.json").write_text(json.dumps({**old, "shards": "nonsense"}))
    with pytest.raises(ValueError, match="manifest.json is damaged or incomplete"):
        Manifest.load(out)


def test_images_are_dealt_to_shards_in_a_seeded_order_and_an_older_folder_keeps_its_own(tmp_path, small_vq):
    make_folder(tmp_path / "data", per_class=4)  # 12 images listed class by class
    shuffled = run_tokenize(config_for(tmp_path / "data", tmp_path / "a", small_vq, shard_size=4))
    again = run_tokenize(config_for(tmp_path / "data", tmp_path / "b", small_vq, shard_size=4))
    listing = run_tokenize(config_for(tmp_path / "data", tmp_path / "c", small_vq, shard_size=4, shard_order="listing"))
    assert shuffled["images"] == again["images"] == listing["images"] == 12

    def classes_per_shard(out):
        return [len(json.loads((out / f"shard-00000{i}.json").read_text())["class_ids"]) for i in range(3)]

    assert classes_per_shard(tmp_path / "c") == [1, 1, 1]  # class by class
    assert max(classes_per_shard(tmp_path / "a")) > 1  # every shard mixes classes
    keys = [[s.key for s in Manifest.load(out).iter_samples()] for out in (tmp_path / "a", tmp_path / "b")]
    assert keys[0] == keys[1]  # the same permutation on a rerun: crash-safe
    # a folder written before the order was recorded was dealt in listing order: it is completed only that way
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    del plan["shard_order"]
    (tmp_path / "c" / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="shard_order: folder has 'listing', this run has 'shuffled'"):
        run_tokenize(config_for(tmp_path / "data", tmp_path / "c", small_vq, shard_size=4))
    run_tokenize(config_for(tmp_path / "data", tmp_path / "c", small_vq, shard_size=4, shard_order="listing"))

"""The token cache: keyed by the whole manifest, never used when it disagrees with the shards, built in parallel
outside any collective, every sample checked against the manifest while it is built."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from star.data.manifest import Manifest
from star.data.shards import ShardSample, ShardWriter
from star.data.synthetic import SyntheticLayout, write_synthetic_shards
from star.train.token_cache import (
    STALE_AFTER_SECONDS,
    CacheFailed,
    build_token_cache,
    cache_folder,
    remove_stale_builds,
    wait_for_token_cache,
)

LAYOUT = SyntheticLayout(60, num_classes=6, grid=4, views=10, codebook_size=300, image_size=16)


def shards(folder, **changes):
    return write_synthetic_shards(folder, LAYOUT, shard_size=25, **changes)


def arrays(cache) -> dict:
    return {name: np.load(cache / f"{name}.npy") for name in ("tokens", "labels", "boxes", "flips")}


def test_parallel_build_equals_serial_and_reads_the_shards_in_order(tmp_path):
    manifest = shards(tmp_path / "s")
    serial = arrays(build_token_cache(tmp_path / "s", tmp_path / "c1", workers=1))
    parallel = arrays(build_token_cache(tmp_path / "s", tmp_path / "c2", workers=2))
    for name in serial:
        assert np.array_equal(serial[name], parallel[name]), name
    samples = list(manifest.iter_samples())
    assert np.array_equal(serial["tokens"], np.stack([s.tokens for s in samples]))
    assert serial["labels"].tolist() == [s.class_id for s in samples]


def test_other_tokens_with_the_same_counts_get_another_cache(tmp_path):
    # Same image count, classes, grid and tokenizer hash; other tokens (another seed): another cache folder.
    first, second = shards(tmp_path / "a", seed=0), shards(tmp_path / "b", seed=1)
    root = tmp_path / "cache"
    cache_a = build_token_cache(tmp_path / "a", root)
    cache_b = build_token_cache(tmp_path / "b", root)
    assert cache_a != cache_b
    assert not np.array_equal(arrays(cache_a)["tokens"], arrays(cache_b)["tokens"])
    assert first.tokenizer_sha256 == second.tokenizer_sha256 and first.num_samples == second.num_samples


def test_shards_replaced_in_place_are_noticed_and_the_cache_rebuilt(tmp_path, capsys):
    shards(tmp_path / "s", seed=0)
    cache = build_token_cache(tmp_path / "s")
    before = arrays(cache)["tokens"].copy()
    other = shards(tmp_path / "t", seed=1)
    for entry in other.shards:  # same names, same manifest apart from the shard bytes
        os.replace(tmp_path / "t" / entry.file, tmp_path / "s" / entry.file)  # same size, other tokens
    rebuilt = build_token_cache(tmp_path / "s")
    assert "does not match the shards" in capsys.readouterr().out
    assert not np.array_equal(arrays(rebuilt)["tokens"], before)


def test_a_cache_record_that_disagrees_is_never_used(tmp_path):
    manifest = shards(tmp_path / "s")
    cache = build_token_cache(tmp_path / "s")
    record = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps({**record, "manifest_digest": "0" * 64}))
    (cache / "labels.npy").write_bytes(b"garbage")  # would break training if the cache were used as is
    rebuilt = build_token_cache(tmp_path / "s")
    assert rebuilt == cache and json.loads((cache / "cache.json").read_text())["manifest_digest"] == manifest.digest
    assert arrays(rebuilt)["labels"].shape == (60,)


def test_waiting_processes_poll_and_see_a_failure_instead_of_hanging(tmp_path):
    manifest = shards(tmp_path / "s")
    with pytest.raises(CacheFailed, match="not ready"):
        wait_for_token_cache(tmp_path / "s", None, manifest, timeout_s=0.3, poll_s=0.1)
    build_token_cache(tmp_path / "s")
    assert wait_for_token_cache(tmp_path / "s", None, manifest, timeout_s=1) == cache_folder(manifest,
                                                                                            tmp_path / "s" / "cache")
    # a builder that fails leaves a note: the waiters raise at once with its reason
    bad = tmp_path / "bad"
    shards(bad)
    (bad / "shard-000001.tar").write_bytes(b"not a tar")
    manifest_bad = Manifest.load(bad)
    with pytest.raises(ValueError, match="shard-000001.tar"):
        build_token_cache(bad, workers=1)
    with pytest.raises(CacheFailed, match="shard-000001.tar"):
        wait_for_token_cache(bad, None, manifest_bad, timeout_s=30, poll_s=0.1)
    # an earlier launch's note does not stop the waiters of a new one
    note = next((bad / "cache").glob(".tokens-*.failed"))
    old = time.time() - 3600
    os.utime(note, (old, old))
    with pytest.raises(CacheFailed, match="not ready"):
        wait_for_token_cache(bad, None, manifest_bad, timeout_s=0.3, poll_s=0.1)


def test_read_only_shard_folder_points_to_cache_dir(tmp_path, monkeypatch):
    shards(tmp_path / "s")
    real_mkdir = type(tmp_path).mkdir

    def read_only_mkdir(path, *args, **kwargs):  # root writes anywhere: a read-only mount, as the OS reports it
        if tmp_path / "s" in path.parents or path == tmp_path / "s" / "cache":
            raise PermissionError(13, "Read-only file system")
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", read_only_mkdir)
    with pytest.raises(ValueError, match="--cache-dir"):
        build_token_cache(tmp_path / "s")
    assert build_token_cache(tmp_path / "s", tmp_path / "elsewhere").parent == tmp_path / "elsewhere"


def test_stale_builds_are_removed_from_this_host_and_others(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale_here = tmp_path / f".tokens-0123abcd.{host}.{dead.pid}.building"
    live_here = tmp_path / f".tokens-0123abcd.{host}.{os.getpid()}.building"
    fresh_there = tmp_path / f".tokens-0123abcd.some.other.host.{dead.pid}.building"
    stale_there = tmp_path / f".tokens-4567abcd.node-7.{dead.pid}.building"
    for folder in (stale_here, live_here, fresh_there, stale_there):
        folder.mkdir()
        (folder / "heartbeat").touch()
    old = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(stale_there / "heartbeat", (old, old))  # a preempted node's build: no heartbeat for minutes
    assert sorted(remove_stale_builds(tmp_path)) == sorted([stale_here, stale_there])
    assert live_here.exists() and fresh_there.exists()


def write_one_shard(folder, samples: list[ShardSample], classes: int = 3, codebook: int = 256, views: int = 10):
    """A hand-made shard folder: one shard of `samples`, a manifest saying what the samples should be."""
    manifest = write_synthetic_shards(folder, SyntheticLayout(3, num_classes=classes, grid=4, views=views,
                                                              codebook_size=codebook, image_size=16))
    writer = ShardWriter(folder / "shard-000000.tar")
    for sample in samples:
        writer.write(sample)
    writer.close()
    record = manifest.to_dict()
    record["shards"] = [{"file": "shard-000000.tar", "samples": len(samples)}]
    (folder / "manifest.json").write_text(json.dumps(record))


def sample(tokens, class_id=0, views=10, key="bad"):
    view = {"box": [0, 0, 16, 16], "flip": False}
    return ShardSample(key, np.asarray(tokens), class_id, [view] * views, (16, 16))


GOOD = np.zeros((10, 4, 4), np.uint16)


@pytest.mark.parametrize("bad, message", [
    (sample(GOOD, class_id=3), "class id 3 is outside the manifest's 3 classes"),  # the null class as a label
    (sample(GOOD, class_id=-3), "class id -3"),
    (sample(np.full((10, 4, 4), 65790, np.int64)), "tokens.npy is int64"),  # would wrap into uint16
    (sample(np.zeros((10, 4, 4), np.float32)), "not a token grid"),  # float tokens
    (sample(np.zeros((1, 4, 4), np.uint16)), r"uint16\[1, 4, 4\]"),  # one view, broadcast to ten before
    (sample(np.full((10, 4, 4), 300, np.uint16)), "token 300 is outside the codebook of 256"),
])
def test_every_sample_is_checked_against_the_manifest_while_the_cache_is_built(tmp_path, bad, message):
    write_one_shard(tmp_path / "s", [sample(GOOD, key="good"), bad])
    with pytest.raises(ValueError, match=message):
        build_token_cache(tmp_path / "s", workers=1)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(classes={}), "no classes"),
    (lambda m: m.update(classes={"a": 0, "b": 0, "c": 2}), "each once"),
    (lambda m: m.update(shards=[m["shards"][0], m["shards"][0]]), "listed twice"),
    (lambda m: m.update(token_dtype="int8"), "token_dtype 'int8'"),
    (lambda m: m.update(token_dtype="banana"), "banana"),
    (lambda m: m["views"].update(num_views=20), "num_views 20"),
    (lambda m: m["views"].update(num_views=0), "num_views 0"),
])
def test_an_inconsistent_manifest_is_refused_naming_what_is_wrong(tmp_path, edit, message):
    shards(tmp_path / "s")
    record = json.loads((tmp_path / "s" / "manifest.json").read_text())
    edit(record)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message):
        Manifest.load(tmp_path / "s")


def test_wrong_per_shard_counts_that_sum_right_are_found(tmp_path):
    shards(tmp_path / "s")  # shards of 25, 25, 10
    record = json.loads((tmp_path / "s" / "manifest.json").read_text())
    record["shards"][0]["samples"], record["shards"][2]["samples"] = 20, 15
    for entry in record["shards"]:
        entry.pop("bytes")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="holds 25 samples, the manifest says 20"):
        build_token_cache(tmp_path / "s", workers=1)


def test_a_manifest_that_is_a_list_is_one_clear_line(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON list, not a manifest"):
        Manifest.load(tmp_path)

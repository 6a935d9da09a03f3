"""The token cache: every shard unpacked once into flat memory-mapped arrays, for the map-style loader.

    <cache root>/tokens-<manifest digest>/
        tokens.npy [N, V, h, w]   labels.npy [N]   boxes.npy [N, V, 4]   flips.npy [N, V]   cache.json

The folder's name is a digest of the whole manifest (shards, counts, tokenizer, views, precision, seed, grid:
everything that decides the tokens), and `cache.json` records that digest, the sample layout and each shard's
size and modification time. A cache whose record disagrees with the manifest or with the shard files (shards
replaced in place) is never used: it is rebuilt.

The build is parallel: shard i's samples go to rows [offset_i, offset_i + count_i) (offsets from the manifest),
so worker processes fill the arrays independently, each checking its samples against the manifest (dtype,
shape, token and class ranges, count). It never runs inside a collective: the builder works while the other
processes poll for `cache.json` (or for the builder's failure note), so NCCL's timeout never sees the build;
`train/run.py --prepare-only` builds it before the launch.

Who builds (`--cache-scope`, `builds_cache`): `node` (the default) has each node's first process offer to build;
an offer takes the cache's build lock (`.tokens-<digest>.build/.lock` beside the cache, a lease from
star/lock.py) and a process that finds it held by a live builder waits instead. On a disk every node shares,
the first node's lock is seen by the others, so the cache is built once per job; on node-local disks each
node's lock is its own, so each node builds its copy. `shared` has only the job's main process build, for a
cache root every node sees on filesystems whose exclusive create is not atomic (FUSE object-store mounts).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from star.data.location import ShardLocation
from star.data.manifest import Manifest
from star.io import write_json_atomic
from star.lock import FolderLocked, folder_lock, pid_alive

CACHE_VERSION = 2
CACHE_SCOPES = ("node", "shared")  # who offers to build: each node's first process, or the job's main process
RECORD = "cache.json"
HEARTBEAT = "heartbeat"
HEARTBEAT_SECONDS = 10.0
# A build whose heartbeat is older than this is dead (its host crashed or was preempted), whatever host it ran on.
STALE_AFTER_SECONDS = 300.0


# A failure note written this long before a process started waiting still counts (the builder of the same launch
# may fail at once); an older one is an earlier launch's.
NOTE_GRACE_SECONDS = 60.0


class CacheFailed(RuntimeError):
    """The process building the cache failed or died; waiting for it is pointless."""


def cache_root_for(shards: str, cache_dir: str = "") -> Path:
    if cache_dir:
        return Path(cache_dir)
    location = ShardLocation(str(shards))
    if location.is_remote:
        raise ValueError(f"--shards {shards} is remote: give --cache-dir, a local folder for the token cache (or "
                         "use --loader stream)")
    return location.folder / "cache"


def cache_folder(manifest: Manifest, root: Path) -> Path:
    return root / f"tokens-{manifest.digest[:24]}"


def _failure_note(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.failed"


def shard_files(manifest: Manifest) -> list[list]:
    """[name, bytes, mtime_ns] of each local shard (how a shard replaced in place is noticed); [] when remote."""
    if manifest.location is None or manifest.location.is_remote:
        return []
    files = []
    for path in manifest.shard_paths():
        stat = path.stat()
        files.append([path.name, stat.st_size, stat.st_mtime_ns])
    return files


def expected_record(manifest: Manifest) -> dict:
    h, w = manifest.grid
    return {"version": CACHE_VERSION, "manifest_digest": manifest.digest, "samples": manifest.num_samples,
            "grid": [h, w], "views": manifest.num_views, "dtype": manifest.token_dtype,
            "shard_files": shard_files(manifest)}


def record_problems(folder: Path, manifest: Manifest) -> list[str]:
    """How the cache in `folder` disagrees with the manifest and its shards (empty: it may be used)."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [f"{folder / RECORD} unreadable ({error})"]
    expected = expected_record(manifest)
    return [f"{name}: cache has {record.get(name)!r}, the shards have {value!r}" for name, value in expected.items()
            if record.get(name) != value]


@dataclass(frozen=True)
class _ShardJob:
    location: str
    file: str
    samples: int
    offset: int
    staging: str
    manifest_record: dict  # the manifest as a dict (sent to worker processes)


def _fill_rows(job: _ShardJob) -> int:
    """Worker: write one shard's samples into rows [offset, offset + samples) of the staging arrays."""
    manifest = Manifest.from_dict(job.manifest_record)
    manifest.location = ShardLocation(job.location)
    entry = next(entry for entry in manifest.shards if entry.file == job.file)
    staging = Path(job.staging)
    tokens = np.load(staging / "tokens.npy", mmap_mode="r+")
    labels = np.load(staging / "labels.npy", mmap_mode="r+")
    boxes = np.load(staging / "boxes.npy", mmap_mode="r+")
    flips = np.load(staging / "flips.npy", mmap_mode="r+")
    row = job.offset
    for sample in manifest.iter_samples([entry]):  # checked against the manifest, count included
        tokens[row] = sample.tokens
        labels[row] = sample.class_id
        boxes[row] = [view["box"] for view in sample.views]
        flips[row] = [view["flip"] for view in sample.views]
        row += 1
    for array in (tokens, labels, boxes, flips):
        array.flush()
    return row - job.offset


class _Heartbeat:
    """Touches `folder/heartbeat` every few seconds while a build runs: waiters and later builders see it live."""

    def __init__(self, folder: Path):
        self.path, self.done = folder / HEARTBEAT, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="cache-heartbeat")

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_SECONDS):
            self.path.touch()

    def __enter__(self):
        self.path.touch()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def _allocate(staging: Path, manifest: Manifest) -> None:
    count, views, (h, w) = manifest.num_samples, manifest.num_views, manifest.grid
    for name, dtype, shape in (("tokens", manifest.dtype, (count, views, h, w)), ("labels", np.int64, (count,)),
                               ("boxes", np.float32, (count, views, 4)), ("flips", np.bool_, (count, views))):
        array = np.lib.format.open_memmap(staging / f"{name}.npy", "w+", dtype, shape)
        del array


def build_token_cache(shards: str | Path, cache_root: str | Path | None = None, manifest: Manifest | None = None,
                      workers: int = 0) -> Path:
    """The cache folder of `shards`, built (in `workers` processes; 0: one per core) unless an intact one exists.
    A failure leaves a note beside the cache folder, so processes waiting for it stop at once with its reason."""
    manifest = manifest or Manifest.load(shards)
    root = Path(cache_root) if cache_root else cache_root_for(str(shards))
    final = cache_folder(manifest, root)
    try:
        return _build(manifest, root, final, workers)
    except BaseException as error:
        try:
            write_json_atomic(_failure_note(final), {"error": str(error) or type(error).__name__,
                                                     "host": socket.gethostname(), "pid": os.getpid()})
        except OSError:
            pass  # an unwritable cache root: the error itself says so
        raise


def _build(manifest: Manifest, root: Path, final: Path, workers: int) -> Path:
    if manifest.folder is not None:
        manifest.verify()  # each shard present and of the manifest's size (a stat each)
    if (final / RECORD).is_file():
        problems = record_problems(final, manifest)
        if not problems:
            return final
        print(f"token cache {final} does not match the shards ({'; '.join(problems)}): rebuilding it", flush=True)
        shutil.rmtree(final, ignore_errors=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(root)
        staging = root / f".{final.name}.{socket.gethostname()}.{os.getpid()}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except PermissionError as error:
        raise ValueError(f"cannot write the token cache under {root} ({error.strerror}): give --cache-dir, a "
                         "writable local folder") from error
    _failure_note(final).unlink(missing_ok=True)
    try:
        with _Heartbeat(staging):
            started = time.time()
            _allocate(staging, manifest)
            _fill_all(manifest, staging, workers)
            write_json_atomic(staging / RECORD, {**expected_record(manifest), "built_by": socket.gethostname(),
                                                 "seconds": round(time.time() - started, 2)})
        (staging / HEARTBEAT).unlink(missing_ok=True)
        try:
            staging.rename(final)
        except OSError:  # another builder (another node on a shared filesystem) finished first
            if record_problems(final, manifest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _fill_all(manifest: Manifest, staging: Path, workers: int) -> None:
    offsets = np.concatenate([[0], np.cumsum([entry.samples for entry in manifest.shards])]).tolist()
    jobs = [_ShardJob(str(manifest.location), entry.file, entry.samples, int(offset), str(staging),
                      manifest.to_dict()) for entry, offset in zip(manifest.shards, offsets)]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        for job in jobs:
            _fill_rows(job)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_fill_rows, jobs))


def wait_for_token_cache(shards: str | Path, cache_root: str | Path | None, manifest: Manifest,
                         timeout_s: float, poll_s: float = 2.0, hint: str = "") -> Path:
    """Poll (no collective) until another process's build of this cache is complete. Raises CacheFailed when the
    builder wrote a failure note, died (no heartbeat for STALE_AFTER_SECONDS) or `timeout_s` passed; `hint` ends
    the message of a build nobody runs."""
    root = Path(cache_root) if cache_root else cache_root_for(str(shards))
    final = cache_folder(manifest, root)
    started = time.time()
    while True:
        if (final / RECORD).is_file() and not record_problems(final, manifest):
            return final
        note = _failure_note(final)
        # a note from this launch's builder (not one left by an earlier launch that failed)
        if note.is_file() and note.stat().st_mtime > started - NOTE_GRACE_SECONDS:
            raise CacheFailed(f"the token cache could not be built: {json.loads(note.read_text())['error']}")
        building = list(root.glob(f".{final.name}.*.building")) if root.is_dir() else []
        beats = [b / HEARTBEAT for b in building if (b / HEARTBEAT).is_file()]
        elapsed = time.time() - started
        if elapsed > STALE_AFTER_SECONDS and not any(time.time() - b.stat().st_mtime < STALE_AFTER_SECONDS
                                                     for b in beats):
            raise CacheFailed(f"no process is building the token cache {final} (no live build for "
                              f"{elapsed:.0f} s); run train/run.py --prepare-only, then launch again{hint}")
        if elapsed > timeout_s:
            raise CacheFailed(f"the token cache {final} was not ready after {timeout_s:.0f} s; build it first with "
                              "train/run.py --prepare-only (or raise --cache-timeout)")
        time.sleep(poll_s)


def builds_cache(scope: str, is_main: bool, is_local_main: bool) -> bool:
    """Whether this process offers to build the cache under --cache-scope `scope` (the others wait for it)."""
    if scope not in CACHE_SCOPES:
        raise ValueError(f"--cache-scope {scope!r}: choose one of {', '.join(CACHE_SCOPES)}")
    return is_main if scope == "shared" else is_local_main


def build_unless_building(shards: str | Path, cache_root: str | Path | None, manifest: Manifest, workers: int,
                          timeout_s: float) -> Path:
    """Build the cache while holding its build lock, or, when a live process elsewhere holds the lock (another
    node on a shared disk, another job on the same shards), wait for that build instead of building it again."""
    root = Path(cache_root) if cache_root else cache_root_for(str(shards))
    final = cache_folder(manifest, root)
    if (final / RECORD).is_file() and not record_problems(final, manifest):
        return final
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(folder_lock(root / f".{final.name}.build", f"building the token cache {final}"))
        except FolderLocked:
            return wait_for_token_cache(shards, root, manifest, timeout_s)
        except ValueError as error:  # an unwritable cache root
            raise ValueError(f"cannot write the token cache under {root} ({error}): give --cache-dir, a writable "
                             "local folder") from error
        return build_token_cache(shards, root, manifest, workers)


def remove_stale_builds(cache_root: Path) -> list[Path]:
    """Delete `.tokens-*.HOST.PID.building` folders whose builder is gone: on this host, a pid no longer alive; on
    any host, a heartbeat older than STALE_AFTER_SECONDS (a preempted node's build is cleaned up too)."""
    removed = []
    host = socket.gethostname()
    for folder in cache_root.glob(".tokens-*.building") if cache_root.is_dir() else []:
        parts = folder.name[: -len(".building")].split(".")
        builder_host, pid = ".".join(parts[2:-1]), parts[-1]
        beat = folder / HEARTBEAT
        age = time.time() - (beat.stat().st_mtime if beat.is_file() else folder.stat().st_mtime)
        dead_here = builder_host == host and pid.isdigit() and not pid_alive(int(pid))
        if dead_here or age > STALE_AFTER_SECONDS:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed

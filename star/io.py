"""Small, shared file helpers: atomic writes, hashing, safe checkpoint loading."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it over `final_path` only if the block succeeds.

    A reader (or a rerun after kill -9) never sees a half-written file: either the old file or the new one.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_torch_weights(path: str | os.PathLike) -> Any:
    """Load a PyTorch checkpoint without executing pickled code (weights_only=True)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad or unsafe files
        raise ValueError(
            f"cannot load checkpoint {path} safely (weights_only=True): {error}. "
            "Is it a PyTorch weights file (e.g. an official LlamaGen .pt)?"
        ) from error


class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock."""


LOCK_NAME = ".lock"
# The holder refreshes its lock's modification time every LEASE_REFRESH_S; a lock not refreshed for LEASE_S is
# stale, whatever host wrote it (a preempted or crashed node), and is taken over.
LEASE_S = 180.0
LEASE_REFRESH_S = 30.0


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(lock_path: Path) -> dict:
    try:
        holder = json.loads(lock_path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale_reason(lock_path: Path, holder: dict, host: str, lease_s: float) -> str | None:
    """Why the lock may be taken over (None: its holder may be alive)."""
    if holder.get("host") == host and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
        return f"its process (pid {holder['pid']}) is gone"
    try:
        age = time.time() - lock_path.stat().st_mtime
    except FileNotFoundError:
        return "it was just released"
    if age > lease_s:
        return f"its holder has not refreshed it for {age:.0f} s (lease {lease_s:.0f} s)"
    return None


def _take_over(lock_path: Path, judged: dict) -> bool:
    """Move a stale lock aside, atomically; False when the file there is no longer the one judged stale."""
    aside = lock_path.with_name(f"{lock_path.name}.stale-{os.getpid()}")
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return True  # released meanwhile: the next attempt creates it
    if _read_holder(aside).get("token") != judged.get("token"):  # a new holder took it just before us
        try:
            os.rename(aside, lock_path)
        except OSError:
            pass
        return False
    aside.unlink(missing_ok=True)
    return True


class _LeaseRefresher:
    """Touches the lock file every LEASE_REFRESH_S while it is held (the lease other hosts judge it by)."""

    def __init__(self, lock_path: Path, refresh_s: float):
        self.lock_path, self.refresh_s, self.done = lock_path, refresh_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="lock-lease")

    def _run(self) -> None:
        while not self.done.wait(self.refresh_s):
            try:
                os.utime(self.lock_path)
            except OSError:
                pass

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, purpose: str, break_lock: bool = False,
                lease_s: float = LEASE_S, refresh_s: float = LEASE_REFRESH_S) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (a `.lock` file naming pid, host and purpose) for the block.

    The lock is a lease: its holder refreshes the file's modification time every `refresh_s`. A second process
    is refused with FolderLocked naming the holder, unless the lock is stale: its process is gone (same host), or
    it was not refreshed for `lease_s` (any host: a preempted job requeued elsewhere takes it over by itself).
    `break_lock` takes it over regardless (for a person who knows the holder is gone).
    """
    import socket
    import uuid

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (PermissionError, FileExistsError, NotADirectoryError) as error:
        raise ValueError(f"cannot use {folder} as an output folder ({error.strerror or error})") from error
    lock_path = folder / LOCK_NAME
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "purpose": purpose, "token": uuid.uuid4().hex,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock_path)
            reason = "--break-lock was given" if break_lock else _stale_reason(lock_path, holder, host, lease_s)
            if reason is None:
                raise FolderLocked(_locked_message(folder, lock_path, holder, host)) from None
            if _take_over(lock_path, holder):
                warnings.warn(f"taking over the lock of {folder} held by {holder.get('purpose', 'a process')} "
                              f"(pid {holder.get('pid')} on {holder.get('host')}): {reason}", stacklevel=3)
            continue
        except PermissionError as error:
            raise ValueError(f"cannot write in {folder} ({error.strerror}): choose a writable folder") from error
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record))
        break
    else:
        raise FolderLocked(f"could not take the lock {lock_path}")
    refresher = _LeaseRefresher(lock_path, refresh_s)
    refresher.start()
    try:
        yield lock_path
    finally:
        refresher.stop()
        if _read_holder(lock_path).get("token") == record["token"]:
            lock_path.unlink(missing_ok=True)


def _locked_message(folder: Path, lock_path: Path, holder: dict, host: str) -> str:
    if not holder:  # being written right now by its holder, or empty
        return f"{folder} is locked by another process ({lock_path} exists); if no other run uses it, pass --break-lock"
    where = "this host" if holder.get("host") == host else f"host {holder.get('host')}"
    return (f"{folder} is in use by {holder.get('purpose', 'another run')} (pid {holder.get('pid')} on {where}); "
            f"wait for it to finish or choose another folder. A lock not refreshed for {LEASE_S:.0f} s is taken "
            "over by itself; if that process is gone, pass --break-lock")


def check_output_file(path: str | os.PathLike, flag: str, kind: str, is_kind, inputs=(), overwrite: bool = False
                      ) -> Path:
    """Before any work: `path` may be written as this command's `kind` of output. Refused (ValueError naming the
    flag and the file) when it is a folder, one of the command's `inputs`, or an existing file that `is_kind` does
    not recognise as this kind of output (a manifest, a checkpoint, someone's data), unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name for the {kind}")
    for source in inputs:
        if source and Path(source).exists() and path.exists() and os.path.samefile(path, source):
            raise ValueError(f"{flag} {path} is an input of this command: writing the {kind} there would destroy "
                             "it; choose another path")
    if path.exists() and not overwrite and not is_kind(path):
        raise ValueError(f"{flag} {path} exists and is not a {kind} written by this tool: choose another path, or "
                         "pass --overwrite to replace it")
    return path


def is_json_with(path: Path, *keys: str) -> bool:
    """Whether `path` holds a JSON object with every one of `keys` (how our JSON outputs are recognised)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and all(key in record for key in keys)

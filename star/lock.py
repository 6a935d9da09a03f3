"""The folder lock: one process writes into an output folder at a time, and a lock left by a dead or preempted
holder does not stop the next one (a lease the holder refreshes; taken over once stale)."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator


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

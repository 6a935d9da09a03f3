"""Small, shared file helpers: atomic writes, hashing, safe checkpoint loading."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, purpose: str) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (a `.lock` file naming pid, host and purpose) for the block.

    A second process is refused with FolderLocked naming the holder. A lock left by a crashed process is
    detected by its pid on this host (not by its age) and taken over; a lock from another host is never
    taken over automatically: the message says which file to delete once that host's run is gone.
    """
    import socket

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_NAME
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "purpose": purpose}
    for _ in range(3):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock_path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                lock_path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            if not holder:  # being written right now by its holder, or empty
                raise FolderLocked(f"{folder} is locked by another process ({lock_path} exists); "
                                   "if no other run uses it, delete that file")
            where = "this host" if holder.get("host") == host else f"host {holder.get('host')}"
            raise FolderLocked(f"{folder} is in use by {holder.get('purpose', 'another run')} "
                               f"(pid {holder.get('pid')} on {where}); wait for it to finish or choose another "
                               f"folder. If that process is gone, delete {lock_path}")
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record))
        break
    else:
        raise FolderLocked(f"could not take the lock {lock_path}")
    try:
        yield lock_path
    finally:
        try:
            if json.loads(lock_path.read_text()).get("pid") == os.getpid():
                lock_path.unlink()
        except (OSError, json.JSONDecodeError):
            pass

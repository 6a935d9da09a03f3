"""A trainer's output folder and the checkpoints in it, for both trainers (the GPT's star/train/run_folder.py and
the VQ's star/vq/checkpoints.py, which choose the files):

    OUT/config.json, OUT/log.jsonl       the GPT trainer's settings and log (with checkpoints/: what marks a run)
    OUT/checkpoints/step-NNNNNNN/        a complete checkpoint: its files, then meta.json, written last
    OUT/checkpoints/.step-NNNNNNN.tmp/   the staging folder a checkpoint is written in before it is moved in place

Checkpoint folders are found one way (`checkpoint_dirs`, sorted by step number, never as text), written one way
(`save_checkpoint_folder`) and the newest whole one read back one way (`read_newest_whole`). A trainer removes only the files it writes: a file a person put in a checkpoint
folder (samples, notes) survives pruning and a checkpoint written again at the same step.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from star.io import atomic_path, write_json_atomic

CHECKPOINTS = "checkpoints"
META_NAME = "meta.json"
RUN_CONFIG = "config.json"
RUN_LOG = "log.jsonl"
RUN_FILES = (RUN_CONFIG, RUN_LOG, CHECKPOINTS)  # what marks a folder as holding (part of) a training run
_STEP_DIR = re.compile(r"step-(\d{7,})")


class CorruptCheckpoint(ValueError):
    """A checkpoint folder that is present but cannot be read (truncated or damaged files)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the staging folder was removed."""


def checkpoint_folder(out: str | Path, step: int) -> Path:
    """Where a run's checkpoint of `step` is (complete once its meta.json is there)."""
    return Path(out) / CHECKPOINTS / f"step-{step:07d}"


def checkpoint_step(folder: Path) -> int:
    """The step of a `step-NNNNNNN` checkpoint folder."""
    return int(folder.name.split("-")[1])


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder (meta.json present), oldest first, sorted by step number."""
    found = [p for p in (Path(out) / CHECKPOINTS).glob("step-*")
             if _STEP_DIR.fullmatch(p.name) and (p / META_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def run_holds_a_run(out: str | Path) -> bool:
    """Whether a folder already holds (part of) a training run: a config, a log or checkpoints."""
    out = Path(out)
    return any((out / name).exists() for name in RUN_FILES)


FileWriter = Callable[[Path], None]  # writes one checkpoint file at the path it is given


def save_checkpoint_folder(out: str | Path, step: int, writers: Mapping[str, FileWriter], meta: Mapping[str, Any],
                           owned: Sequence[str], keep: int, keep_steps: Sequence[int] = ()) -> Path:
    """Write `OUT/checkpoints/step-NNNNNNN/` through a staging folder: each of `writers` (file name -> writer),
    then `meta` as meta.json, last. Then prune to the newest `keep` checkpoints (0: keep all), never removing
    those of `keep_steps`.

    `owned`: every file name this trainer writes in a checkpoint (meta.json included); only those are removed when
    a checkpoint is pruned or written again at the same step. A failed write (disk full, ...) removes the staging
    folder and raises CheckpointWriteError with one line.
    """
    final = checkpoint_folder(out, step)
    staging = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for name, write in writers.items():
            write(staging / name)
        write_json_atomic(staging / META_NAME, dict(meta))  # written last: its presence marks a complete checkpoint
    except Exception as error:  # OSError, and torch's / safetensors' own errors for a full disk
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointWriteError(getattr(error, "errno", None), f"could not write checkpoint {final}: "
                                   f"{_write_failure(error)}; the staging folder was removed and earlier checkpoints "
                                   "are intact. Free space (or fix the folder) and resume with --resume auto") from error
    _move_in_place(staging, final, owned)
    prunable = [folder for folder in checkpoint_dirs(out) if checkpoint_step(folder) not in keep_steps]
    for old in prunable[:-keep] if keep > 0 else []:
        remove_checkpoint(old, owned)
    return final


def save_torch_file(obj: Any, path: Path) -> None:
    """torch.save of tensors, numbers and lists (what torch.load(weights_only=True) reads), atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _move_in_place(staging: Path, final: Path, owned: Sequence[str]) -> None:
    """Rename the staging folder to `final`; when `final` exists (the same step written again), replace the files
    this trainer wrote one by one instead, meta.json last, so the files a person added stay."""
    if not final.exists():
        staging.rename(final)
        return
    (final / META_NAME).unlink(missing_ok=True)  # the old checkpoint stops counting as complete first
    staged = {path.name for path in staging.iterdir()}
    for name in set(owned) - staged:  # e.g. a teacher the new checkpoint has none of
        (final / name).unlink(missing_ok=True)
    for name in sorted(staged - {META_NAME}):
        os.replace(staging / name, final / name)
    os.replace(staging / META_NAME, final / META_NAME)
    staging.rmdir()


def _write_failure(error: Exception) -> str:
    """One line for a failed write: disk full, whichever library noticed it first."""
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "enforce fail" in text:
        return "no space left on device"
    if getattr(error, "strerror", None):
        return error.strerror
    return text.splitlines()[0] if text else type(error).__name__


def remove_checkpoint(folder: Path, owned: Sequence[str]) -> None:
    """Remove the files a trainer wrote (`owned`) in a checkpoint folder, meta.json first, and the folder if
    nothing else is in it (samples or notes a person put there are kept, with a warning)."""
    for name in (META_NAME, *owned):
        (folder / name).unlink(missing_ok=True)
    others = sorted(path.name for path in folder.iterdir())
    if others:
        warnings.warn(f"pruned checkpoint {folder}: kept {len(others)} file(s) the trainer did not write "
                      f"({', '.join(others[:3])})", stacklevel=2)
        return
    folder.rmdir()


Checkpoint = TypeVar("Checkpoint")


def read_newest_whole(out: str | Path, read: Callable[[Path], Checkpoint]) -> tuple[Checkpoint | None, Path | None,
                                                                                     list[str]]:
    """The newest checkpoint of `out` that `read` reads back whole: (it, its folder, the damaged ones skipped).
    `read` raises CorruptCheckpoint for a damaged folder, which is skipped with a warning; (None, None, skipped)
    when none reads back."""
    skipped = []
    for folder in reversed(checkpoint_dirs(out)):
        try:
            return read(folder), folder, skipped
        except CorruptCheckpoint as error:
            skipped.append(str(error))
            warnings.warn(f"--resume auto: skipping damaged checkpoint {error}", stacklevel=3)
    return None, None, skipped

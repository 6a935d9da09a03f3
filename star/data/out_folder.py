"""Output folders, checked before any work.

- Stage one's shard folder: absent, empty, or a shard folder made with the same settings (`plan.json`); never a
  training run folder, another folder with files in it, or a folder inside the input.
- A trainer's folder (the GPT's and the VQ's): never a file, a shard folder or an image folder (`foreign_output`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from star.checkpoint_folder import CHECKPOINTS, run_holds_a_run
from star.data.shards import MANIFEST_NAME, PLAN_NAME, names_a_shard_folder
from star.images import IMAGE_EXTENSIONS


def refuse_out_inside_data(out: Path, data: str) -> None:
    """Shards written inside the input tree would be listed as a class folder by the next run."""
    source = Path(data).resolve()
    if source.is_dir() and (out.resolve() == source or source in out.resolve().parents):
        raise ValueError(f"--out {out} is inside --data {data}: the shards would become part of the input; "
                         "choose a folder outside the input tree")


def refuse_foreign_folder(out: Path) -> None:
    """Before any work: `--out` must be absent, empty, or a token-shard folder (never a run or other folder)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder for the shards")
    if not out.is_dir():
        return
    names = sorted(entry.name for entry in os.scandir(out) if not entry.name.startswith("."))
    if not names or names_a_shard_folder(names):
        return
    if run_holds_a_run(out):
        raise ValueError(f"--out {out} is a training run folder, not a shard folder; choose a new folder for the shards")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise ValueError(f"--out {out} is not empty ({shown}) and is not a token-shard folder; "
                     "choose an empty or new folder so nothing in it is overwritten")


def foreign_output(out: Path) -> str | None:
    """Why `out` is not a run folder of ours (it is a file, a shard folder or an image folder), or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder; choose a folder for the run"
    if not out.is_dir():
        return None
    names = [entry.name for entry in os.scandir(out)]
    if names_a_shard_folder(names):
        return f"--out {out} is a token-shard folder: the run's files would mix with the shards; choose a new --out"
    for entry in os.scandir(out):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name != CHECKPOINTS:
            if any(Path(child).suffix.lower() in IMAGE_EXTENSIONS for child in os.listdir(entry.path)[:50]):
                return f"--out {out} holds image class folders ({entry.name}/): choose a new --out for the run"
    return None


def check_output_folder(out: Path, expected: dict) -> None:
    """Refuse, before any work, an output folder made with another tokenizer, size, view policy or input set."""
    refuse_foreign_folder(out)
    existing = None
    if (out / PLAN_NAME).is_file():
        try:
            existing = json.loads((out / PLAN_NAME).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--out {out}: {PLAN_NAME} is damaged ({error}); use a new --out folder") from error
    elif (out / MANIFEST_NAME).is_file() or any(out.glob("*.tar")):
        raise ValueError(f"--out {out} already holds shards not made by this tool's current format; use an empty folder")
    if existing is None:
        return
    differences = [f"{name}: folder has {recorded!r}, this run has {value!r}" for name, value in expected.items()
                   if (recorded := _recorded_setting(existing, name, value)) != value]
    if differences:
        raise ValueError(
            f"--out {out} holds shards made with different settings:\n  " + "\n  ".join(differences)
            + "\nPass the folder's settings to complete it (e.g. --shard-order listing), or use a new --out folder "
            "(or delete this one) to tokenize with these settings."
        )


# What a plan.json that lacks a setting recorded: a folder's images went to shards in listing order until the
# order became a setting; its encoder precision was not written down, so any is accepted.
_WHEN_UNRECORDED = {"shard_order": "listing"}


def _recorded_setting(plan: dict, name: str, wanted):
    if name in plan:
        return plan[name]
    return _WHEN_UNRECORDED.get(name, wanted)

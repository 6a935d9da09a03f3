"""The VQ trainer's checkpoints: what `tokenize/train_vq.py --resume auto` continues from.

    OUT/checkpoints/step-NNNNNNN/        a complete checkpoint (written as .step-NNNNNNN.tmp/, then renamed)
        vq.safetensors                   the tokenizer (LlamaGen's state-dict names)
        discriminator.safetensors        the PatchGAN discriminator, when the run has one
        optimizer.pt                     both optimizers' states, the dead-code counts and generator, recent
                                         losses (tensors, numbers and lists: torch.load(weights_only=True) reads it)
        meta.json                        step, the settings exact continuation depends on, the checkpoint's id
                                         (carried by each safetensors file); written last

Folders are found, written (through a staging folder, meta.json last) and pruned by star/checkpoint_folder.py, as
the GPT trainer's are: pruning, or writing a step again, removes only the files listed here, so a file a person put
in a checkpoint folder stays.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from star.checkpoint_folder import (
    CHECKPOINTS,
    META_NAME,
    CorruptCheckpoint,
    FileWriter,
    read_newest_whole,
    save_checkpoint_folder,
    save_torch_file,
)
from star.weights_io import file_checkpoint_id, load_tensors, save_tensors

VQ_WEIGHTS = "vq.safetensors"
DISCRIMINATOR_WEIGHTS = "discriminator.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
VQ_CHECKPOINT_FILES = (VQ_WEIGHTS, DISCRIMINATOR_WEIGHTS, OPTIMIZER_STATE, META_NAME)


@dataclass
class VQCheckpoint:
    """One checkpoint in memory (CPU tensors). `trainer` holds the optimizers' states and the loop's own state."""

    step: int
    settings: dict[str, Any]  # what exact continuation depends on (VQTrainConfig.resume_settings)
    vq: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor] | None
    trainer: dict[str, Any]


def _load_tensors(path: Path, checkpoint_id: str) -> dict[str, torch.Tensor]:
    """A weights file of this checkpoint (its id is meta.json's), else ValueError naming it."""
    found = file_checkpoint_id(path)
    if found != checkpoint_id:
        raise ValueError(f"{path} belongs to another checkpoint (id {found}, meta.json says {checkpoint_id}): "
                         "restore the checkpoint's own file, or remove this checkpoint folder")
    return load_tensors(path)


def save_vq_checkpoint_folder(out: str | Path, checkpoint: VQCheckpoint, keep: int) -> Path:
    """Write `OUT/checkpoints/step-NNNNNNN/` through a staging folder, then keep the newest `keep` (0: all).

    A failed write (disk full, ...) removes the staging folder and raises CheckpointWriteError with one line."""
    checkpoint_id = uuid.uuid4().hex
    writers: dict[str, FileWriter] = {VQ_WEIGHTS: lambda path: save_tensors(checkpoint.vq, path, checkpoint_id)}
    if checkpoint.discriminator is not None:
        writers[DISCRIMINATOR_WEIGHTS] = lambda path: save_tensors(checkpoint.discriminator, path, checkpoint_id)
    writers[OPTIMIZER_STATE] = lambda path: save_torch_file(checkpoint.trainer, path)
    meta = {"step": checkpoint.step, "checkpoint_id": checkpoint_id, "settings": checkpoint.settings}
    return save_checkpoint_folder(out, checkpoint.step, writers, meta, VQ_CHECKPOINT_FILES, keep)


def read_vq_checkpoint(folder: str | Path) -> VQCheckpoint:
    """Read one checkpoint folder; CorruptCheckpoint names the damaged file."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_NAME).read_text())
        checkpoint_id = meta["checkpoint_id"]
        vq = _load_tensors(folder / VQ_WEIGHTS, checkpoint_id)
        discriminator_path = folder / DISCRIMINATOR_WEIGHTS
        discriminator = _load_tensors(discriminator_path, checkpoint_id) if discriminator_path.is_file() else None
        trainer = torch.load(folder / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # json, safetensors and pickle raise many types for damaged files
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptCheckpoint(f"{folder}: {first_line}") from error
    return VQCheckpoint(step=int(meta["step"]), settings=meta["settings"], vq=vq, discriminator=discriminator,
                        trainer=trainer)


def read_newest_vq_checkpoint(out: str | Path) -> VQCheckpoint | None:
    """The newest checkpoint of `out` that reads back whole (damaged ones are skipped with a warning); None when
    there is none. ValueError when checkpoints exist but every one is damaged."""
    checkpoint, _, skipped = read_newest_whole(out, read_vq_checkpoint)
    if checkpoint is None and skipped:
        raise ValueError(f"--resume auto: every checkpoint in {Path(out) / CHECKPOINTS} is damaged "
                         f"({'; '.join(skipped)}); resume from a copy, or start a new --out")
    return checkpoint


def settings_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'name: checkpoint X, now Y' for every setting exact continuation depends on that differs."""
    return [f"{name}: checkpoint {saved.get(name)!r}, now {now.get(name)!r}"
            for name in sorted(set(saved) | set(now)) if saved.get(name) != now.get(name)]


"""The training run folder: its layout, the checkpoints in it (written through a staging folder, pruned, read back
whole or skipped when damaged) and `CheckpointMeta`, what each checkpoint records. The model files inside a
checkpoint are our weight format (star/weights_io.py).

A run folder (`train/run.py --out RUN`):

    RUN/config.json                      the run's TrainPlan (its TrainConfig under "settings"), model config included
    RUN/log.jsonl                        one record per logged step
    RUN/.lock                            held by the running trainer (star.lock.folder_lock)
    RUN/checkpoints/step-NNNNNNN/        a complete checkpoint (written as .step-NNNNNNN.tmp/, then renamed)
        model.safetensors + config.json  the student, loadable alone (`load_gpt`)
        teacher.safetensors              ST-AR's EMA teacher (same architecture)
        projector.safetensors            ST-AR's student-only projector
        optimizer.pt                     AdamW state, whole and keyed by parameter name (any launch loads it;
                                         torch.save of tensors and numbers: weights_only loads it)
        meta.json                        `CheckpointMeta`: step, data and tokenizer, what exact resume depends on,
                                         the id every file of the checkpoint carries; written last

The folder layout, finding checkpoints (`checkpoint_dirs`, by step number), the staged write and pruning are
star/checkpoint_folder.py's, shared with the VQ trainer; this module chooses the files and reads them back one
way (`read_training_state`, `read_meta`). Each safetensors file carries its checkpoint's id in its metadata, so
a file swapped in from another checkpoint is refused instead of resumed.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from star.checkpoint_folder import (
    META_NAME,
    CorruptCheckpoint,
    FileWriter,
    read_newest_whole,
    save_checkpoint_folder,
    save_torch_file,
)
from star.gpt.model import GPTConfig
from star.weights_io import CONFIG_NAME, WEIGHTS_NAME, file_checkpoint_id, load_tensors, save_gpt_state, save_tensors

TEACHER_NAME = "teacher.safetensors"
PROJECTOR_NAME = "projector.safetensors"
OPTIMIZER_NAME = "optimizer.pt"


class ForeignFile(ValueError):
    """A checkpoint file written for another checkpoint (swapped or copied in): never resumed from."""


class NonFiniteWeights(RuntimeError):
    """Weights about to be saved hold NaN/inf: the checkpoint is refused so no poisoned state reaches disk."""


@dataclass
class CheckpointMeta:
    """meta.json: what a checkpoint is, and what continuing it exactly depends on. A field a meta.json lacks
    reads as None (and is then not compared).

    The data position is a function of (seed, global batch, step), so the launch (processes, accumulation) is
    recorded for information only: a run continues on another launch at the same global batch."""

    step: int
    tokenizer_sha256: str | None = None
    self_guided: bool | None = None  # ST-AR's losses on (teacher and projector saved) or the plain baseline
    views_per_image: int | None = None
    seed: int | None = None
    global_batch: int | None = None  # images per optimizer step, over all processes and micro-batches
    world_size: int | None = None  # the launch that wrote the checkpoint (information)
    batch_per_process: int | None = None  # (information)
    grad_accum: int | None = None  # (information)
    optimizer: dict = field(default_factory=dict)  # lr, weight_decay, grad_clip, betas
    cpu_s: float = 0.0  # training-loop CPU seconds up to this step
    data_digest: str | None = None  # Manifest.digest of the shards trained on
    checkpoint_id: str | None = None  # carried by every safetensors file of this checkpoint

    # compared on resume: a difference means the run cannot continue exactly
    RESUME_FIELDS = ("tokenizer_sha256", "data_digest", "self_guided", "views_per_image", "seed", "global_batch")
    SELF_GUIDED_KEY = "star"  # meta.json's key for self_guided (the file format): to_json and from_json map it

    def to_json(self) -> dict:
        return {self.SELF_GUIDED_KEY if name == "self_guided" else name: value
                for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, record: dict) -> "CheckpointMeta":
        """A meta.json's record: `views` is read as views_per_image; a missing global_batch is world_size x
        batch_per_process x grad_accum where all three are recorded; unknown keys are ignored."""
        record = dict(record)
        if cls.SELF_GUIDED_KEY in record:
            record["self_guided"] = record.pop(cls.SELF_GUIDED_KEY)
        if "views" in record and "views_per_image" not in record:
            record["views_per_image"] = record.pop("views")
        launch = [record.get(name) for name in ("world_size", "batch_per_process", "grad_accum")]
        if record.get("global_batch") is None and all(isinstance(value, int) for value in launch):
            record["global_batch"] = launch[0] * launch[1] * launch[2]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in record.items() if name in known})

    def differences(self, now: "CheckpointMeta", ignore: Sequence[str] = ()) -> list[str]:
        """'name: checkpoint X, now Y' for every field exact resume depends on that differs (betas included),
        except the fields named in `ignore`."""
        lines = [f"{name}: checkpoint {getattr(self, name)!r}, now {getattr(now, name)!r}"
                 for name in self.RESUME_FIELDS
                 if name not in ignore and getattr(self, name) is not None and getattr(self, name) != getattr(now, name)]
        betas, betas_now = self.optimizer.get("betas"), now.optimizer.get("betas")
        if betas is not None and list(betas) != list(betas_now):
            lines.append(f"betas: checkpoint {betas!r}, now {betas_now!r}")
        return lines


@dataclass
class TrainingState:
    """What one checkpoint holds, as CPU state dicts (None for parts a run does not have)."""

    model_config: GPTConfig
    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor] | None
    projector: dict[str, torch.Tensor] | None
    optimizer: dict | None
    meta: CheckpointMeta


def _non_finite(state: Mapping[str, torch.Tensor] | None) -> list[str]:
    return [k for k, v in (state or {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]


TRAINER_FILES = (WEIGHTS_NAME, CONFIG_NAME, TEACHER_NAME, PROJECTOR_NAME, OPTIMIZER_NAME, META_NAME)


def save_training_state(run: str | Path, step: int, state: TrainingState, keep: int,
                        keep_steps: Sequence[int] = ()) -> Path:
    """Write `checkpoints/step-NNNNNNN/` through a staging folder; prune to the newest `keep` (0: keep all),
    never removing the checkpoints of `keep_steps` (milestones evaluated later).

    Refuses non-finite weights (NonFiniteWeights) so a poisoned model never becomes "the last checkpoint". A
    failed write (disk full, ...) removes the staging folder and raises CheckpointWriteError with one line.
    """
    bad = _non_finite(state.student) + _non_finite(state.teacher) + _non_finite(state.projector)
    if bad:
        raise NonFiniteWeights(f"refusing to write the step-{step} checkpoint: {len(bad)} tensors hold NaN/inf "
                               f"(e.g. {bad[0]})")
    meta = dataclasses.replace(state.meta, checkpoint_id=uuid.uuid4().hex)
    return save_checkpoint_folder(run, step, _trainer_writers(state, meta.checkpoint_id), meta.to_json(),
                                  TRAINER_FILES, keep, keep_steps)


def _trainer_writers(state: TrainingState, checkpoint_id: str) -> dict[str, FileWriter]:
    """The writer of each file of a checkpoint of `state` (the parts the run has)."""
    writers: dict[str, FileWriter] = {
        WEIGHTS_NAME: lambda path: save_gpt_state(state.model_config, state.student, path.parent, checkpoint_id),
    }  # model.safetensors and, beside it, its config.json
    if state.teacher is not None:
        writers[TEACHER_NAME] = lambda path: save_tensors(state.teacher, path, checkpoint_id)
    if state.projector is not None:
        writers[PROJECTOR_NAME] = lambda path: save_tensors(state.projector, path, checkpoint_id)
    if state.optimizer is not None:
        writers[OPTIMIZER_NAME] = lambda path: save_torch_file(state.optimizer, path)
    return writers


def read_meta(folder: str | Path) -> CheckpointMeta:
    """A checkpoint's meta.json; CorruptCheckpoint when it is unreadable."""
    path = Path(folder) / META_NAME
    try:
        return CheckpointMeta.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise CorruptCheckpoint(f"{path}: {type(error).__name__}: {error}") from error


def read_training_state(path: str | Path, need_teacher: bool, need_projector: bool,
                        need_optimizer: bool = True) -> TrainingState:
    """Read a checkpoint folder into memory. Damaged files raise CorruptCheckpoint; an ST-AR part the run needs
    but the folder lacks is a ValueError (a teacher is never silently re-initialised from the student), and so is
    a weights file that belongs to another checkpoint (its id differs from meta.json's)."""
    path = Path(path)
    meta = read_meta(path)
    lacking = [name for name, needed in ((TEACHER_NAME, need_teacher), (PROJECTOR_NAME, need_projector))
               if needed and not (path / name).is_file()]
    if lacking and meta.self_guided is not False:  # --no-star lacks them by design: the caller compares self_guided
        raise ValueError(f"checkpoint {path} lacks {' and '.join(lacking)}, which this ST-AR run needs (copied "
                         "incompletely?); resume from another checkpoint")
    need_teacher = need_teacher and (path / TEACHER_NAME).is_file()
    need_projector = need_projector and (path / PROJECTOR_NAME).is_file()
    readers = {
        CONFIG_NAME: GPTConfig.resolve,
        WEIGHTS_NAME: load_tensors,
        TEACHER_NAME: load_tensors if need_teacher else None,
        PROJECTOR_NAME: load_tensors if need_projector else None,
        OPTIMIZER_NAME: (lambda file: torch.load(file, map_location="cpu", weights_only=True)) if need_optimizer else None,
    }
    read: dict[str, Any] = {}
    for name, reader in readers.items():
        try:
            read[name] = reader(path / name) if reader is not None else None
            if name.endswith(".safetensors") and reader is not None and meta.checkpoint_id:
                found = file_checkpoint_id(path / name)
                if found != meta.checkpoint_id:
                    raise ForeignFile(f"{path / name} belongs to another checkpoint (id {found}, this one's is "
                                      f"{meta.checkpoint_id}): it was copied or swapped in; restore the checkpoint's "
                                      "own file, or resume from another checkpoint")
        except ForeignFile:
            raise
        except Exception as error:  # safetensors, pickle and json raise many types for damaged files
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise CorruptCheckpoint(f"{path / name}: {type(error).__name__}: {first_line}") from error
    model_config, student = read[CONFIG_NAME], read[WEIGHTS_NAME]
    teacher, projector, optimizer = read[TEACHER_NAME], read[PROJECTOR_NAME], read[OPTIMIZER_NAME]
    return TrainingState(model_config, student, teacher, projector, optimizer, meta)


def read_newest_intact(run: str | Path, need_teacher: bool, need_projector: bool) -> tuple[TrainingState | None,
                                                                                             Path | None, list[str]]:
    """The newest checkpoint of a run that reads back whole: (state, its folder, the damaged ones skipped).

    (None, None, skipped) when the run has no readable checkpoint. Each skipped one is also a warning.
    """
    return read_newest_whole(run, lambda folder: read_training_state(folder, need_teacher, need_projector))


def config_differences(saved: GPTConfig, wanted: GPTConfig) -> list[str]:
    """'field: checkpoint X, now Y' for every GPTConfig field that differs (architecture and dropouts)."""
    old, new = dataclasses.asdict(saved), dataclasses.asdict(wanted)
    return [f"model {name}: checkpoint {old[name]!r}, now {new[name]!r}" for name in old if old[name] != new[name]]

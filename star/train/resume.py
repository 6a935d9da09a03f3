"""Resume: read the checkpoint --resume names, check it continues this run, and say where the run starts.

Exact continuation depends on the architecture, the data (the shards' manifest digest and the tokenizer), the
ST-AR switch, the views, the seed, the global batch and AdamW's betas; any difference is refused with the list of
differences. The launch may change: the data order is a function of (seed, global batch, step) and the saved
states are whole (optimizer state keyed by parameter name), so a run continues on another number of processes,
another --grad-accum, DDP or FSDP2. Another global batch is refused unless --allow-batch-change. The learning
rate, weight decay and clipping may change; they are recorded. A checkpoint older than the run's newest is never
continued in place (that would overwrite the newer ones): it is branched into a new --out.

This module only reads and checks: the modules are built, and the state loaded into them, by
star/train/loop.py's `build_modules` and `prepare_trainer`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from star.checkpoint_folder import CHECKPOINTS, META_NAME, checkpoint_dirs, checkpoint_step
from star.train.config import RESUME_AUTO
from star.train.plan import TrainPlan
from star.train.run_folder import TrainingState, config_differences, read_newest_intact, read_training_state

# Settings a resumed run may change: its optimizer's param groups are built with this run's values (recorded).
RESUMABLE_CHANGES = ("lr", "weight_decay", "grad_clip")
BATCH_CHANGE = ("global_batch: --allow-batch-change continues with this run's --batch-size (the step, weights and "
                "AdamW state carry over; the data order becomes the new batch's, so images of the current epoch are "
                "seen twice or skipped)")


@dataclass(frozen=True)
class RunProgress:
    """Where this invocation of a run starts (recorded in the run folder's config.json beside the plan)."""

    start_step: int = 0
    start_cpu_s: float = 0.0  # training-loop CPU seconds of the run before this invocation (from the checkpoint)
    resumed_from: str | None = None
    changed_on_resume: tuple[str, ...] = ()  # optimizer settings (and the batch, if allowed) the resumed run changed
    skipped_on_resume: tuple[str, ...] = ()  # damaged checkpoints `--resume auto` passed over

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ResumePoint:
    """What --resume read (None: a fresh start) and where the run starts."""

    state: TrainingState | None = None
    progress: RunProgress = RunProgress()


def resume_differences(state: TrainingState, plan: TrainPlan) -> list[str]:
    """What differs between a checkpoint and this run that exact resume depends on (empty: it may continue); a
    changed global batch is left out with --allow-batch-change."""
    ignore = ("global_batch",) if plan.config.allow_batch_change else ()
    differences = config_differences(state.model_config, plan.model)
    return differences + state.meta.differences(plan.checkpoint_meta(state.meta.step), ignore=ignore)


def _refuse_rewriting_history(folder: Path, out: Path) -> None:
    """--resume names a checkpoint of --out that is older than --out's newest: continuing in place would replace
    the newer checkpoints and prune this one. The way out is a branch."""
    newest = checkpoint_dirs(out)
    inside = folder.resolve().parent == (out / CHECKPOINTS).resolve()
    if inside and newest and checkpoint_step(newest[-1]) > checkpoint_step(folder):
        raise ValueError(
            f"--resume {folder} is step {checkpoint_step(folder)}, older than this run's newest checkpoint "
            f"(step {checkpoint_step(newest[-1])}): continuing it here would overwrite the later checkpoints. "
            f"Branch it into a new folder instead: --out {out}-from-{checkpoint_step(folder)} --resume {folder}")


def read_resume_state(plan: TrainPlan) -> tuple[TrainingState | None, Path | None, list[str]]:
    """(state, its folder, damaged checkpoints skipped) for --resume; (None, None, []) for a fresh start."""
    config = plan.config
    if config.resume == RESUME_AUTO:
        state, folder, skipped = read_newest_intact(config.out, plan.needs_teacher, plan.needs_projector)
        if state is None and skipped:
            raise ValueError(f"--resume auto: every checkpoint in {Path(config.out) / CHECKPOINTS} is damaged "
                             f"({'; '.join(skipped)}); resume from a copy, or start a new --out")
        return state, folder, skipped
    folder = Path(config.resume)
    if not (folder / META_NAME).is_file():
        raise FileNotFoundError(f"--resume {folder}: not a complete checkpoint folder (no {META_NAME})")
    _refuse_rewriting_history(folder, Path(config.out))
    return read_training_state(folder, plan.needs_teacher, plan.needs_projector), folder, []


def _changes(state: TrainingState, plan: TrainPlan) -> tuple[str, ...]:
    """'name: checkpoint X, now Y' for each setting a resumed run may change and does."""
    config, saved = plan.config, state.meta.optimizer
    now = {"lr": plan.lr, "weight_decay": config.weight_decay, "grad_clip": config.grad_clip}
    changed = [f"{name}: checkpoint {saved[name]!r}, now {now[name]!r}" for name in RESUMABLE_CHANGES
               if name in saved and saved[name] != now[name]]
    if state.meta.global_batch is not None and state.meta.global_batch != config.batch_size:
        changed.append(f"global_batch: checkpoint {state.meta.global_batch}, now {config.batch_size}")
    return tuple(changed)


def read_resume(plan: TrainPlan) -> ResumePoint:
    """The checkpoint --resume names, after checking it continues this run (ValueError listing every difference
    otherwise), and where the run starts. Nothing is built or loaded here."""
    if not plan.config.resume:
        return ResumePoint()
    state, folder, skipped = read_resume_state(plan)
    if state is None:  # --resume auto on a folder without checkpoints: a fresh start
        return ResumePoint()
    differences = resume_differences(state, plan)
    if differences:
        hints = [BATCH_CHANGE] if any(line.startswith("global_batch:") for line in differences) else []
        raise ValueError(f"--resume {folder} cannot continue this run exactly:\n  " + "\n  ".join(differences + hints)
                         + f"\nResume with the checkpoint's settings and data, or start a new --out. (May change on "
                         f"resume: {', '.join(RESUMABLE_CHANGES)}, the number of processes, --grad-accum, DDP or "
                         "FSDP2.)")
    progress = RunProgress(start_step=state.meta.step, start_cpu_s=float(state.meta.cpu_s or 0.0),
                           resumed_from=str(folder), changed_on_resume=_changes(state, plan),
                           skipped_on_resume=tuple(skipped))
    return ResumePoint(state, progress)

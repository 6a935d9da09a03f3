"""Resume: continue a run exactly from one of its checkpoints, or say why it cannot.

Exact continuation depends on the architecture, the data (the shards' manifest digest and the tokenizer), the
ST-AR switch, the views, the seed, the launch (processes, per-process batch, accumulation) and AdamW's betas;
any difference is refused with the list of differences. The learning rate, weight decay and clipping may
change; they are applied to the optimizer and recorded. A checkpoint older than the run's newest is never
continued in place (that would overwrite the newer ones): it is branched into a new --out.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from star.checkpoint import (
    CHECKPOINTS,
    CheckpointMeta,
    TrainingState,
    checkpoint_dirs,
    checkpoint_step,
    config_differences,
    read_meta,
    read_newest_intact,
    read_training_state,
)
from star.gpt.model import GPT
from star.io import atomic_path
from star.train.config import RESUME_AUTO
from star.train.distributed import keyed_by_name
from star.train.plan import ResolvedTrainConfig
from star.weights import load_llamagen_state_dict, load_state_dict_strict

if TYPE_CHECKING:
    from star.train.loop import RunModules

# Settings a resumed run may change: applied to the optimizer's param groups (and recorded in config.json).
RESUMABLE_CHANGES = ("lr", "weight_decay", "grad_clip")


def run_meta(plan: ResolvedTrainConfig, step: int, cpu_s: float = 0.0) -> CheckpointMeta:
    """What this run records in a checkpoint at `step` (and compares with a checkpoint it resumes)."""
    config = plan.settings
    return CheckpointMeta(
        step=step, tokenizer_sha256=plan.tokenizer_sha256, star=plan.star is not None,
        views_per_image=plan.views_per_image, seed=config.seed, world_size=plan.world_size,
        batch_per_process=plan.batch_per_process, grad_accum=config.grad_accum,
        batches_consumed_per_process=step * config.grad_accum,
        optimizer={"lr": plan.lr, "weight_decay": config.weight_decay, "grad_clip": config.grad_clip,
                   "betas": list(config.betas)},
        cpu_s=round(cpu_s, 2), data_digest=plan.data_digest)


def resume_differences(state: TrainingState, plan: ResolvedTrainConfig) -> list[str]:
    """What differs between a checkpoint and this run that exact resume depends on (empty: it may continue)."""
    differences = config_differences(state.model_config, plan.model)
    return differences + state.meta.differences(run_meta(plan, state.meta.step))


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


def read_resume_state(plan: ResolvedTrainConfig) -> tuple[TrainingState | None, Path | None, list[str]]:
    """(state, its folder, damaged checkpoints skipped) for --resume; (None, None, []) for a fresh start."""
    config = plan.settings
    if config.resume == RESUME_AUTO:
        state, folder, skipped = read_newest_intact(config.out, plan.needs_teacher, plan.needs_projector)
        if state is None and skipped:
            raise ValueError(f"--resume auto: every checkpoint in {Path(config.out) / CHECKPOINTS} is damaged "
                             f"({'; '.join(skipped)}); resume from a copy, or start a new --out")
        return state, folder, skipped
    folder = Path(config.resume)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"--resume {folder}: not a complete checkpoint folder (no meta.json)")
    _refuse_rewriting_history(folder, Path(config.out))
    return read_training_state(folder, plan.needs_teacher, plan.needs_projector), folder, []


def resume_into(plan: ResolvedTrainConfig, modules: "RunModules") -> ResolvedTrainConfig:
    """Load the checkpoint --resume names into `modules` after checking it continues this run exactly; apply the
    optimizer settings that may change (RESUMABLE_CHANGES) and record them. Returns the plan with start_step."""
    if not plan.settings.resume:
        return plan
    state, folder, skipped = read_resume_state(plan)
    if state is None:  # --resume auto on a folder without checkpoints: a fresh start
        return plan
    differences = resume_differences(state, plan)
    if differences:
        raise ValueError(f"--resume {folder} cannot continue this run exactly:\n  " + "\n  ".join(differences)
                         + f"\nResume with the checkpoint's settings and data, or start a new --out. (May change on "
                         f"resume: {', '.join(RESUMABLE_CHANGES)}.)")
    modules.student.load_state_dict(state.student)
    if modules.teacher is not None:
        modules.teacher.load_state_dict(state.teacher)
    if modules.projector is not None:
        modules.projector.load_state_dict(state.projector)
    if keyed_by_name(state.optimizer):  # saved under FSDP2: loaded into the sharded optimizer once it is prepared
        modules.named_optimizer_state = state.optimizer
    else:
        modules.optimizer.load_state_dict(state.optimizer)
    config = plan.settings
    for group in modules.optimizer.param_groups:  # the saved groups hold the old values: use this run's
        group["lr"] = plan.lr
        group["weight_decay"] = config.weight_decay if group["weight_decay"] > 0 else 0.0
    saved = state.meta.optimizer
    now = {"lr": plan.lr, "weight_decay": config.weight_decay, "grad_clip": config.grad_clip}
    changed = tuple(f"{name}: checkpoint {saved[name]!r}, now {now[name]!r}" for name in RESUMABLE_CHANGES
                    if name in saved and saved[name] != now[name])
    return dataclasses.replace(plan, start_step=state.meta.step, start_cpu_s=float(state.meta.cpu_s or 0.0),
                               resumed_from=str(folder), changed_on_resume=changed, skipped_on_resume=tuple(skipped))


def trim_log(path: Path, last_step: int) -> None:
    """Drop log records after the step a run resumes from: those steps are redone, and logged again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def init_weights_from(model: GPT, path: str, tokenizer_sha256: str) -> None:
    """Fine-tune start: an official LlamaGen .pt (any container) or one of our checkpoint folders/safetensors. A
    checkpoint of ours trained with another tokenizer is loaded with a warning: its token ids mean other codes."""
    source = Path(path)
    if source.is_dir():
        recorded = read_meta(source).tokenizer_sha256 if (source / "meta.json").is_file() else None
        if recorded and recorded != tokenizer_sha256:
            warnings.warn(f"--init-from {path} was trained on tokenizer {recorded[:12]}, these shards use "
                          f"{tokenizer_sha256[:12]}: its token ids stand for other codes", stacklevel=2)
        source = source / "model.safetensors"
    load_state_dict_strict(model, load_llamagen_state_dict(source), str(source))

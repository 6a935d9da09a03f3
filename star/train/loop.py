"""Stage two: LlamaGen next-token training plus ST-AR's self-guided losses, on Accelerate.

Read top-down: `train` sets a run up and calls `train_loop`, which calls `train_step` once per optimizer step
and `log` / `save` between steps. The losses are star/train/objectives.py's; resume is star/train/resume.py;
processes and sharding are star/train/distributed.py; what keeps a run safe is star/train/safety.py.

One code path from one CPU process to many GPU nodes: Accelerate picks DDP (or FSDP) from its launch config.
Class dropout, MIM masks and contrastive positions are drawn per global image from (seed, step), the same for any
process count or --grad-accum split; dropout from (seed, step, micro-batch, rank); the data order from (seed,
global batch, step). So `--resume` continues exactly where the checkpoint left off, and checkpoints hold whole
states, so a run also resumes on another number of processes, accumulation or engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from star.checkpoint_folder import CHECKPOINTS, RUN_CONFIG, RUN_LOG, checkpoint_dirs
from star.data.manifest import Manifest
from star.gpt.model import GPT
from star.io import atomic_path, write_json_atomic
from star.runtime import batch_draw_seed, peak_memory_gb, step_seed
from star.signals import SignalStop, StopRequested
from star.train.config import TrainConfig
from star.train.distributed import (
    agreed,
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_optimizer_state,
    lowest_failing_rank,
    make_accelerator,
    one_process_warning,
    optimizer_state_by_name,
    raise_on_any_rank,
    shard_teacher_like,
)
from star.train.fine_tune import init_cpu_seconds, init_optimizer_state
from star.train.objectives import (
    LOSS_TERMS,
    Projector,
    StepDraws,
    StudentWithProjector,
    draw_step,
    global_pools,
    local_pool,
    make_teacher,
    micro_batch_losses,
    teacher_targets,
    update_teacher,
)
from star.train.plan import PLAN_KEYS, TrainPlan, make_plan
from star.train.resume import ResumePoint, RunProgress, read_resume
from star.train.run_folder import TrainingState, read_meta, save_training_state
from star.train.safety import NonFiniteGradient, NonFiniteGuard, NonFiniteLoss, claim_run_folder
from star.train.schedule import is_self_guided, lr_at, star_weight_scale
from star.train.token_cache import CacheFailed, build_unless_building, builds_cache, wait_for_token_cache
from star.train.token_loader import first_global_row, make_loader
from star.weights import load_llamagen_state_dict, load_state_dict_strict

__all__ = ["TrainConfig", "train", "prepare_token_cache", "prepare_data", "NonFiniteLoss", "NonFiniteGradient", "StopRequested"]

LOGGED = (*LOSS_TERMS, "loss")  # the step means train_step returns and log() averages, in this order
GUARDED = (*LOGGED, "grad_norm")  # what the non-finite guard watches, per optimizer step


def train(config: TrainConfig) -> dict:
    """Train one run (see TrainConfig); returns {"steps" (the run's step reached), "start_step", "trained_steps"
    (by this invocation), "total_steps", "out", "last_checkpoint", "seconds", "rank", "teacher_decay"}."""
    if config.prepare_only:
        raise ValueError("--prepare-only builds the token cache without training: call prepare_token_cache")
    accelerator, precision = launch(config)
    with contextlib.ExitStack() as held:
        claim_run_folder(accelerator, config, held)
        with agreed(accelerator, f"--shards {config.shards}"):  # every process refuses together, one line
            manifest = Manifest.load(config.shards)
            plan = make_plan(config, manifest, accelerator.num_processes, precision)
        with agreed(accelerator, f"--out {config.out}"):
            resumed = read_resume(plan)
        cache = prepare_data(accelerator, config, manifest)["cache"]
        with agreed(accelerator, f"--init-from {config.init_from}" if config.init_from else f"--out {config.out}"):
            modules = build_modules(plan, resumed.state)
        trainer = prepare_trainer(plan, modules, accelerator, cache, resumed)
        write_run_record(trainer)
        return train_loop(trainer, held.enter_context(SignalStop()))


def prepare_token_cache(config: TrainConfig) -> dict:
    """--prepare-only: check the shards and build the token cache before a launch, without training; returns
    {"cache", "samples", "shards", "rank"}."""
    accelerator, _ = launch(config)
    return {**prepare_data(accelerator, config, Manifest.load(config.shards)), "rank": accelerator.process_index}


# ----------------------------------------------------------------------------------------------------------
# Set-up


def launch(config: TrainConfig):
    """(Accelerator, precision) of this launch, with a one-line warning when it asked for several processes and
    started one."""
    accelerator, precision = make_accelerator(config)
    warning = one_process_warning(accelerator.num_processes, os.environ)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return accelerator, precision


def prepare_data(accelerator, config: TrainConfig, manifest: Manifest) -> dict:
    """The stream loader's shards checked against the manifest (sizes; every header with --verify-shards full),
    or the map loader's token cache: built outside any collective by the processes --cache-scope names (each
    node's first, one build per filesystem; or the job's main) while the others poll for it (a long build never
    meets the process group's timeout); then every process agrees."""
    problem, cache = "", None
    root, timeout_s = config.cache_dir or None, config.cache_timeout * 60
    try:
        if config.loader == "stream":
            if accelerator.is_local_main_process and manifest.folder is not None and config.verify_shards != "none":
                manifest.verify(full=config.verify_shards == "full")
        elif builds_cache(config.cache_scope, accelerator.is_main_process, accelerator.is_local_main_process):
            cache = build_unless_building(config.shards, root, manifest, config.cache_workers, timeout_s)
        else:
            hint = ("; --cache-scope shared needs a --cache-dir every node sees (node-local disks: --cache-scope node)"
                    if config.cache_scope == "shared" else "")
            cache = wait_for_token_cache(config.shards, root, manifest, timeout_s, hint=hint)
    except (ValueError, FileNotFoundError, CacheFailed) as error:
        problem = f"--shards {config.shards}: {error}"
    raise_on_any_rank(accelerator, problem, f"--shards {config.shards}: another process found a problem")
    return {"cache": cache, "samples": manifest.num_samples, "shards": len(manifest.shards)}


def parameter_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """LlamaGen's rule: decay 2-D+ weights (linears, embeddings), not norms or biases."""
    decay, no_decay = [], []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Modules:
    """A run's modules (the student, its EMA teacher, the projector) and the optimizer, before Accelerate wraps
    them."""

    student: GPT
    teacher: GPT | None
    projector: Projector | None
    optimizer: torch.optim.Optimizer
    optimizer_state: dict | None = None  # a resumed AdamW state keyed by parameter name, loaded once prepared
    optimizer_source: str = ""  # the flag and folder it came from (--resume X or --init-from X), for error lines


def build_modules(plan: TrainPlan, resumed: TrainingState | None = None) -> Modules:
    """The modules of a run: fresh (seeded), from --init-from weights, or holding a resumed checkpoint's states
    (whole; the optimizer's is loaded by `prepare_trainer`, once the optimizer is wrapped for the launch)."""
    from accelerate.utils import set_seed

    set_seed(plan.config.seed)
    student = GPT(plan.model)
    if resumed is not None:
        student.load_state_dict(resumed.student)
    elif plan.config.init_from:
        init_weights_from(student, plan.config.init_from, plan.tokenizer_sha256)
    teacher = make_teacher(student) if plan.needs_teacher else None
    projector = Projector(plan.model.dim, plan.projector_hidden) if plan.needs_projector else None
    if resumed is not None:
        for module, state in ((teacher, resumed.teacher), (projector, resumed.projector)):
            if module is not None:
                module.load_state_dict(state)
    trainable_parts = {"student": student, **({"projector": projector} if projector is not None else {})}
    groups = parameter_groups(list(trainable_parts.values()), plan.config.weight_decay)
    # fused AdamW runs on CPU too (~5x the foreach step) and can skip a non-finite step on the device
    optimizer = torch.optim.AdamW(groups, lr=plan.lr, betas=tuple(plan.config.betas), fused=True)
    name_of = {id(p): f"{prefix}.{name}" for prefix, module in trainable_parts.items()
               for name, p in module.named_parameters()}  # StudentWithProjector's parameter names
    names = [[name_of[id(p)] for p in group["params"]] for group in groups]
    if resumed is not None:
        state = None if resumed.optimizer is None else optimizer_state_by_name(resumed.optimizer, names)  # older: index
        return Modules(student, teacher, projector, optimizer, state, f"--resume {plan.config.resume}")
    if not plan.config.init_from:
        return Modules(student, teacher, projector, optimizer)
    state, line = init_optimizer_state(plan.config.init_from, plan.config.init_optimizer,
                                       optimizer.state_dict()["param_groups"], names)
    print(line, flush=True)
    return Modules(student, teacher, projector, optimizer, state, f"--init-from {plan.config.init_from}")


def init_weights_from(student: GPT, path: str, tokenizer_sha256: str) -> None:
    """Fine-tune start: an official LlamaGen .pt (any container) or one of our checkpoint folders/safetensors. A
    checkpoint of ours trained with another tokenizer is loaded with a warning: its token ids mean other codes."""
    source = Path(path)
    if source.is_dir():
        recorded = read_meta(source).tokenizer_sha256 if (source / "meta.json").is_file() else None
        if recorded and recorded != tokenizer_sha256:
            warnings.warn(f"--init-from {path} was trained on tokenizer {recorded[:12]}, these shards use "
                          f"{tokenizer_sha256[:12]}: its token ids stand for other codes", stacklevel=2)
        source = source / "model.safetensors"
    load_state_dict_strict(student, load_llamagen_state_dict(source), str(source))


@dataclass
class Trainer:
    """What the loop needs, prepared once by `prepare_trainer`."""

    plan: TrainPlan
    accelerator: Any
    trainable: nn.Module  # the StudentWithProjector the optimizer trains, wrapped by Accelerate (DDP/FSDP)
    student: GPT  # the bare GPT inside it, unwrapped (the teacher's EMA source)
    teacher: GPT | None
    teacher_forward: Any  # the teacher's forward (compiled with --compile); the EMA updates `teacher`
    optimizer: Any
    loader: Any
    run_dir: Path  # the run folder (--out)
    last_good_checkpoint: str | None = None  # newest checkpoint known to hold finite weights
    guard: NonFiniteGuard | None = None  # device-side NaN/inf flags of the loss terms and gradient norm
    uses_scaler: bool = False  # fp16: GradScaler skips overflowing steps itself (an inf norm is routine there)
    cpu_started: float = 0.0  # process CPU time when this invocation's loop began
    progress: RunProgress = RunProgress()  # where this invocation started (a resumed step, or 0)
    init_cpu_s: float | None = 0.0  # training CPU seconds of the --init-from checkpoint (None: unknown, official)

    def __post_init__(self) -> None:
        self.guard = NonFiniteGuard(GUARDED, self.accelerator.device)
        self.uses_scaler = getattr(self.accelerator, "scaler", None) is not None
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if not inner.defaults.get("fused"):
            raise ValueError("the trainer needs fused AdamW: it skips a non-finite step on the device")


def _compiled(module: nn.Module, accelerator) -> nn.Module:
    if accelerator.device.type == "cpu":
        # inductor's own CPU random numbers cost ~20 ns each (dropout masks dominate a small model's step);
        # with the fallback, dropout draws from the same generator as eager mode
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    return torch.compile(module)


def prepare_trainer(plan: TrainPlan, modules: Modules, accelerator, cache: Path | None,
                resumed: ResumePoint = ResumePoint()) -> Trainer:
    """Wrap the modules for the launch (compile, DDP/FSDP), load a resumed optimizer state into the wrapped
    optimizer, shard the teacher like the student, build the loader at the step the run starts from."""
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if modules.teacher is not None and fsdp and not accelerator.is_fsdp2:
        raise ValueError("ST-AR under FSDP needs FSDP2 (its EMA teacher is sharded and updated parameter by parameter "
                         "like the student): set fsdp_version: 2 in the Accelerate config (or `accelerate launch "
                         "--fsdp_version 2`), or train ST-AR with DDP")
    compile_ = plan.config.compile
    student_forward = _compiled(modules.student, accelerator) if compile_ else modules.student
    trainable, optimizer = accelerator.prepare(StudentWithProjector(student_forward, modules.projector),
                                               modules.optimizer)
    if modules.optimizer_state is not None:
        load_carried_optimizer_state(trainable, optimizer, modules.optimizer_state, modules.optimizer_source)
        if modules.optimizer_source.startswith("--init-from") and modules.projector is not None:
            # loading initialised every parameter's state (a step at lr 0); the new projector starts truly fresh
            inner = getattr(optimizer, "optimizer", optimizer)
            for parameter in accelerator.unwrap_model(trainable).projector.parameters():
                inner.state.pop(parameter, None)
    student = accelerator.unwrap_model(trainable).student
    student = getattr(student, "_orig_mod", student)  # the module itself, also when compiled
    teacher_forward = modules.teacher
    if modules.teacher is not None:
        modules.teacher.to(accelerator.device)
        if is_sharded(student):  # FSDP2: the teacher holds the same shards as the student (loaded whole above)
            shard_teacher_like(modules.teacher, student, accelerator.state.fsdp_plugin.mixed_precision_policy)
        elif compile_:
            teacher_forward = _compiled(modules.teacher, accelerator)
    progress = resumed.progress
    return Trainer(plan, accelerator, trainable, student, modules.teacher, teacher_forward, optimizer,
                       make_loader(plan, accelerator, cache, progress.start_step), Path(plan.config.out),
                       last_good_checkpoint=progress.resumed_from, progress=progress,
                       init_cpu_s=init_cpu_seconds(plan.config.init_from, progress.resumed_from))


def load_carried_optimizer_state(trainable: nn.Module, optimizer, state: dict, source: str) -> None:
    """Load a resumed (or --init-from) AdamW state into the prepared optimizer; one line naming the checkpoint when
    it does not fit this run's parameters (before any step)."""
    try:
        load_optimizer_state(trainable, optimizer, state, strict=not source.startswith("--init-from"))
    except (KeyError, ValueError, RuntimeError) as error:
        way_out = ("pass --no-init-optimizer" if source.startswith("--init-from") else
                   "resume from another checkpoint or start a new --out")
        raise ValueError(f"{source}: its optimizer.pt does not fit this run's parameters "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         f"{way_out}") from error


def write_run_record(trainer: Trainer) -> None:
    plan, run_dir, progress = trainer.plan, trainer.run_dir, trainer.progress
    if trainer.accelerator.is_main_process:
        decay_before = resumed_teacher_decay(progress)  # read before config.json is replaced
        write_json_atomic(run_dir / RUN_CONFIG, {**plan.to_json(), **progress.to_json(),
                                                 "init_cpu_s": trainer.init_cpu_s})
        trim_log(run_dir / RUN_LOG, progress.start_step)
        print(plan.model_source, flush=True)
        if plan.self_guided:
            print(teacher_decay_line(plan, decay_before), flush=True)
        for change in progress.changed_on_resume:
            print(f"resume: {change} (applied)", flush=True)
    if plan.config.trackers:
        flat = {k: v for k, v in dataclasses.asdict(plan.config).items() if isinstance(v, (int, float, str, bool))}
        trainer.accelerator.init_trackers("star", config={**flat, "lr": plan.lr, "total_steps": plan.total_steps})


def trim_log(path: Path, last_step: int) -> None:
    """Drop log records after the step a run resumes from: those steps are redone, and logged again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------------------
# The loop


def resumed_teacher_decay(progress: RunProgress) -> float | None:
    """The teacher decay the resumed checkpoint was trained with (its run folder's config.json), or None."""
    resumed_from = progress.resumed_from
    if resumed_from is None:
        return None
    try:
        record = json.loads((Path(resumed_from).parent.parent / RUN_CONFIG).read_text())
        return float(record[PLAN_KEYS["star_settings"]]["teacher_decay"])
    except (OSError, ValueError, KeyError, TypeError):  # no record, or a run without ST-AR
        return None


def teacher_decay_line(plan: TrainPlan, before: float | None) -> str:
    """The resolved teacher decay, said as a change when a resume changes it (`auto` follows the run length)."""
    decay, flag = plan.star_settings.teacher_decay, plan.config.star_settings.teacher_decay
    if before is not None and before != decay:
        return (f"resume: teacher EMA decay changed from {before:.6g} to {decay:.6g} (--teacher-decay {flag}, "
                f"{plan.total_steps} steps)")
    return f"teacher EMA decay {decay:.6g} (--teacher-decay {flag}, {plan.total_steps} steps)"


def train_loop(trainer: Trainer, stop: SignalStop) -> dict:
    plan, accelerator = trainer.plan, trainer.accelerator
    config, total_steps = plan.config, plan.total_steps
    start_step, resumed_from = trainer.progress.start_step, trainer.progress.resumed_from
    if resumed_from is not None and accelerator.is_main_process:
        print(f"resumed from step {start_step} ({resumed_from}); training to step {total_steps}", flush=True)
    milestones = set(config.milestones)
    # a signal is read every step on one process; across processes at most every 10 steps (a collective)
    signal_every = 1 if accelerator.num_processes == 1 else min(10, config.log_every)
    trainer.trainable.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress and accelerator.is_main_process))
    sums = torch.zeros(len(LOGGED), device=accelerator.device)  # summed on the device between logs
    interval_steps, interval_start = 0, time.time()
    step, started = start_step, time.time()
    trainer.cpu_started = time.process_time()
    data = iter(trainer.loader)
    while step < total_steps:
        step_sums, grad_norm = train_step(trainer, data, step)
        sums += step_sums
        step += 1
        interval_steps += 1
        bar.update(1)
        stopping = step % signal_every == 0 and stop.requested(accelerator, accelerator.num_processes > 1)
        save_now = step % config.ckpt_every == 0 or step in milestones or step == total_steps or stopping
        if save_now or step % config.log_every == 0:  # a record at every checkpoint
            raise_if_non_finite(trainer)  # before any log line or checkpoint
            record = log(trainer, step, sums, (interval_steps, interval_start, started), grad_norm)
            bar.set_postfix(loss=f"{record['loss']:.4f}", ar=f"{record['loss_ar']:.4f}",
                            img_s=f"{record['images_per_s']:.1f}")
            sums.zero_()
            interval_steps, interval_start = 0, time.time()
        if save_now:
            save(trainer, step)
        if stopping:
            name, code = stop.received or ("a signal on another process", 143)
            raise StopRequested(f"stopped by {name} after step {step} ({step - start_step} trained by this "
                                f"invocation): checkpoint {trainer.last_good_checkpoint} written; continue with "
                                "--resume auto", code, quiet=not accelerator.is_main_process)
    bar.close()
    if config.trackers:
        accelerator.end_training()
    newest = checkpoint_dirs(trainer.run_dir)
    return {"steps": step, "start_step": start_step, "trained_steps": step - start_step, "total_steps": total_steps,
            "resumed_from": resumed_from, "out": str(trainer.run_dir),
            "last_checkpoint": str(newest[-1]) if newest else None,
            "seconds": round(time.time() - started, 2), "rank": accelerator.process_index,
            "teacher_decay": plan.star_settings.teacher_decay if plan.self_guided else None}


def train_step(trainer: Trainer, data, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step, in the order it happens: read the step's --grad-accum micro-batches; draw the step's
    random choices for its whole global batch; the teacher's targets and the InfoNCE negatives; forward and backward
    each micro-batch (the gradients add up); clip; step, or skip a non-finite step on the device; the teacher's EMA.
    The step's lr (--warmup-steps), self-guided weights (--star-warmup-steps) and whether it is self-guided at all
    (--star-every) are functions of `step` (star/train/schedule.py).
    Returns (the step's mean of each LOGGED term [len(LOGGED)], the gradient norm before clipping), both on the
    device: nothing here waits for the host."""
    plan = trainer.plan
    batches = [next(data).to(trainer.accelerator.device) for _ in range(plan.config.grad_accum)]
    draws = step_draws(trainer, step)
    guided_step = plan.self_guided and is_self_guided(step, plan.config.star_every)
    teacher_side = teacher_side_of_step(trainer, batches, draws) if guided_step else [(None, None)] * len(batches)
    sums = accumulate_gradients(trainer, batches, draws, teacher_side, step)
    grad_norm = clip_gradients(trainer)
    for group in trainer.optimizer.param_groups:  # --warmup-steps: a function of the step, so resume repeats it
        group["lr"] = lr_at(plan.lr, step, plan.config.warmup_steps)
    step_unless_non_finite(trainer, grad_norm)
    watched_norm = grad_norm.new_zeros(()) if trainer.uses_scaler else grad_norm  # fp16 overflow is the scaler's job
    trainer.guard.record(torch.cat([sums, watched_norm.reshape(1)]), step + 1)
    if trainer.teacher is not None:
        update_teacher(trainer.teacher, trainer.student, plan.star_settings.teacher_decay)
    return sums, grad_norm


def step_draws(trainer: Trainer, step: int) -> StepDraws:
    """Class dropout, MIM masks and contrastive positions of the step's whole global batch, from (seed, step) only:
    every process draws the same and takes its micro-batches' rows."""
    plan, device = trainer.plan, trainer.accelerator.device
    generator = torch.Generator(device=device).manual_seed(batch_draw_seed(plan.config.seed, step))
    return draw_step(plan.config.batch_size, plan.views_per_image, plan.model, plan.star_settings, generator, device)


def micro_rows(trainer: Trainer, micro: int, draws: StepDraws) -> StepDraws:
    """The draws of this process's micro-batch `micro` (its rows of the global batch)."""
    plan, accelerator = trainer.plan, trainer.accelerator
    start = first_global_row(micro, accelerator.process_index, accelerator.num_processes, plan.batch_per_process)
    return draws.rows(start, plan.batch_per_process)


def teacher_side_of_step(trainer: Trainer, batches: list, draws: StepDraws) -> list[tuple]:
    """(teacher targets, negative pool) per micro-batch; (None, None) without ST-AR. The teacher does not change
    within a step, so it runs over every micro-batch first (no gradient) and its targets are kept for the step:
    the cost of negatives across micro-batches is grad_accum micro-batches of final states [b, M, S, D] held at once
    (in the autocast dtype; L_MIM's targets), plus one all_gather of the position features per step."""
    plan, accelerator = trainer.plan, trainer.accelerator
    if trainer.teacher is None:
        return [(None, None)] * len(batches)
    with accelerator.autocast():
        targets = [teacher_targets(batch, trainer.teacher_forward, plan.star_settings, plan.model,
                                   micro_rows(trainer, micro, draws))
                   for micro, batch in enumerate(batches)]
    image_ids = [batch.indices for batch in batches]
    if plan.star_settings.negatives == "local":
        pools = [local_pool(part, ids) for part, ids in zip(targets, image_ids)]
    else:
        pools = global_pools(targets, image_ids, accelerator.gather, accelerator.num_processes,
                             accelerator.process_index)
    return list(zip(targets, pools))


def accumulate_gradients(trainer: Trainer, batches: list, draws: StepDraws, teacher_side: list[tuple],
                         step: int) -> torch.Tensor:
    """Forward and backward of each micro-batch; the gradients add up in .grad. Each loss is divided by the number
    of micro-batches, so the sum is the step's mean gradient; DDP averages it over the processes on the last
    micro-batch only (the others run under no_sync). Returns the step's mean of each LOGGED term [len(LOGGED)]."""
    plan, accelerator = trainer.plan, trainer.accelerator
    count = len(batches)
    sums = torch.zeros(len(LOGGED), device=accelerator.device)
    weight_scale = star_weight_scale(step, plan.config.star_warmup_steps)
    for micro, batch in enumerate(batches):
        # dropout masks are drawn per process over its own rows: seeded by the micro-batch and the process
        torch.manual_seed(step_seed(plan.config.seed, step * count + micro, accelerator.process_index))
        last = micro == count - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(trainer.trainable):
            with accelerator.autocast():
                terms = micro_batch_losses(batch, trainer.trainable, plan.star_settings, plan.model,
                                           micro_rows(trainer, micro, draws),
                                           *teacher_side[micro], weight_scale=weight_scale)
            accelerator.backward(terms["loss"] / count)
        sums += torch.stack([terms[name].detach().float() for name in LOGGED]) / count
    return sums


def clip_gradients(trainer: Trainer) -> torch.Tensor:
    """Clip the gradient norm over all parameters to --grad-clip; returns the norm before clipping (fp32, on the
    device). A NaN loss gives a NaN norm too, so the step's one check (`step_unless_non_finite`) covers both."""
    grad_norm = trainer.accelerator.clip_grad_norm_(trainer.trainable.parameters(),
                                                    trainer.plan.config.grad_clip).detach()
    return getattr(grad_norm, "full_tensor", lambda: grad_norm)().float()  # FSDP2: a DTensor


def step_unless_non_finite(trainer: Trainer, grad_norm: torch.Tensor) -> None:
    """The optimizer step, skipped on the device when the gradient norm is NaN/inf, then zeroed gradients.

    Why this way: reading the norm on the host would stall every step on a device sync. Fused AdamW takes a
    `found_inf` tensor (the input GradScaler uses to skip fp16 overflow steps) and, where it is 1, leaves the
    weights, moments and step counts as they were; it is set from the norm on the device for this step only. The
    guard reports a skipped step at the next log (`raise_if_non_finite`). Under fp16 the GradScaler sets it itself.
    """
    adamw = trainer.optimizer.optimizer  # the fused AdamW inside Accelerate's AcceleratedOptimizer
    if not trainer.uses_scaler:
        adamw.found_inf = (~torch.isfinite(grad_norm)).float()
    trainer.optimizer.step()
    if not trainer.uses_scaler:
        del adamw.found_inf
    trainer.optimizer.zero_grad(set_to_none=True)


def raise_if_non_finite(trainer: Trainer) -> None:
    """Read the device-side guard (one sync + one collective): at log steps and before every checkpoint, so a
    checkpoint is never written after a non-finite step and no step pays a host-device sync."""
    failure = trainer.guard.first_failure(lambda flags: trainer.accelerator.reduce(flags, reduction="sum"))
    if failure is None:
        return
    step, bad = failure
    last_good = (f"The newest checkpoint, {trainer.last_good_checkpoint}, was written before this step with finite "
                 "weights." if trainer.last_good_checkpoint else "No checkpoint of this trainer was written yet.")
    reporter = lowest_failing_rank(trainer.accelerator, step is not None)  # every process is here: one reports
    if reporter != trainer.accelerator.process_index:
        raise NonFiniteLoss(f"process {reporter} saw a non-finite loss or gradient; its steps were not applied. "
                            f"{last_good}", quiet=True)
    if set(bad) == {"grad_norm"}:
        raise NonFiniteGradient(f"non-finite gradient norm ({bad['grad_norm']}) at step {step} with a finite loss; "
                                f"the step was not applied. {last_good} Lower --lr or --grad-clip, or check the data.")
    terms = [name for name in bad if name != "grad_norm"]
    raise NonFiniteLoss(f"non-finite loss at step {step}: {', '.join(terms)} = {[bad[t] for t in terms]}; "
                        f"the step was not applied. {last_good} Lower --lr or check the data.")


# ----------------------------------------------------------------------------------------------------------
# Between steps


def cpu_seconds(trainer: Trainer) -> float:
    """CPU seconds this process spent in the training loop since the run began (earlier invocations included)."""
    return trainer.progress.start_cpu_s + time.process_time() - trainer.cpu_started


def log(trainer: Trainer, step: int, sums: torch.Tensor, interval: tuple[int, float, float],
        grad_norm: torch.Tensor) -> dict:
    """Average the interval's losses over processes and append one record to log.jsonl."""
    interval_steps, interval_start, started = interval
    accelerator, plan = trainer.accelerator, trainer.plan
    elapsed = max(time.time() - interval_start, 1e-9)
    averaged = accelerator.reduce(sums.float().to(accelerator.device), reduction="mean").tolist()
    record = {"step": step, **{n: round(v / interval_steps, 6) for n, v in zip(LOGGED, averaged)}}
    images_per_second = interval_steps * plan.config.batch_size / elapsed
    record.update({"grad_norm": round(float(grad_norm), 4), "lr": trainer.optimizer.param_groups[0]["lr"],
                   "images_per_s": round(images_per_second, 2),
                   "tokens_per_s": round(images_per_second * plan.model.block_size * plan.views_per_image, 1),
                   "memory_gb": round(peak_memory_gb(accelerator.device), 3), "time": round(time.time() - started, 2),
                   "cpu_s": round(cpu_seconds(trainer), 2),
                   "total_cpu_s": round((trainer.init_cpu_s or 0.0) + cpu_seconds(trainer), 2)})  # + the --init-from's
    if plan.self_guided:  # the weights in effect at this step (--star-warmup-steps; 0 on --star-every's others)
        on = is_self_guided(step - 1, plan.config.star_every)
        scale = star_weight_scale(step - 1, plan.config.star_warmup_steps) if on else 0.0
        record.update({"mim_weight": round(scale * plan.star_settings.mim_weight, 6),
                       "contrastive_weight": round(scale * plan.star_settings.contrastive_weight, 6)})
    if accelerator.is_main_process:
        with open(trainer.run_dir / RUN_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if plan.config.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    return record


def save(trainer: Trainer, step: int) -> None:
    """Checkpoint: every process takes part in gathering (FSDP2 shards to rank 0's CPU); the main process writes
    whole states (the optimizer's keyed by parameter name), which any launch can resume."""
    accelerator, plan = trainer.accelerator, trainer.plan
    accelerator.wait_for_everyone()
    fsdp2 = is_sharded(trainer.trainable)
    full_state = full_state_dict(trainer.trainable) if fsdp2 else accelerator.get_state_dict(trainer.trainable)
    teacher = full_state_dict(trainer.teacher) if trainer.teacher is not None else None
    optimizer_state = full_optimizer_state(trainer.trainable, trainer.optimizer)
    if accelerator.is_main_process:
        student = {k.removeprefix("student.").removeprefix("_orig_mod."): v for k, v in full_state.items()
                   if k.startswith("student.")}
        projector = {k.removeprefix("projector."): v for k, v in full_state.items() if k.startswith("projector.")}
        state = TrainingState(plan.model, student, teacher, projector or None, optimizer_state,
                              plan.checkpoint_meta(step, cpu_seconds(trainer)))
        written = save_training_state(trainer.run_dir, step, state, plan.config.keep_checkpoints,
                                      keep_steps=plan.config.milestones)
        trainer.last_good_checkpoint = str(written)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # every process can name the checkpoint the main process wrote
        trainer.last_good_checkpoint = str(trainer.run_dir / CHECKPOINTS / f"step-{step:07d}")

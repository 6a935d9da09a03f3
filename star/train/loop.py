"""Stage two: LlamaGen next-token training plus ST-AR's self-guided losses, on Accelerate.

Read top-down: `train` sets a run up and calls `train_loop`, which calls `train_step` once per optimizer step
and `log` / `save` between steps. The losses are star/train/objectives.py's; resume is star/train/resume.py;
processes and sharding are star/train/distributed.py; what keeps a run safe is star/train/safety.py.

One code path from one CPU process to many GPU nodes: Accelerate picks DDP (or FSDP) from its launch config.
All per-step randomness (dropout, class dropout, MIM masks, contrastive positions, the data order) is a function
of (seed, rank, step), so `--resume` continues exactly where the checkpoint left off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from star.checkpoint import RUN_CONFIG, RUN_LOG, TrainingState, checkpoint_dirs, save_training_state
from star.data.manifest import Manifest
from star.gpt.model import GPT
from star.io import write_json_atomic
from star.runtime import peak_memory_gb, step_seed
from star.train.config import TrainConfig
from star.train.distributed import (
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_named_optimizer_state,
    make_accelerator,
    raise_on_any_rank,
    shard_teacher_like,
)
from star.train.objectives import (
    LOSS_TERMS,
    Projector,
    StudentWithProjector,
    make_teacher,
    micro_batch_losses,
    update_teacher,
)
from star.train.plan import ResolvedTrainConfig, resolve_config
from star.train.resume import init_weights_from, resume_into, run_meta, trim_log
from star.train.safety import (
    NonFiniteGradient,
    NonFiniteGuard,
    NonFiniteLoss,
    SignalStop,
    StopRequested,
    claim_run_folder,
)
from star.train.token_cache import CacheFailed, build_token_cache, wait_for_token_cache
from star.train.token_loader import make_loader

__all__ = ["TrainConfig", "train", "prepare_data", "NonFiniteLoss", "NonFiniteGradient", "StopRequested"]

GUARDED = (*LOSS_TERMS, "loss", "grad_norm")  # what the non-finite guard watches, per optimizer step


def train(config: TrainConfig) -> dict:
    """Train one run (see TrainConfig); returns {"steps", "out", "last_checkpoint", "seconds", "rank", ...}.
    With --prepare-only: check the shards, build the token cache, and return without training."""
    accelerator, precision = make_accelerator(config)
    if config.prepare_only:
        return prepare_data(accelerator, config, Manifest.load(config.shards))
    with contextlib.ExitStack() as held:
        claim_run_folder(accelerator, config, held)
        manifest = Manifest.load(config.shards)
        plan = resolve_config(config, manifest, accelerator.num_processes, precision)
        cache = prepare_data(accelerator, config, manifest)["cache"]
        modules = build_modules(plan)
        plan = resume_into(plan, modules)
        run = prepare_run(plan, modules, accelerator, cache)
        write_run_record(run)
        return train_loop(run, held.enter_context(SignalStop()))


# ----------------------------------------------------------------------------------------------------------
# Set-up


def prepare_data(accelerator, config: TrainConfig, manifest: Manifest) -> dict:
    """The stream loader's shards checked against the manifest (sizes; every header with --verify-shards full),
    or the map loader's token cache: built once per node by its first process outside any collective while the
    others poll for it (a long build never meets the process group's timeout); then every process agrees."""
    problem, cache = "", None
    try:
        if config.loader == "stream":
            if accelerator.is_local_main_process and manifest.folder is not None and config.verify_shards != "none":
                manifest.verify(full=config.verify_shards == "full")
        elif accelerator.is_local_main_process:
            cache = build_token_cache(config.shards, config.cache_dir or None, manifest, config.cache_workers)
        else:
            cache = wait_for_token_cache(config.shards, config.cache_dir or None, manifest, config.cache_timeout * 60)
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
class RunModules:
    """The trainable and EMA modules and the optimizer, before Accelerate wraps them."""

    student: GPT
    teacher: GPT | None
    projector: Projector | None
    optimizer: torch.optim.Optimizer
    named_optimizer_state: dict | None = None  # a resumed FSDP2 optimizer state, loaded after sharding


def build_modules(plan: ResolvedTrainConfig) -> RunModules:
    from accelerate.utils import set_seed

    set_seed(plan.settings.seed)
    student = GPT(plan.model)
    if plan.settings.init_from:
        init_weights_from(student, plan.settings.init_from, plan.tokenizer_sha256)
    teacher = make_teacher(student) if plan.needs_teacher else None
    projector = Projector(plan.model.dim, plan.projector_hidden) if plan.needs_projector else None
    trainable = [student] + ([projector] if projector is not None else [])
    # fused AdamW runs on CPU too (~5x the foreach step) and can skip a non-finite step on the device
    optimizer = torch.optim.AdamW(parameter_groups(trainable, plan.settings.weight_decay), lr=plan.lr,
                                  betas=tuple(plan.settings.betas), fused=True)
    return RunModules(student, teacher, projector, optimizer)


@dataclass
class TrainingRun:
    """What the loop needs, prepared once by `prepare_run`."""

    plan: ResolvedTrainConfig
    accelerator: Any
    model: nn.Module  # the StudentWithProjector the optimizer trains, wrapped by Accelerate (DDP/FSDP)
    student: GPT  # the unwrapped student (the teacher's EMA source)
    teacher: GPT | None
    teacher_forward: Any  # the teacher's forward (compiled with --compile); the EMA updates `teacher`
    optimizer: Any
    loader: Any
    out: Path
    last_good_checkpoint: str | None = None  # newest checkpoint known to hold finite weights
    guard: NonFiniteGuard | None = None  # device-side NaN/inf flags of the loss terms and gradient norm
    uses_scaler: bool = False  # fp16: GradScaler skips overflowing steps itself (an inf norm is routine there)
    cpu_started: float = 0.0  # process CPU time when this invocation's loop began

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


def prepare_run(plan: ResolvedTrainConfig, modules: RunModules, accelerator, cache: Path | None) -> TrainingRun:
    """Wrap the modules for the launch (compile, DDP/FSDP), shard the teacher like the student, build the loader."""
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if modules.teacher is not None and fsdp and not accelerator.is_fsdp2:
        raise ValueError("ST-AR under FSDP needs FSDP2 (its EMA teacher is sharded and updated parameter by parameter "
                         "like the student): set fsdp_version: 2 in the Accelerate config (or `accelerate launch "
                         "--fsdp_version 2`), or train ST-AR with DDP")
    compile_ = plan.settings.compile
    trained = _compiled(modules.student, accelerator) if compile_ else modules.student
    model, optimizer = accelerator.prepare(StudentWithProjector(trained, modules.projector), modules.optimizer)
    if modules.named_optimizer_state is not None:
        load_named_optimizer_state(model, optimizer, modules.named_optimizer_state)
    student = accelerator.unwrap_model(model).student
    student = getattr(student, "_orig_mod", student)  # the module itself, also when compiled
    teacher_forward = modules.teacher
    if modules.teacher is not None:
        modules.teacher.to(accelerator.device)
        if is_sharded(student):  # FSDP2: the teacher holds the same shards as the student (loaded full by resume)
            shard_teacher_like(modules.teacher, student, accelerator.state.fsdp_plugin.mixed_precision_policy)
        elif compile_:
            teacher_forward = _compiled(modules.teacher, accelerator)
    return TrainingRun(plan, accelerator, model, student, modules.teacher, teacher_forward, optimizer,
               make_loader(plan, accelerator, cache), Path(plan.settings.out), last_good_checkpoint=plan.resumed_from)


def write_run_record(run: TrainingRun) -> None:
    plan, out = run.plan, run.out
    if run.accelerator.is_main_process:
        write_json_atomic(out / RUN_CONFIG, plan.to_json())
        trim_log(out / RUN_LOG, plan.start_step)
        print(plan.model_source, flush=True)
        if plan.star is not None:
            print(f"teacher EMA decay {plan.star.teacher_decay:.6g} (--teacher-decay "
                  f"{plan.settings.star_settings.teacher_decay}, {plan.total_steps} steps)", flush=True)
        for change in plan.changed_on_resume:
            print(f"resume: {change} (applied)", flush=True)
    if plan.settings.trackers:
        flat = {k: v for k, v in dataclasses.asdict(plan.settings).items() if isinstance(v, (int, float, str, bool))}
        run.accelerator.init_trackers("star", config={**flat, "lr": plan.lr, "total_steps": plan.total_steps})


# ----------------------------------------------------------------------------------------------------------
# The loop


def train_loop(run: TrainingRun, stop: SignalStop) -> dict:
    plan, accelerator = run.plan, run.accelerator
    config, total_steps = plan.settings, plan.total_steps
    milestones = set(config.milestones)
    # a signal is read every step on one process; across processes at most every 10 steps (a collective)
    signal_every = 1 if accelerator.num_processes == 1 else min(10, config.log_every)
    run.model.train()
    bar = tqdm(total=total_steps, initial=plan.start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress and accelerator.is_main_process))
    sums = torch.zeros(len(LOSS_TERMS) + 1, device=accelerator.device)  # [5] summed on the device between logs
    interval_steps, interval_start = 0, time.time()
    step, started = plan.start_step, time.time()
    run.cpu_started = time.process_time()
    data = iter(run.loader)
    while step < total_steps:
        step_sums, grad_norm = train_step(run, data, step)
        sums += step_sums
        step += 1
        interval_steps += 1
        bar.update(1)
        stopping = step % signal_every == 0 and stop.requested(accelerator, accelerator.num_processes > 1)
        save_now = step % config.ckpt_every == 0 or step in milestones or step == total_steps or stopping
        if save_now or step % config.log_every == 0:  # a record at every checkpoint
            raise_if_non_finite(run)  # before any log line or checkpoint
            record = log(run, step, sums, (interval_steps, interval_start, started), grad_norm)
            bar.set_postfix(loss=f"{record['loss']:.4f}", ar=f"{record['loss_ar']:.4f}",
                            img_s=f"{record['images_per_s']:.1f}")
            sums.zero_()
            interval_steps, interval_start = 0, time.time()
        if save_now:
            save(run, step)
        if stopping:
            name, code = stop.received or ("a signal on another process", 143)
            raise StopRequested(f"stopped by {name} after step {step}: checkpoint {run.last_good_checkpoint} "
                                f"written; continue with --resume auto", code)
    bar.close()
    if config.trackers:
        accelerator.end_training()
    newest = checkpoint_dirs(run.out)
    return {"steps": step, "out": str(run.out), "last_checkpoint": str(newest[-1]) if newest else None,
            "seconds": round(time.time() - started, 2), "rank": accelerator.process_index,
            "teacher_decay": plan.star.teacher_decay if plan.star is not None else None}


def train_step(run: TrainingRun, data, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step (grad_accum micro-batches). Returns (mean loss terms [5], gradient norm before clip),
    both still on the device: nothing here waits for the host."""
    plan, accelerator = run.plan, run.accelerator
    config, device = plan.settings, accelerator.device
    sums = torch.zeros(len(LOSS_TERMS) + 1, device=device)  # [5]
    grad_norm = torch.full((), float("nan"), device=device)
    for micro in range(config.grad_accum):
        batch = next(data).to(device)
        seed = step_seed(config.seed, step * config.grad_accum + micro, accelerator.process_index)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator(device=device).manual_seed(seed)
        with accelerator.accumulate(run.model):
            with accelerator.autocast():
                terms = micro_batch_losses(batch, run.model, run.teacher_forward, plan.star, plan.model, generator)
            sums += torch.stack([terms[name].detach().float() for name in (*LOSS_TERMS, "loss")]) / config.grad_accum
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients:
                # a NaN loss gives a NaN gradient norm too, so this one check also keeps poisoned losses out
                grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), config.grad_clip).detach()
                grad_norm = getattr(grad_norm, "full_tensor", lambda: grad_norm)().float()  # FSDP2: a DTensor
                skip_update_if_non_finite(run, grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    watched_norm = grad_norm.new_zeros(()) if run.uses_scaler else grad_norm  # fp16 overflow is the scaler's job
    run.guard.record(torch.cat([sums, watched_norm.reshape(1)]), step + 1)
    if run.teacher is not None:
        update_teacher(run.teacher, run.student, plan.star.teacher_decay)
    return sums, grad_norm


def skip_update_if_non_finite(run: TrainingRun, grad_norm: torch.Tensor) -> None:
    """Make the optimizer step a no-op on the device when the gradient norm is NaN/inf (fused AdamW's found_inf,
    the mechanism GradScaler uses): a poisoned step is never applied and nothing waits for the host."""
    if not run.uses_scaler:
        run.optimizer.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()


def raise_if_non_finite(run: TrainingRun) -> None:
    """Read the device-side guard (one sync + one collective): at log steps and before every checkpoint, so a
    checkpoint is never written after a non-finite step and no step pays a host-device sync."""
    failure = run.guard.first_failure(lambda flags: run.accelerator.reduce(flags, reduction="sum"))
    if failure is None:
        return
    step, bad = failure
    last_good = (f"The newest checkpoint, {run.last_good_checkpoint}, was written before this step with finite "
                 "weights." if run.last_good_checkpoint else "No checkpoint of this run was written yet.")
    if step is None:
        raise NonFiniteLoss(f"another process saw a non-finite loss or gradient; its steps were not applied. "
                            f"{last_good}")
    if set(bad) == {"grad_norm"}:
        raise NonFiniteGradient(f"non-finite gradient norm ({bad['grad_norm']}) at step {step} with a finite loss; "
                                f"the step was not applied. {last_good} Lower --lr or --grad-clip, or check the data.")
    terms = [name for name in bad if name != "grad_norm"]
    raise NonFiniteLoss(f"non-finite loss at step {step}: {', '.join(terms)} = {[bad[t] for t in terms]}; "
                        f"the step was not applied. {last_good} Lower --lr or check the data.")


# ----------------------------------------------------------------------------------------------------------
# Between steps


def cpu_seconds(run: TrainingRun) -> float:
    """CPU seconds this process spent in the training loop since the run began (earlier invocations included)."""
    return run.plan.start_cpu_s + time.process_time() - run.cpu_started


def log(run: TrainingRun, step: int, sums: torch.Tensor, interval: tuple[int, float, float], grad_norm: torch.Tensor) -> dict:
    """Average the interval's losses over processes and append one record to log.jsonl."""
    interval_steps, interval_start, started = interval
    accelerator, plan = run.accelerator, run.plan
    elapsed = max(time.time() - interval_start, 1e-9)
    averaged = accelerator.reduce(sums.float().to(accelerator.device), reduction="mean").tolist()
    record = {"step": step, **{n: round(v / interval_steps, 6) for n, v in zip((*LOSS_TERMS, "loss"), averaged)}}
    images_per_second = interval_steps * plan.settings.batch_size / elapsed
    record.update({"grad_norm": round(float(grad_norm), 4), "lr": run.optimizer.param_groups[0]["lr"],
                   "images_per_s": round(images_per_second, 2),
                   "tokens_per_s": round(images_per_second * plan.model.block_size * plan.views_per_image, 1),
                   "memory_gb": round(peak_memory_gb(accelerator.device), 3), "time": round(time.time() - started, 2),
                   "cpu_s": round(cpu_seconds(run), 2)})
    if accelerator.is_main_process:
        with open(run.out / RUN_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if plan.settings.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    return record


def save(run: TrainingRun, step: int) -> None:
    """Checkpoint: every process takes part in gathering (FSDP2 shards to rank 0's CPU); the main process writes."""
    accelerator, plan = run.accelerator, run.plan
    accelerator.wait_for_everyone()
    fsdp2 = is_sharded(run.model)
    full_state = full_state_dict(run.model) if fsdp2 else accelerator.get_state_dict(run.model)
    teacher = full_state_dict(run.teacher) if run.teacher is not None else None
    optimizer_state = full_optimizer_state(run.model, run.optimizer) if fsdp2 else run.optimizer.state_dict()
    if accelerator.is_main_process:
        student = {k.removeprefix("student.").removeprefix("_orig_mod."): v for k, v in full_state.items()
                   if k.startswith("student.")}
        projector = {k.removeprefix("projector."): v for k, v in full_state.items() if k.startswith("projector.")}
        state = TrainingState(plan.model, student, teacher, projector or None, optimizer_state,
                              run_meta(plan, step, cpu_seconds(run)))
        run.last_good_checkpoint = str(save_training_state(run.out, step, state, plan.settings.keep_checkpoints,
                                                           keep_steps=plan.settings.milestones))
    accelerator.wait_for_everyone()

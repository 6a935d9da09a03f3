"""Stage two: LlamaGen next-token training plus ST-AR's self-guided losses, on Accelerate.

One code path from one CPU process to many GPU nodes: Accelerate picks DDP (or FSDP) from its launch config.
All per-step randomness (dropout, class dropout, MIM masks, contrastive positions, the data order) is a function
of (seed, rank, step), so `--resume` continues exactly where the checkpoint left off.

Safety: the run folder is locked by the main process and refused if it holds a run without --resume; a step
whose loss or gradient norm is not finite stops the run before the optimizer applies it, and no checkpoint
with non-finite weights is written (star/checkpoint.py), so "the newest checkpoint" is always a good one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from star.checkpoint import (
    CHECKPOINTS,
    RUN_CONFIG,
    RUN_LOG,
    TrainingState,
    checkpoint_dirs,
    config_differences,
    load_llamagen_state_dict,
    load_state_dict_strict,
    read_newest_intact,
    read_training_state,
    run_holds_a_run,
    save_training_state,
)
from star.data.shards import Manifest
from star.gpt.model import GPT, drop_class_labels
from star.io import FolderLocked, atomic_path, folder_lock, write_json_atomic
from star.runtime import pick_device, resolve_precision, step_seed
from star.train.config import RESUME_AUTO, ResolvedTrainConfig, TrainConfig, resolve_config
from star.train.objectives import (
    NonFiniteGuard,
    Projector,
    StarSettings,
    StudentWithProjector,
    full_state_dict,
    is_sharded,
    key_mask,
    make_teacher,
    sample_positions,
    shard_teacher_like,
    star_losses,
    total_loss,
    update_teacher,
)
from star.train.token_loader import EpochBatchSampler, TokenViews, build_token_cache, collate_views, stream_loader

__all__ = ["TrainConfig", "ResolvedTrainConfig", "NonFiniteLoss", "NonFiniteGradient", "train"]

LOSS_TERMS = ("loss_ar", "loss_mim", "loss_step", "loss_view")
# Settings a resumed run may change: applied to the optimizer's param groups (and recorded in config.json).
RESUMABLE_CHANGES = ("lr", "weight_decay", "grad_clip")


class NonFiniteLoss(RuntimeError):
    """A step's loss is NaN/inf: the run stops before the step is applied."""


class NonFiniteGradient(NonFiniteLoss):
    """A step's loss is finite but its gradient norm is not: the run stops before the optimizer applies it."""


# ----------------------------------------------------------------------------------------------------------
# Set-up


def parameter_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """LlamaGen's rule: decay 2-D+ weights (linears, embeddings), not norms or biases."""
    decay, no_decay = [], []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trim_log(path: Path, last_step: int) -> None:
    """Drop log records after the step a run resumes from: those steps are redone, and logged again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def init_weights_from(model: GPT, path: str) -> None:
    """Fine-tune start: an official LlamaGen .pt (any container) or one of our checkpoint folders/safetensors."""
    source = Path(path)
    if source.is_dir():
        source = source / "model.safetensors"
    load_state_dict_strict(model, load_llamagen_state_dict(source), str(source))


def _raise_on_any_rank(accelerator, problem: str, fallback: str) -> None:
    """A collective check: every process raises ValueError when any one found a problem (none is left waiting)."""
    failed = accelerator.reduce(torch.tensor(float(bool(problem)), device=accelerator.device), reduction="sum")
    if problem:
        raise ValueError(problem)
    if failed.item() > 0:
        raise ValueError(fallback)


def _claim_run_folder(accelerator, config: TrainConfig, stack: contextlib.ExitStack) -> None:
    """The main process locks --out for the run's lifetime, then refuses a folder that holds a run unless
    --resume was given (nothing of an earlier run is overwritten by mistake)."""
    problem = ""
    if accelerator.is_main_process:
        out = Path(config.out)
        try:
            stack.enter_context(folder_lock(out, f"train/run.py --out {out}"))
            if run_holds_a_run(out) and not config.resume:
                problem = (f"--out {out} already holds a run (config.json, log.jsonl or checkpoints/); pass "
                           "--resume auto to continue it, or choose a new --out")
        except FolderLocked as error:
            problem = str(error)
    _raise_on_any_rank(accelerator, problem, f"--out {config.out}: the main process could not claim the folder")


def _check_stream_shards(accelerator, config: TrainConfig) -> None:
    """The stream loader reads shards lazily: validate them against the manifest first, naming a damaged one."""
    problem = ""
    if config.loader == "stream" and accelerator.is_local_main_process:
        try:
            Manifest.load(config.shards).verify()
        except ValueError as error:
            problem = f"--shards {config.shards}: {error}"
    _raise_on_any_rank(accelerator, problem, f"--shards {config.shards}: another node found damaged shards")


@dataclass
class Parts:
    """The trainable and EMA modules and the optimizer, before Accelerate wraps them."""

    student: GPT
    teacher: GPT | None
    projector: Projector | None
    optimizer: torch.optim.Optimizer
    named_optimizer_state: dict | None = None  # a resumed FSDP2 optimizer state, loaded after sharding


def _keyed_by_name(optimizer_state: dict) -> bool:
    """FSDP2 checkpoints key AdamW's state by parameter name; plain ones by parameter index."""
    return any(isinstance(key, str) for key in optimizer_state.get("state", {}))


def build_parts(plan: ResolvedTrainConfig, fused: bool) -> Parts:
    from accelerate.utils import set_seed

    set_seed(plan.settings.seed)
    student = GPT(plan.model)
    if plan.settings.init_from:
        init_weights_from(student, plan.settings.init_from)
    teacher = make_teacher(student) if plan.needs_teacher else None
    projector = Projector(plan.model.dim, plan.projector_hidden) if plan.needs_projector else None
    trainable = [student] + ([projector] if projector is not None else [])
    optimizer = torch.optim.AdamW(parameter_groups(trainable, plan.settings.weight_decay), lr=plan.lr,
                                  betas=tuple(plan.settings.betas), fused=fused)
    return Parts(student, teacher, projector, optimizer)


# ----------------------------------------------------------------------------------------------------------
# Resume


def resume_differences(state: TrainingState, plan: ResolvedTrainConfig) -> list[str]:
    """What differs between a checkpoint and this run that exact resume depends on (empty: it may continue)."""
    meta, config = state.meta, plan.settings
    differences = config_differences(state.model_config, plan.model)
    if meta.get("tokenizer_sha256") != plan.tokenizer_sha256:
        differences.append(f"trained on tokenizer {str(meta.get('tokenizer_sha256'))[:12]}, shards {config.shards} "
                           f"use {plan.tokenizer_sha256[:12]}")
    now = {"star": plan.star is not None, "views_per_image": plan.views_per_image, "seed": config.seed,
           "world_size": plan.world_size, "batch_per_process": plan.batch_per_process,
           "grad_accum": config.grad_accum, "betas": list(config.betas)}
    saved = {**meta, "views_per_image": meta.get("views_per_image", meta.get("views"))}
    saved["betas"] = meta.get("optimizer", {}).get("betas")
    for name, value in now.items():
        if saved.get(name) is not None and saved[name] != value:  # older checkpoints lack some fields
            differences.append(f"{name}: checkpoint {saved[name]!r}, now {value!r}")
    return differences


def _read_resume_state(plan: ResolvedTrainConfig) -> tuple[TrainingState | None, Path | None, list[str]]:
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
    return read_training_state(folder, plan.needs_teacher, plan.needs_projector), folder, []


def resume_into(plan: ResolvedTrainConfig, parts: Parts) -> ResolvedTrainConfig:
    """Load the checkpoint --resume names into `parts` after checking it continues this run exactly; apply the
    optimizer settings that may change (RESUMABLE_CHANGES) and record them. Returns the plan with start_step."""
    if not plan.settings.resume:
        return plan
    state, folder, skipped = _read_resume_state(plan)
    if state is None:  # --resume auto on a folder without checkpoints: a fresh start
        return plan
    differences = resume_differences(state, plan)
    if differences:
        raise ValueError(f"--resume {folder} cannot continue this run exactly:\n  " + "\n  ".join(differences)
                         + f"\nResume with the checkpoint's settings, or start a new --out. (May change on resume: "
                         f"{', '.join(RESUMABLE_CHANGES)}.)")
    parts.student.load_state_dict(state.student)
    if parts.teacher is not None:
        parts.teacher.load_state_dict(state.teacher)
    if parts.projector is not None:
        parts.projector.load_state_dict(state.projector)
    if _keyed_by_name(state.optimizer):  # saved under FSDP2: loaded into the sharded optimizer by _prepare
        parts.named_optimizer_state = state.optimizer
    else:
        parts.optimizer.load_state_dict(state.optimizer)
    config = plan.settings
    for group in parts.optimizer.param_groups:  # the saved groups hold the old values: use this run's
        group["lr"] = plan.lr
        group["weight_decay"] = config.weight_decay if group["weight_decay"] > 0 else 0.0
    saved = state.meta.get("optimizer", {})
    now = {"lr": plan.lr, "weight_decay": config.weight_decay, "grad_clip": config.grad_clip}
    changed = tuple(f"{name}: checkpoint {saved[name]!r}, now {now[name]!r}" for name in RESUMABLE_CHANGES
                    if name in saved and saved[name] != now[name])
    return dataclasses.replace(plan, start_step=int(state.meta["step"]), start_cpu_s=float(state.meta.get("cpu_s", 0.0)),
                               resumed_from=str(folder),
                               changed_on_resume=changed, skipped_on_resume=tuple(skipped))


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """What the loop needs, prepared once by `train` (instead of a long argument list)."""

    plan: ResolvedTrainConfig
    accelerator: Any
    wrapped: nn.Module  # StudentWithProjector, wrapped by Accelerate (DDP/FSDP)
    student: GPT  # the unwrapped student (the teacher's EMA source)
    teacher: GPT | None
    optimizer: Any
    loader: Any
    out: Path
    last_good_checkpoint: str | None = None  # newest checkpoint known to hold finite weights
    guard: NonFiniteGuard | None = None  # device-side NaN/inf flags of the loss terms and gradient norm
    uses_scaler: bool = False  # fp16: GradScaler skips overflowing steps itself (an inf norm is routine there)
    teacher_forward: Any = None  # the teacher's forward (compiled with --compile); the EMA updates `teacher`
    cpu_started: float = 0.0  # process CPU time when this invocation's loop began

    def __post_init__(self) -> None:
        self.guard = NonFiniteGuard(GUARDED, self.accelerator.device)
        if self.teacher_forward is None:
            self.teacher_forward = self.teacher
            if self.teacher is not None and self.plan.settings.compile and not is_sharded(self.teacher):
                self.teacher_forward = torch.compile(self.teacher)
        self.uses_scaler = getattr(self.accelerator, "scaler", None) is not None
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if not inner.defaults.get("fused"):
            raise ValueError("the trainer needs fused AdamW: it skips a non-finite step on the device")


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    if config.tensorboard and not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        raise ValueError("--tensorboard needs the tensorboard package: `.venv/bin/pip install tensorboard` "
                         "(log.jsonl is always written)")
    device = pick_device("auto")
    precision = resolve_precision(config.precision, device)
    accelerator = Accelerator(cpu=device.type != "cuda", mixed_precision="no" if precision == "fp32" else precision,
                              gradient_accumulation_steps=config.grad_accum,
                              log_with="tensorboard" if config.tensorboard else None, project_dir=config.out)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, precision


def _make_loader(plan: ResolvedTrainConfig, accelerator, cache: Path | None):
    config, rank = plan.settings, accelerator.process_index
    if config.loader == "stream":
        return stream_loader(config.shards, plan.views_per_image, plan.batch_per_process,
                             config.seed + plan.start_step, config.view_match, rank, config.num_workers)
    dataset = TokenViews(cache, plan.views_per_image, config.seed, config.view_match)
    sampler = EpochBatchSampler(len(dataset), plan.batch_per_process, rank, plan.world_size, config.seed,
                                start_batch=plan.start_step * config.grad_accum)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers, collate_fn=collate_views,
                      pin_memory=accelerator.device.type == "cuda", persistent_workers=config.num_workers > 0)


def _build_cache(accelerator, config: TrainConfig, manifest: Manifest) -> Path | None:
    """The token cache is built once per node by its first process; the others wait and reuse it."""
    if config.loader != "map":
        return None
    problem = ""
    if accelerator.is_local_main_process:
        try:
            build_token_cache(config.shards, config.cache_dir or None, manifest)
        except (ValueError, FileNotFoundError) as error:
            problem = str(error)
    _raise_on_any_rank(accelerator, problem, f"--shards {config.shards}: the token cache could not be built")
    return build_token_cache(config.shards, config.cache_dir or None, manifest)


def _prepare(plan: ResolvedTrainConfig, parts: Parts, accelerator) -> tuple[nn.Module, GPT, Any]:
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if parts.teacher is not None and fsdp and not accelerator.is_fsdp2:
        raise ValueError("ST-AR under FSDP needs FSDP2 (its EMA teacher is sharded and updated parameter by parameter "
                         "like the student): set fsdp_version: 2 in the Accelerate config (or `accelerate launch "
                         "--fsdp_version 2`), or train ST-AR with DDP")
    student = parts.student
    if plan.settings.compile:
        if accelerator.device.type == "cpu":
            # inductor's own CPU random numbers cost ~20 ns each (dropout masks dominate a small model's step);
            # with the fallback, dropout draws from the same generator as eager mode
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = True
        student = torch.compile(student)
    wrapped, optimizer = accelerator.prepare(StudentWithProjector(student, parts.projector), parts.optimizer)
    if parts.named_optimizer_state is not None:
        _load_named_optimizer_state(wrapped, optimizer, parts.named_optimizer_state)
    core = accelerator.unwrap_model(wrapped).student
    core = getattr(core, "_orig_mod", core)
    if parts.teacher is not None:
        parts.teacher.to(accelerator.device)
        if is_sharded(core):  # FSDP2: the teacher holds the same shards as the student (loaded full by
            # resume_into, sharded here)
            shard_teacher_like(parts.teacher, core, accelerator.state.fsdp_plugin.mixed_precision_policy)
    return wrapped, core, optimizer


def _write_run_record(run: Run) -> None:
    plan, out = run.plan, run.out
    if run.accelerator.is_main_process:
        write_json_atomic(out / RUN_CONFIG, plan.to_json())
        trim_log(out / RUN_LOG, plan.start_step)
        if plan.star is not None:
            print(f"teacher EMA decay {plan.star.teacher_decay:.6g} (--teacher-decay {plan.settings.star_settings.teacher_decay}, "
                  f"{plan.total_steps} steps)", flush=True)
        for change in plan.changed_on_resume:
            print(f"resume: {change} (applied)", flush=True)
    if plan.settings.tensorboard:
        flat = {k: v for k, v in dataclasses.asdict(plan.settings).items() if isinstance(v, (int, float, str, bool))}
        run.accelerator.init_trackers("star", config={**flat, "lr": plan.lr, "total_steps": plan.total_steps})


def train(config: TrainConfig) -> dict:
    """Train one run (see TrainConfig); returns {"steps", "out", "last_checkpoint", "seconds", "rank"}."""
    accelerator, precision = _make_accelerator(config)
    with contextlib.ExitStack() as held:
        _claim_run_folder(accelerator, config, held)
        manifest = Manifest.load(config.shards)
        plan = resolve_config(config, manifest, accelerator.num_processes, precision)
        _check_stream_shards(accelerator, config)
        cache = _build_cache(accelerator, config, manifest)
        parts = build_parts(plan, fused=True)  # fused AdamW runs on CPU too (~5x the foreach step) and can skip
        plan = resume_into(plan, parts)
        wrapped, student, optimizer = _prepare(plan, parts, accelerator)
        run = Run(plan, accelerator, wrapped, student, parts.teacher, optimizer, _make_loader(plan, accelerator, cache),
                  Path(config.out), last_good_checkpoint=plan.resumed_from)
        _write_run_record(run)
        return _train_loop(run)


# ----------------------------------------------------------------------------------------------------------
# One step


def _forward_losses(batch, wrapped, teacher, settings: StarSettings | None, model_config, generator) -> dict:
    """Loss terms of one micro-batch: L_AR, and with ST-AR settings L_MIM, L_step, L_view and their total."""
    tokens = batch.tokens  # [B, M, T]
    B, M, T = tokens.shape
    cls = model_config.cls_token_num
    S = cls + T - 1
    labels = drop_class_labels(batch.labels, model_config.class_dropout_prob, model_config.null_class,
                               generator)  # once per image
    flat_tokens = tokens.reshape(B * M, T)
    flat_labels = labels.repeat_interleave(M)  # [B M]
    star = settings is not None
    bias, layer, positions = None, None, None
    if star and settings.use_mim:
        bias = key_mask(B * M, S, settings.mask_ratio, generator, tokens.device, cls_token_num=cls)  # bool, once
    if star and (settings.use_step or settings.use_view):
        layer = settings.contrastive_layer
        positions = sample_positions(B * M, S, settings.num_positions, generator, tokens.device, cls)  # [B M, K]
    # targets: the chunked head computes the next-token loss without materialising [N, S, V] logits
    output, projected = wrapped(flat_tokens[:, :-1], flat_labels, attn_bias=bias, layer=layer, positions=positions,
                                return_final_hidden=star, targets=flat_tokens)
    terms = {"loss_ar": output.loss}
    if not star:
        zero = terms["loss_ar"].new_zeros(())
        return {**terms, "loss_mim": zero, "loss_step": zero, "loss_view": zero, "loss": terms["loss_ar"]}
    with torch.no_grad():  # the teacher needs hidden states only: no LM head
        teacher_out = teacher(flat_tokens[:, :-1], flat_labels, return_layers=(layer,) if layer else (),
                              return_final_hidden=True, head=False)
    shape = (B, M, S, -1)
    terms.update(star_losses(
        settings, output.final_hidden.reshape(shape),
        projected.reshape(B, M, -1, projected.shape[-1]) if projected is not None else None, positions,
        teacher_out.final_hidden.reshape(shape), teacher_out.hidden[layer].reshape(shape) if layer else None,
        batch.view_match, cls))
    terms["loss"] = total_loss(settings, terms)
    return terms


GUARDED = (*LOSS_TERMS, "loss", "grad_norm")  # what the non-finite guard watches, per optimizer step


def _raise_if_non_finite(run: Run) -> None:
    """Read the device-side guard (one sync + one collective): at log steps and before every checkpoint, so a
    checkpoint is never written after a non-finite step and no step pays a host-device sync."""
    failure = run.guard.first_failure(lambda flags: run.accelerator.reduce(flags, reduction="sum"))
    if failure is None:
        return
    step, bad = failure
    if step is None:
        raise NonFiniteLoss(f"another process saw a non-finite loss or gradient; its steps were not applied. "
                            f"{_last_good(run)}")
    if set(bad) == {"grad_norm"}:
        raise NonFiniteGradient(f"non-finite gradient norm ({bad['grad_norm']}) at step {step} with a finite loss; "
                                f"the step was not applied. {_last_good(run)} Lower --lr or --grad-clip, or check the data.")
    terms = [name for name in bad if name != "grad_norm"]
    raise NonFiniteLoss(f"non-finite loss at step {step}: {', '.join(terms)} = {[bad[t] for t in terms]}; "
                        f"the step was not applied. {_last_good(run)} Lower --lr or check the data.")


def _skip_update_if_non_finite(run: Run, grad_norm: torch.Tensor) -> None:
    """Make the optimizer step a no-op on the device when the gradient norm is NaN/inf (fused AdamW's found_inf,
    the mechanism GradScaler uses): a poisoned step is never applied and nothing waits for the host."""
    if not run.uses_scaler:
        run.optimizer.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()


def _last_good(run: Run) -> str:
    if run.last_good_checkpoint:
        return f"The newest checkpoint, {run.last_good_checkpoint}, was written before this step with finite weights."
    return "No checkpoint of this run was written yet."


def _train_step(run: Run, data, step: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        with accelerator.accumulate(run.wrapped):
            with accelerator.autocast():
                terms = _forward_losses(batch, run.wrapped, run.teacher_forward, plan.star, plan.model, generator)
            sums += torch.stack([terms[name].detach().float() for name in (*LOSS_TERMS, "loss")]) / config.grad_accum
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients:
                # a NaN loss gives a NaN gradient norm too, so this one check also keeps poisoned losses out
                grad_norm = accelerator.clip_grad_norm_(run.wrapped.parameters(), config.grad_clip).detach()
                grad_norm = getattr(grad_norm, "full_tensor", lambda: grad_norm)().float()  # FSDP2: a DTensor
                _skip_update_if_non_finite(run, grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    watched_norm = grad_norm.new_zeros(()) if run.uses_scaler else grad_norm  # fp16 overflow is the scaler's job
    run.guard.record(torch.cat([sums, watched_norm.reshape(1)]), step + 1)
    if run.teacher is not None:
        update_teacher(run.teacher, run.student, plan.star.teacher_decay)
    return sums, grad_norm


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return float("nan")


def _log(run: Run, step: int, sums: torch.Tensor, interval: tuple[int, float, float], grad_norm: torch.Tensor) -> dict:
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
                   "memory_gb": round(_memory_gb(accelerator.device), 3), "time": round(time.time() - started, 2),
                   "cpu_s": round(_cpu_seconds(run), 2)})
    if accelerator.is_main_process:
        with open(run.out / RUN_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if plan.settings.tensorboard:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    return record


def _cpu_seconds(run: Run) -> float:
    """CPU seconds this process spent in the training loop since the run began (earlier invocations included)."""
    return run.plan.start_cpu_s + time.process_time() - run.cpu_started


def _full_optimizer_state(wrapped: nn.Module, optimizer) -> dict:
    """FSDP2: AdamW's state gathered whole (keyed by parameter name), on rank 0's CPU; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_named_optimizer_state(wrapped: nn.Module, optimizer, state: dict) -> None:
    """Load an optimizer state keyed by parameter name (saved under FSDP2) into the prepared optimizer, each
    rank keeping its shards; the param groups' lr / weight decay set by resume_into stay this run's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    settings = [{name: group[name] for name in ("lr", "weight_decay")} for group in inner.param_groups]
    set_optimizer_state_dict(wrapped, inner, state, options=StateDictOptions(full_state_dict=True))
    for group, kept in zip(inner.param_groups, settings):
        group.update(kept)


def _save(run: Run, step: int) -> None:
    """Checkpoint (every process takes part in gathering; the main process writes)."""
    accelerator, plan = run.accelerator, run.plan
    accelerator.wait_for_everyone()
    # Every rank takes part: under FSDP2 the shards are gathered (rank 0 keeps the full tensors, on the CPU).
    fsdp2 = is_sharded(run.wrapped)
    full_state = full_state_dict(run.wrapped) if fsdp2 else accelerator.get_state_dict(run.wrapped)
    teacher = full_state_dict(run.teacher) if run.teacher is not None else None
    optimizer_state = _full_optimizer_state(run.wrapped, run.optimizer) if fsdp2 else run.optimizer.state_dict()
    if accelerator.is_main_process:
        student = {k.removeprefix("student.").removeprefix("_orig_mod."): v for k, v in full_state.items()
                   if k.startswith("student.")}
        projector = {k.removeprefix("projector."): v for k, v in full_state.items() if k.startswith("projector.")}
        config = plan.settings
        meta = {"step": step, "tokenizer_sha256": plan.tokenizer_sha256, "star": plan.star is not None,
                "views_per_image": plan.views_per_image, "seed": config.seed, "world_size": plan.world_size,
                "batch_per_process": plan.batch_per_process, "grad_accum": config.grad_accum,
                "batches_consumed_per_process": step * config.grad_accum, "cpu_s": round(_cpu_seconds(run), 2),
                "optimizer": {"lr": plan.lr, "weight_decay": config.weight_decay, "grad_clip": config.grad_clip,
                              "betas": list(config.betas)}}
        state = TrainingState(plan.model, student, teacher, projector or None, optimizer_state, meta)
        run.last_good_checkpoint = str(save_training_state(run.out, step, state, config.keep_checkpoints,
                                                           keep_steps=config.milestones))
    accelerator.wait_for_everyone()


def _train_loop(run: Run) -> dict:
    plan, accelerator = run.plan, run.accelerator
    config, total_steps = plan.settings, plan.total_steps
    run.wrapped.train()
    bar = tqdm(total=total_steps, initial=plan.start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress and accelerator.is_main_process))
    sums = torch.zeros(len(LOSS_TERMS) + 1, device=accelerator.device)  # [5] summed on the device between logs
    interval_steps, interval_start = 0, time.time()
    step, started = plan.start_step, time.time()
    run.cpu_started = time.process_time()
    data = iter(run.loader)
    milestones = set(config.milestones)
    while step < total_steps:
        step_sums, grad_norm = _train_step(run, data, step)
        sums += step_sums
        step += 1
        interval_steps += 1
        bar.update(1)
        save_now = step % config.ckpt_every == 0 or step in milestones
        log_now = save_now or step % config.log_every == 0 or step == total_steps  # a record at every checkpoint
        if log_now or save_now:
            _raise_if_non_finite(run)  # before any log line or checkpoint
        if log_now:
            record = _log(run, step, sums, (interval_steps, interval_start, started), grad_norm)
            bar.set_postfix(loss=f"{record['loss']:.4f}", ar=f"{record['loss_ar']:.4f}",
                            img_s=f"{record['images_per_s']:.1f}")
            sums.zero_()
            interval_steps, interval_start = 0, time.time()
        if save_now or step == total_steps:
            _save(run, step)
    bar.close()
    if config.tensorboard:
        accelerator.end_training()
    newest = checkpoint_dirs(run.out)
    return {"steps": step, "out": str(run.out), "last_checkpoint": str(newest[-1]) if newest else None,
            "seconds": round(time.time() - started, 2), "rank": accelerator.process_index,
            "teacher_decay": plan.star.teacher_decay if plan.star is not None else None}


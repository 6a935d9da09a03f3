"""Stage two: LlamaGen next-token training plus ST-AR's self-guided losses, on Accelerate.

One code path from one CPU process to many GPU nodes: Accelerate picks DDP (or FSDP) from its launch config.
All per-step randomness (dropout, class dropout, MIM masks, contrastive positions, the data order) is a function
of (seed, rank, step), so `--resume` continues exactly where the checkpoint left off.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from star.data.shards import Manifest
from star.gpt.model import (
    GPT,
    GPTConfig,
    drop_class_labels,
    load_llamagen_state_dict,
    save_gpt_state,
)
from star.io import atomic_path, write_json_atomic
from star.train.data import EpochBatchSampler, TokenViews, build_token_cache, collate_views, stream_loader
from star.train.objectives import (
    NonFiniteGuard,
    Projector,
    StarSettings,
    StudentWithProjector,
    key_mask,
    make_teacher,
    sample_positions,
    star_losses,
    total_loss,
    update_teacher,
)

LOSS_TERMS = ("loss_ar", "loss_mim", "loss_step", "loss_view")


@dataclass
class TrainConfig:
    shards: str
    out: str
    model: str = "GPT-B"
    steps: int = 0  # 0: derive from epochs
    epochs: float = 0.0
    batch_size: int = 256  # global, in images
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-4 per 256 images
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    class_dropout: float = 0.1
    token_dropout: float | None = None  # None: the model config's (LlamaGen: 0.1)
    dropout: float | None = None  # resid and FFN dropout
    seed: int = 0
    star: bool = True
    views: int = 2  # M; 1 with --no-star
    view_match: str = "index"
    star_settings: StarSettings = field(default_factory=StarSettings)
    projector_hidden: int = 0  # 0: min(2048, 4 D)
    ckpt_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 10
    resume: str = ""  # "", "auto" or a checkpoint folder
    init_from: str = ""
    deterministic: bool = False
    compile: bool = False
    workers: int = 4
    loader: str = "map"  # map: memory-mapped cache, exact resume; stream: WebDataset, resampled
    cache_dir: str = ""
    tensorboard: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on GPU, no on CPU
    progress: bool = True


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Checks and set-up


def check_data_against_model(manifest: Manifest, model_config: GPTConfig, shards: str) -> None:
    """Mismatched tokenizer/model settings are errors before any step, naming the value that differs."""
    h, w = manifest.grid
    problems = []
    if manifest.codebook_size > model_config.vocab_size:
        problems.append(f"tokenizer codebook size {manifest.codebook_size} > model vocab_size {model_config.vocab_size}")
    if h * w != model_config.block_size:
        problems.append(f"token grid {h}x{w} = {h * w} tokens != model block_size {model_config.block_size} "
                        f"(image size {manifest.data['image_size']})")
    if manifest.num_classes > model_config.num_classes:
        problems.append(f"shards have {manifest.num_classes} classes > model num_classes {model_config.num_classes}")
    if problems:
        raise ValueError(f"shards {shards} do not fit the model:\n  " + "\n  ".join(problems)
                         + "\nPass a --model JSON with matching vocab_size / block_size / num_classes, or re-tokenize.")


def default_lr(batch_size: int) -> float:
    return 1e-4 * batch_size / 256


def parameter_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """LlamaGen's rule: decay 2-D+ weights (linears, embeddings), not norms or biases."""
    decay, no_decay = [], []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 4099 + rank) % (2**63 - 1)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: folders `step-NNNNNNN/` written as `.step-NNNNNNN.tmp/` and renamed when complete.


def checkpoint_dirs(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoints/step-*") if re.fullmatch(r"step-\d{7}", p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, step: int, model_config: GPTConfig, student_state: dict, teacher: nn.Module | None,
                    projector_state: dict | None, optimizer, meta: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    staging = root / f".step-{step:07d}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_gpt_state(model_config, student_state, staging)  # model.safetensors + config.json, as load_gpt reads
    if teacher is not None:
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, staging / "teacher.safetensors")
    if projector_state:
        save_file({k: v.contiguous().cpu() for k, v in projector_state.items()}, staging / "projector.safetensors")
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    write_json_atomic(staging / "meta.json", meta)  # written last: its presence marks a complete checkpoint
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_into(path: Path, student, teacher, projector, optimizer) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((path / "meta.json").read_text())
    student.load_state_dict(load_file(path / "model.safetensors"))
    if teacher is not None and (path / "teacher.safetensors").is_file():
        teacher.load_state_dict(load_file(path / "teacher.safetensors"))
    if projector is not None and (path / "projector.safetensors").is_file():
        projector.load_state_dict(load_file(path / "projector.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return meta


def resolve_resume(config: TrainConfig, out: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        found = checkpoint_dirs(out)
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint folder (no meta.json)")
    return path


def trim_log(path: Path, last_step: int) -> None:
    """Drop log records after the step a run resumes from: those steps are redone, and logged again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def init_weights_from(model: GPT, path: str) -> None:
    """Fine-tune start: an official LlamaGen .pt (any container) or one of our checkpoint folders/safetensors."""
    from star.gpt.model import load_state_dict_strict

    source = Path(path)
    if source.is_dir():
        source = source / "model.safetensors"
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(source)
    else:
        state = load_llamagen_state_dict(source)
    load_state_dict_strict(model, state, str(source))


# ----------------------------------------------------------------------------------------------------------


def build_model_config(config: TrainConfig, manifest: Manifest) -> GPTConfig:
    overrides = {}
    if config.token_dropout is not None:
        overrides["token_dropout_p"] = config.token_dropout
    if config.dropout is not None:
        overrides["resid_dropout_p"] = config.dropout
        overrides["ffn_dropout_p"] = config.dropout
    return GPTConfig.resolve(config.model, **overrides)


def train(config: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if config.tensorboard and not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        raise ValueError("--tensorboard needs the tensorboard package: `.venv/bin/pip install tensorboard` "
                         "(log.jsonl is always written)")
    use_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    precision = config.mixed_precision if config.mixed_precision != "auto" else ("bf16" if use_cuda else "no")
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=precision, gradient_accumulation_steps=config.grad_accum,
                              log_with="tensorboard" if config.tensorboard else None, project_dir=config.out)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(config.out)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    manifest = Manifest.load(config.shards)
    model_config = build_model_config(config, manifest)
    check_data_against_model(manifest, model_config, config.shards)
    star = config.star and config.star_settings.any
    settings = config.star_settings
    views = config.views if star else 1
    if star and settings.contrastive_layer == 0:
        settings = dataclasses.replace(settings, contrastive_layer=model_config.n_layer // 2)
    if star and not 1 <= settings.contrastive_layer <= model_config.n_layer:
        raise ValueError(f"--contrastive-layer {settings.contrastive_layer} outside 1..{model_config.n_layer}")
    if star and (settings.use_step or settings.use_view) and settings.num_positions > model_config.block_size - 1:
        raise ValueError(f"K={settings.num_positions} contrastive positions exceed {model_config.block_size - 1} tokens")

    per_rank, leftover = divmod(config.batch_size, world * config.grad_accum)
    if per_rank == 0 or leftover:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of processes x grad_accum = "
                         f"{world} x {config.grad_accum}")
    lr = config.lr if config.lr is not None else default_lr(config.batch_size)

    if config.loader not in ("map", "stream"):
        raise ValueError(f"--loader {config.loader!r}: use 'map' (memory-mapped cache) or 'stream' (WebDataset)")
    if config.loader == "map":  # the token cache is built once per node by its first process
        if accelerator.is_local_main_process:
            build_token_cache(config.shards, config.cache_dir or None)
        accelerator.wait_for_everyone()
        dataset = TokenViews(build_token_cache(config.shards, config.cache_dir or None), views, config.seed,
                             config.view_match)
    steps_per_epoch = manifest.data["num_samples"] // config.batch_size
    total_steps = config.steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    if not config.steps and not config.epochs:
        raise ValueError("give --steps or --epochs")

    set_seed(config.seed)
    student = GPT(model_config)
    if config.init_from:
        init_weights_from(student, config.init_from)
    teacher = make_teacher(student) if star and (settings.use_mim or settings.use_step or settings.use_view) else None
    projector = None
    if star and (settings.use_step or settings.use_view):
        projector = Projector(model_config.dim, config.projector_hidden or min(2048, 4 * model_config.dim))
    trainable = [student] + ([projector] if projector is not None else [])
    optimizer = torch.optim.AdamW(parameter_groups(trainable, config.weight_decay), lr=lr, betas=tuple(config.betas),
                                  fused=True)  # fused AdamW runs on CPU too (torch >= 2.4): ~5x the foreach step

    resume_from = resolve_resume(config, out)
    start_step = 0
    if resume_from is not None:
        meta = load_checkpoint_into(resume_from, student, teacher, projector, optimizer)
        if meta["tokenizer_sha256"] != manifest.tokenizer_sha256:
            raise ValueError(f"--resume {resume_from}: trained on tokenizer {meta['tokenizer_sha256'][:12]}, shards "
                             f"{config.shards} use {manifest.tokenizer_sha256[:12]}")
        start_step = int(meta["step"])

    if config.compile:
        student = torch.compile(student)
    from accelerate.utils import DistributedType

    if teacher is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("ST-AR's EMA teacher is updated from the student's full parameters, which FSDP shards: "
                         "train ST-AR with DDP (a multi-GPU Accelerate config without FSDP), or use --no-star under FSDP")
    wrapped, optimizer = accelerator.prepare(StudentWithProjector(student, projector), optimizer)
    if teacher is not None:
        teacher.to(accelerator.device)
    student_core = accelerator.unwrap_model(wrapped).student
    student_core = getattr(student_core, "_orig_mod", student_core)

    if config.loader == "map":
        sampler = EpochBatchSampler(len(dataset), per_rank, rank, world, config.seed,
                                    start_batch=start_step * config.grad_accum)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.workers, collate_fn=collate_views,
                            pin_memory=use_cuda, persistent_workers=config.workers > 0)
    else:
        loader = stream_loader(config.shards, views, per_rank, config.seed + start_step, config.view_match, rank,
                               config.workers)

    resolved = {**asdict(config), "lr": lr, "views": views, "star": star, "star_settings": asdict(settings),
                "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "world_size": world,
                "batch_per_process": per_rank, "mixed_precision": precision, "model_config": model_config.to_dict(),
                "tokenizer_sha256": manifest.tokenizer_sha256, "tokenizer_checkpoint": manifest.data["tokenizer"]["checkpoint"],
                "command": " ".join(sys.argv)}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", resolved)
        (out / "model.json").write_text(json.dumps({"config": model_config.to_dict()}, indent=2))
        trim_log(out / "log.jsonl", start_step)
    if config.tensorboard:
        accelerator.init_trackers("star", config={k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))})

    return _train_loop(config, accelerator, wrapped, student_core, teacher, optimizer, loader, settings, star, views,
                       model_config, start_step, total_steps, lr, manifest, out)


def _forward_losses(batch, wrapped, teacher, settings: StarSettings, star: bool, model_config: GPTConfig,
                    class_dropout: float, generator: torch.Generator) -> dict:
    tokens = batch.tokens  # [B, M, T]
    B, M, T = tokens.shape
    cls = model_config.cls_token_num
    S = cls + T - 1
    labels = drop_class_labels(batch.labels, class_dropout, model_config.null_class, generator)  # once per image
    flat_tokens = tokens.reshape(B * M, T)
    flat_labels = labels.repeat_interleave(M)  # [B M]
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
    if star:
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
    else:
        zero = terms["loss_ar"].new_zeros(())
        terms.update({"loss_mim": zero, "loss_step": zero, "loss_view": zero, "loss": terms["loss_ar"]})
    return terms


def _raise_if_non_finite(guard: NonFiniteGuard, accelerator, last_checkpoint) -> None:
    """Reads the device-side non-finite flags of every process (one sync + one collective): call it at log
    steps and before every checkpoint, on every process."""
    failure = guard.failure(lambda flags: accelerator.reduce(flags, reduction="sum"))
    if failure is not None:
        raise NonFiniteLoss(f"non-finite loss at {failure}. The last good checkpoint ({last_checkpoint or 'none yet'}) "
                            "is intact; lower --lr or check the data.")


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return float("nan")


def _train_loop(config, accelerator, wrapped, student_core, teacher, optimizer, loader, settings, star, views,
                model_config, start_step, total_steps, lr, manifest, out) -> dict:
    rank = accelerator.process_index
    device = accelerator.device
    log_path = out / "log.jsonl"
    wrapped.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress and accelerator.is_main_process))
    sums = {name: 0.0 for name in (*LOSS_TERMS, "loss")}  # names of the logged sums
    loss_sums = torch.zeros(len(sums), device=device)  # [5] accumulated on the device between log steps
    guard = NonFiniteGuard((*LOSS_TERMS, "loss"), device)
    interval_steps, interval_start = 0, time.time()
    tokens_per_image = model_config.block_size * views
    step = start_step
    last_checkpoint = None
    data = iter(loader)
    started = time.time()
    while step < total_steps:
        for _micro in range(config.grad_accum):
            batch = next(data).to(device)
            seed = step_seed(config.seed, step * config.grad_accum + _micro, rank)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator(device=device).manual_seed(seed)
            with accelerator.accumulate(wrapped), accelerator.autocast():
                terms = _forward_losses(batch, wrapped, teacher, settings, star, model_config, config.class_dropout,
                                        generator)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            values = torch.stack([terms[name].detach().float() for name in (*LOSS_TERMS, "loss")])  # [5]
            guard.record(values, step + 1)  # device ops only: no host sync per step
            loss_sums += values / config.grad_accum
        if teacher is not None:
            update_teacher(teacher, student_core, settings.teacher_decay)
        step += 1
        interval_steps += 1
        bar.update(1)
        if step % config.log_every == 0 or step % config.ckpt_every == 0 or step == total_steps:
            _raise_if_non_finite(guard, accelerator, last_checkpoint)  # before any log line or checkpoint
        if step % config.log_every == 0 or step == total_steps:
            elapsed = max(time.time() - interval_start, 1e-9)
            averaged = accelerator.reduce(loss_sums, reduction="mean")
            record = {"step": step, **{n: round(v / interval_steps, 6) for n, v in zip(sums, averaged.tolist())}}
            images_per_second = interval_steps * config.batch_size / elapsed
            record.update({"grad_norm": round(float(grad_norm), 4), "lr": lr,
                           "images_per_s": round(images_per_second, 2),
                           "tokens_per_s": round(images_per_second * tokens_per_image, 1),
                           "memory_gb": round(_memory_gb(device), 3), "time": round(time.time() - started, 2)})
            if accelerator.is_main_process:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}", ar=f"{record['loss_ar']:.4f}",
                                img_s=f"{images_per_second:.1f}")
            if config.tensorboard:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            loss_sums.zero_()
            interval_steps, interval_start = 0, time.time()
        if step % config.ckpt_every == 0 or step == total_steps:
            accelerator.wait_for_everyone()
            full_state = accelerator.get_state_dict(wrapped)  # every rank takes part (FSDP gathers shards)
            if accelerator.is_main_process:
                student_state = {k.removeprefix("student.").removeprefix("_orig_mod."): v
                                 for k, v in full_state.items() if k.startswith("student.")}
                projector_state = {k.removeprefix("projector."): v for k, v in full_state.items()
                                   if k.startswith("projector.")}
                meta = {"step": step, "tokenizer_sha256": manifest.tokenizer_sha256, "model": model_config.to_dict(),
                        "star": star, "views": views, "seed": config.seed, "world_size": accelerator.num_processes,
                        "batches_consumed_per_process": step * config.grad_accum}
                last_checkpoint = save_checkpoint(out, step, model_config, student_state, teacher, projector_state,
                                                  optimizer, meta, config.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()
    if config.tensorboard:
        accelerator.end_training()
    return {"steps": step, "out": str(out), "last_checkpoint": str(checkpoint_dirs(out)[-1]) if checkpoint_dirs(out) else None,
            "seconds": round(time.time() - started, 2), "rank": rank}

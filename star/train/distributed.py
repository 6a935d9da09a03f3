"""Everything that depends on how many processes train and how the model is spread over them: the Accelerator
(DDP, FSDP, multi-node) and its process-group timeout, checks every process agrees on, and FSDP2's sharded EMA
teacher, gathered state dicts and optimizer states."""
from __future__ import annotations

import datetime
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn

from star.runtime import pick_device, resolve_precision


def make_accelerator(config):
    """(Accelerator, precision) for a TrainConfig: mixed precision from --precision, the process group's timeout
    from --dist-timeout, the --log-with trackers, deterministic kernels or TF32."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    trackers = config.trackers
    check_tracker_packages(trackers)
    if trackers and config.out:
        keep_trackers_local(Path(config.out))
    device = pick_device("auto")
    precision = resolve_precision(config.precision, device)
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=config.dist_timeout))
    accelerator = Accelerator(cpu=device.type != "cuda", mixed_precision="no" if precision == "fp32" else precision,
                              gradient_accumulation_steps=config.grad_accum, kwargs_handlers=[timeout],
                              log_with=list(trackers) or None, project_dir=config.out or None)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, precision


# the modules whose presence makes each tracker usable (Accelerate's own test; tensorboardX also serves tensorboard)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "aim": ("aim",)}


def check_tracker_packages(trackers: tuple[str, ...]) -> None:
    """One line naming the pip command for the first tracker whose package is not installed."""
    for name in trackers:
        if not any(importlib.util.find_spec(module) for module in TRACKER_MODULES[name]):
            flag = "--tensorboard" if name == "tensorboard" else f"--log-with {name}"
            raise ValueError(f"{flag} needs the {name} package: `.venv/bin/pip install {name}` (log.jsonl is always "
                             "written)")


def keep_trackers_local(out: Path) -> None:
    """Trackers write into the run folder and need no network, unless the user's environment says otherwise:
    wandb offline (`wandb sync` uploads later), mlflow's file store; tensorboard and aim are local already."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(out))
    os.environ.setdefault("MLFLOW_TRACKING_URI", (out / "mlruns").resolve().as_uri())


def raise_on_any_rank(accelerator, problem: str, fallback: str) -> None:
    """A collective check: every process raises ValueError when any one found a problem (none is left waiting)."""
    failed = accelerator.reduce(torch.tensor(float(bool(problem)), device=accelerator.device), reduction="sum")
    if problem:
        raise ValueError(problem)
    if failed.item() > 0:
        raise ValueError(fallback)


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 sharded this module (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def shard_teacher_like(teacher: nn.Module, student: nn.Module, mp_policy=None) -> nn.Module:
    """FSDP2: shard the teacher as the student is sharded, in place. `fully_shard` splits every parameter on dim 0
    over the mesh, so with the student's mesh rank r holds the same rows of each teacher parameter as of the
    student's, and `update_teacher` works shard by shard without a gather. The teacher's FSDP units mirror the
    student's (each sharded submodule, by name, then the root); they decide when a forward gathers parameters,
    not which rows a rank holds. mp_policy: the student's MixedPrecisionPolicy (same compute dtype)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    meshes = {parameter.device_mesh for parameter in student.parameters() if isinstance(parameter, DTensor)}
    if len(meshes) != 1:
        raise ValueError(f"shard_teacher_like: the student's parameters must be FSDP2-sharded over one mesh, "
                         f"found {len(meshes)} meshes")
    options = {"mesh": meshes.pop(), "mp_policy": mp_policy or MixedPrecisionPolicy()}
    # reshard_after_forward everywhere, the root included: the teacher has no backward to reshard it, and a unit
    # left gathered holds plain full parameters (more memory, and no shards for update_teacher).
    options = {**options, "reshard_after_forward": True}
    units = [name for name, module in student.named_modules() if name and isinstance(module, FSDPModule)]
    for name in reversed(units):  # children before their parents, as fully_shard requires
        fully_shard(teacher.get_submodule(name), **options)
    fully_shard(teacher, **options)  # the root holds what no unit took (embeddings, final norm, head)
    return teacher


def local_shards(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's and the student's parameters as local tensors (a DTensor's own shard: no communication),
    after checking that both hold the same parameters, sharded the same way."""
    from torch.distributed.tensor import DTensor

    teacher_named, student_named = list(teacher.named_parameters()), list(student.named_parameters())
    if [name for name, _ in teacher_named] != [name for name, _ in student_named]:
        raise ValueError("update_teacher: the teacher and the student hold different parameters")
    teacher_local, student_local = [], []
    for (name, t), (_, s) in zip(teacher_named, student_named):
        if isinstance(t, DTensor) != isinstance(s, DTensor) or (isinstance(t, DTensor) and (
                t.placements != s.placements or t.device_mesh != s.device_mesh or t.shape != s.shape)):
            raise ValueError(f"update_teacher: {name} is sharded differently in the teacher and the student; "
                             "shard the teacher with shard_teacher_like")
        teacher_local.append(t.to_local() if isinstance(t, DTensor) else t)
        student_local.append(s.detach().to_local() if isinstance(s, DTensor) else s.detach())
    return teacher_local, student_local


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's full state dict on the CPU, for safetensors loadable without FSDP. Sharded (FSDP2): a
    collective, every rank must call it; the shards are gathered one tensor at a time and only rank 0 keeps them
    (the other ranks get {}). Unsharded: the plain state dict."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def keyed_by_name(optimizer_state: dict) -> bool:
    """FSDP2 checkpoints key AdamW's state by parameter name; plain ones by parameter index."""
    return any(isinstance(key, str) for key in optimizer_state.get("state", {}))


def full_optimizer_state(wrapped: nn.Module, optimizer) -> dict:
    """FSDP2: AdamW's state gathered whole (keyed by parameter name), on rank 0's CPU; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_named_optimizer_state(wrapped: nn.Module, optimizer, state: dict) -> None:
    """Load an optimizer state keyed by parameter name (saved under FSDP2) into the prepared optimizer, each
    rank keeping its shards; the param groups' lr / weight decay set by resume_into stay this run's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    settings = [{name: group[name] for name in ("lr", "weight_decay")} for group in inner.param_groups]
    set_optimizer_state_dict(wrapped, inner, state, options=StateDictOptions(full_state_dict=True))
    for group, kept in zip(inner.param_groups, settings):
        group.update(kept)

"""Everything that depends on how many processes train and how the model is spread over them: the Accelerator
(DDP, FSDP, multi-node) and its process-group timeout, checks every process agrees on, and FSDP2's sharded EMA
teacher, gathered state dicts and optimizer states."""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn as nn

from star.errors import ReportedElsewhere
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
                              kwargs_handlers=[timeout], log_with=list(trackers) or None,
                              project_dir=config.out or None)
    # the trainer accumulates itself (loop.train_step): Accelerate must not divide the loss again, whatever the
    # launch config says
    accelerator.gradient_accumulation_steps = 1
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, precision


def lowest_failing_rank(accelerator, failed: bool) -> int | None:
    """A collective: the lowest rank of the processes where `failed` is true (None when none failed)."""
    flags = torch.zeros(accelerator.num_processes, device=accelerator.device)  # [processes] one per rank
    flags[accelerator.process_index] = float(failed)
    failing = accelerator.reduce(flags, reduction="sum").nonzero()
    return int(failing[0]) if len(failing) else None


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
    """A collective check: every process raises when any one found a problem (none is left waiting). The lowest
    rank that found it raises ValueError(problem), the one line the launch prints; the others raise
    ReportedElsewhere(fallback), which the command exits on without a line."""
    reporter = lowest_failing_rank(accelerator, bool(problem))
    if reporter == accelerator.process_index:
        raise ValueError(problem)
    if reporter is not None:
        raise ReportedElsewhere(fallback)


@contextlib.contextmanager
def agreed(accelerator, what: str) -> Iterator[None]:
    """Run a block every process runs alike (loading the data's manifest, making the plan, resuming) and
    agree on its user errors (a collective at the block's end): a ValueError / FileNotFoundError on any process
    is raised on every process, as itself on the lowest failing rank and as ReportedElsewhere on the others."""
    error: Exception | None = None
    try:
        yield
    except (ValueError, FileNotFoundError) as raised:
        error = raised
    reporter = lowest_failing_rank(accelerator, error is not None)
    if reporter == accelerator.process_index:
        raise error
    if reporter is not None:
        raise ReportedElsewhere(f"{what}: process {reporter} found a problem")


SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def one_process_warning(num_processes: int, environ: Mapping[str, str]) -> str | None:
    """A line when the launch asked for several processes but this is the only one (None otherwise).
    Detectable: a launcher's world size above 1 that Accelerate did not join, or `accelerate launch` with
    --num_processes > 1 (or --num_machines > 1) without --multi_gpu, whose plain launcher runs one process (on a
    CPU it does so silently) but still sets MASTER_ADDR / MASTER_PORT; a one-process launch sets neither."""
    if num_processes > 1:
        return None
    sizes = [int(environ[name]) for name in SIZE_VARIABLES if environ.get(name, "").strip().isdigit()]
    if sizes and max(sizes) > 1:
        return (f"warning: the launcher's world size is {max(sizes)} but this process trains alone (world size 1): "
                "check that every process sees the same MASTER_ADDR / MASTER_PORT")
    by_accelerate = "ACCELERATE_MIXED_PRECISION" in environ and "MASTER_PORT" in environ
    if by_accelerate and not sizes:
        return ("warning: accelerate launch was asked for several processes but started one (world size 1): "
                "without --multi_gpu its launcher runs a single process; add --multi_gpu (it starts every process, "
                "on CPUs too)")
    return None


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
    """Whether AdamW's state is keyed by parameter name (what the trainer saves) rather than by index."""
    return any(isinstance(key, str) for key in optimizer_state.get("state", {}))


def optimizer_state_by_name(optimizer_state: dict, names: list[list[str]]) -> dict:
    """An optimizer state keyed by parameter index (torch's `Optimizer.state_dict()`, as older DDP checkpoints
    hold it) keyed by parameter name instead: `names[g]` names the parameters of param group g in order, the
    order the optimizer was built in. A state already keyed by name is returned as it is."""
    if keyed_by_name(optimizer_state):
        return optimizer_state
    groups = optimizer_state["param_groups"]
    if [len(group["params"]) for group in groups] != [len(group) for group in names]:
        raise ValueError(f"the optimizer state holds param groups of {[len(g['params']) for g in groups]} parameters, "
                         f"this run's optimizer {[len(group) for group in names]}")
    name_of = {index: name for group, group_names in zip(groups, names)
               for index, name in zip(group["params"], group_names)}
    return {"state": {name_of[index]: value for index, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [name_of[index] for index in group["params"]]} for group in groups]}


def full_optimizer_state(wrapped: nn.Module, optimizer) -> dict:
    """AdamW's state whole and keyed by parameter name, on rank 0's CPU, under any engine (plain, DDP, FSDP2's
    shards gathered): a collective. Keyed by name, it loads into any launch (`load_optimizer_state`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(wrapped: nn.Module, optimizer, state: dict, strict: bool = True) -> None:
    """Load a whole optimizer state keyed by parameter name into the prepared optimizer of any engine and world
    size (under FSDP2 each rank keeps its own rows of every tensor). The param groups keep this run's lr and
    weight decay (a resumed run may change them). strict=False: parameters the state lacks start fresh (a
    fine-tune's new projector)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    settings = [{name: group[name] for name in ("lr", "weight_decay")} for group in inner.param_groups]
    set_optimizer_state_dict(wrapped, inner, state, options=StateDictOptions(full_state_dict=True,
                                                                                  strict=strict))
    for group, kept in zip(inner.param_groups, settings):
        group.update(kept)

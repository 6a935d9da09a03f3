"""One place for run-time choices every stage makes: the device, "auto" precision, and seed mixing."""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch

from star.settings import check_device

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def cpu_description() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (Linux); elsewhere the platform's name and no
    flags. Benchmarks and reports name the hardware with it; the study checks for AMX with it."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's entry of each field
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    return name, set(fields.get("flags", "").split())


def cpu_forced() -> bool:
    """Accelerate's `--cpu` / ACCELERATE_USE_CPU=true: stay on the CPU even when a GPU is present."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def pick_device(name: str = "auto") -> torch.device:
    """'auto': CUDA when available (and not forced off), else CPU. A named CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not cpu_forced() else "cpu")
    check_device(name, "device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' means bf16 on CUDA and fp32 elsewhere; an explicit choice is kept. Returns fp32 | bf16 | fp16."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision {requested!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for a resolved precision (None: run in fp32)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def indexed_seed(seed: int, index: int) -> int:
    """The seed of item `index` of a run seeded by `seed` (an epoch's data order, a sampling batch, a rank's stream):
    every integer seed the project derives goes through here, so two runs with different seeds share no item's seed
    by accident. numpy generators take the tuple itself instead (`np.random.default_rng([seed, epoch, index])`:
    numpy's SeedSequence hashes it)."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one micro-batch's dropout on one rank (dropout masks are drawn per process, over its own rows):
    a function of (seed, micro-batch count, rank), so resume is exact."""
    return indexed_seed(seed, step * 4099 + rank)


def batch_draw_seed(seed: int, step: int) -> int:
    """The seed of one optimizer step's draws over its whole global batch (class dropout, MIM masks, contrastive
    positions): the same on every process and for every accumulation split, so neither changes the method. It is
    rank 0's `step_seed`, so one process without accumulation draws what it always drew."""
    return step_seed(seed, step, 0)


def key_seed(key: str, seed: int) -> int:
    """A 64-bit seed for one named item (an image's key), stable across runs, processes and machines."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def peak_memory_gb(device) -> float:
    """Peak memory so far: the device's on CUDA, the process's resident set elsewhere (GB)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return float("nan")

"""Run safety: what keeps a run from writing bad weights, from being lost to a signal, and from writing into a
folder that is not its own.

- Non-finite steps: the loss terms and the gradient norm are watched on the device (`NonFiniteGuard`), read at
  log steps and before every checkpoint, so no checkpoint follows a poisoned step.
- Signals: SIGTERM and SIGINT ask the loop to stop at the next step boundary, write a checkpoint, release the
  folder and exit with one line from the main process (star/signals.py, shared with the VQ trainer).
- The run folder: locked for the run's lifetime (a lease, taken over once stale), refused when it holds another
  run without --resume, or when it is a file, a shard folder or an image folder (star/data/out_folder.py's
  `foreign_output`, shared with the VQ trainer).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from star.checkpoint_folder import run_holds_a_run
from star.data.out_folder import foreign_output
from star.lock import FolderLocked, folder_lock
from star.train.distributed import raise_on_any_rank


class NonFiniteLoss(RuntimeError):
    """A step's loss is NaN/inf: the run stops before the step is applied. `quiet`: another process reports it
    (the command exits without a line)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class NonFiniteGradient(NonFiniteLoss):
    """A step's loss is finite but its gradient norm is not: the run stops before the optimizer applies it."""


class NonFiniteGuard:
    """Watches the loss terms for NaN/inf without a host-device sync per step.

    `record` runs every step and only queues device ops (a running flag per term, the first bad step and its
    values); `first_failure` reads the flags (one sync, plus one collective when `reduce_sum` is given) and is called
    at log steps and before every checkpoint, so a checkpoint is never written after a non-finite loss.
    """

    def __init__(self, names: tuple[str, ...], device):
        self.names = names
        self.bad = torch.zeros(len(names), dtype=torch.bool, device=device)  # [terms] ever non-finite
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)  # step of the first bad value
        self.first_values = torch.zeros(len(names), device=device)  # [terms] values at that step

    def record(self, values: torch.Tensor, step: int) -> None:
        """values: [terms] float32 loss values of `step` (1-based), in the order of `names`."""
        bad_now = ~torch.isfinite(values)  # [terms]
        first = bad_now.any() & (self.first_step < 0)
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.first_values = torch.where(first, values, self.first_values)
        self.bad |= bad_now

    def first_failure(self, reduce_sum=None) -> tuple[int | None, dict[str, float]] | None:
        """None while every value so far was finite (on every process when `reduce_sum` sums a tensor across
        processes); else (first bad step seen here, {bad term: its value}), or (None, {}) when only another
        process saw one."""
        flags = self.bad.float()
        if reduce_sum is not None:
            flags = reduce_sum(flags)  # collective: every process calls this at the same steps
        if not bool((flags > 0).any()):
            return None
        if not bool(self.bad.any()):
            return None, {}
        values = dict(zip(self.names, self.first_values.tolist()))
        return int(self.first_step), {name: value for name, value in values.items() if not math.isfinite(value)}


def claim_run_folder(accelerator, config, stack: contextlib.ExitStack) -> None:
    """The main process locks --out for the run's lifetime, then refuses a folder that holds a run unless
    --resume was given, and any folder that is not a run folder (nothing of an earlier run, or of the data, is
    overwritten by mistake)."""
    problem = ""
    if accelerator.is_main_process:
        out = Path(config.out)
        problem = foreign_output(out) or ""
        if not problem:
            try:
                stack.enter_context(folder_lock(out, f"train/run.py --out {out}", break_lock=config.break_lock))
                if run_holds_a_run(out) and not config.resume:
                    problem = (f"--out {out} already holds a run (config.json, log.jsonl or checkpoints/); pass "
                               "--resume auto to continue it, or choose a new --out")
            except (FolderLocked, ValueError) as error:
                problem = str(error)
    raise_on_any_rank(accelerator, problem, f"--out {config.out}: the main process could not claim the folder")

"""Stopping a training run cleanly on a signal, for both trainers (the GPT's star/train/loop.py and the VQ's
star/vq/train.py): SIGTERM (what schedulers send before preemption) and SIGINT ask the loop to stop at the next step
boundary; the loop writes a checkpoint and raises `StopRequested`, which the command turns into one line and the
signal's exit code."""
from __future__ import annotations

import signal

import torch


class StopRequested(RuntimeError):
    """SIGTERM or SIGINT arrived: the run stopped at a step boundary after writing a checkpoint. `quiet`: a
    process other than the main one, which leaves the one line to the main process."""

    def __init__(self, message: str, exit_code: int, quiet: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.quiet = quiet


class SignalStop:
    """Turns SIGTERM / SIGINT into a request the loop reads between steps (a second SIGINT interrupts at once)."""

    SIGNALS = {signal.SIGTERM: ("SIGTERM", 143), signal.SIGINT: ("SIGINT", 130)}

    def __init__(self):
        self.received: tuple[str, int] | None = None
        self._previous: dict = {}

    def _handle(self, number, frame) -> None:
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.SIGNALS[number]

    def __enter__(self) -> "SignalStop":
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def requested(self, accelerator, every_process: bool) -> bool:
        """Whether to stop now. With several processes the flag is agreed by a collective (every process calls
        this at the same steps), so they all stop at the same boundary and take part in the checkpoint."""
        if not every_process:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

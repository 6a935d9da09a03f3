"""`evaluate/run.py plot RUN...`: the training curves of one or more runs from their log.jsonl (loss terms, grad
norm, images/s) against the optimizer step and against compute (the trainer's CPU seconds), the runs overlaid and
named in a legend."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from star.checkpoint_folder import RUN_LOG
from star.io import check_output_file, is_star_png
from star.settings import check, setting

# "compute": the trainer's training-loop CPU seconds, cumulative over resumed invocations (a record's wall "time"
# restarts at every launch, so it cannot be summed reliably)
COMPUTE_KEY = "cpu_s"
COMPUTE_LABEL = "training-loop CPU seconds (process time, resumes included)"
LOSS_KEYS = ("loss", "loss_ar", "loss_mim", "loss_step", "loss_view")
OTHER_KEYS = ("grad_norm", "images_per_s")


@dataclass
class PlotConfig:
    """Settings of `evaluate/run.py plot RUN...`."""

    runs: tuple[str, ...] = setting((), cli=False, help="training run folders, each with its log.jsonl")
    out: str = setting("", help="PNG to write (default: RUN/curves.png for one run; needed for several)")
    overwrite: bool = setting(False, help="replace --out even if it is not a PNG this tool wrote")

    def __post_init__(self) -> None:
        self.runs = tuple(str(run) for run in self.runs)
        check(bool(self.runs), "give one or more training run folders: evaluate/run.py plot RUN [RUN ...]")
        check(bool(self.out) or len(self.runs) == 1,
              f"--out is needed with {len(self.runs)} runs (one run's curves default to RUN/curves.png)")

    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.runs[0]) / "curves.png"


def _parse_lines(path: Path) -> list[dict]:
    """The records of a log.jsonl; a damaged line is an error naming it, except a cut-off last line (a run
    killed while appending), which is left out with a warning."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                warnings.warn(f"{path}: line {number} is cut off (a run stopped while writing it); left out",
                              stacklevel=3)
                continue
            raise ValueError(f"{path}: line {number} is not JSON; the log is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {number} is not a training record (no integer 'step')")
        records.append(record)
    return records


def read_run_log(run: str | Path) -> list[dict]:
    """A run's log records, one per step in step order. A resumed run appends to the same log; a step logged
    twice (resumed from an earlier checkpoint) keeps its latest record."""
    path = Path(run) / RUN_LOG
    if not Path(run).is_dir():
        raise FileNotFoundError(f"run folder {run} not found")
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no {RUN_LOG}: give a training run folder (train/run.py --out), whose "
                                "log.jsonl gets a record every --log-every steps")
    records = _parse_lines(path)
    if not records:
        raise ValueError(f"{path} holds no records yet: the run logs every --log-every steps")
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def run_labels(runs: tuple[str, ...]) -> list[str]:
    """Each run's folder name, or the path as given where two runs share a folder name."""
    names = [Path(run).name or str(run) for run in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs)]


def shown_keys(logs: dict[str, list[dict]]) -> list[str]:
    """The panels: every loss term some run logged with a non-zero value (a baseline logs ST-AR's as 0), then
    the gradient norm and the throughput."""
    def logged(key: str) -> bool:
        return any(isinstance(r.get(key), (int, float)) and r[key] != 0 and not math.isnan(r[key])
                   for records in logs.values() for r in records)

    return [key for key in LOSS_KEYS if logged(key)] + [key for key in OTHER_KEYS if logged(key)]


def run_plot(config: PlotConfig) -> dict:
    """Read every run's log (all checked before drawing), then write one PNG of panels."""
    from star.plots import plot_training_curves

    out = check_output_file(config.out_path(), "--out", "PNG", is_star_png, overwrite=config.overwrite)
    logs = {label: read_run_log(run) for label, run in zip(run_labels(config.runs), config.runs)}
    keys = shown_keys(logs)
    plot_training_curves(logs, keys, out, COMPUTE_KEY, COMPUTE_LABEL)
    return {"written": str(out), "panels": keys,
            "runs": {label: {"records": len(records), "last_step": records[-1]["step"]}
                     for label, records in logs.items()}}


def format_plot(result: dict) -> str:
    runs = "; ".join(f"{label}: {row['records']} records to step {row['last_step']}"
                     for label, row in result["runs"].items())
    return f"{runs}\npanels: {', '.join(result['panels'])}\nwritten: {result['written']}"

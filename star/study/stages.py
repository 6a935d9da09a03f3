"""The study's plan and how its stages run: each stage is one of the project's commands, run as a subprocess
with its output in OUT/logs, skipped when its marker in OUT/stages exists (a rerun resumes where the last one
stopped), refused when its settings changed, and timed (wall and CPU seconds, the child's own)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from star.io import write_json_atomic
from star.study.arms import Arm


@dataclass
class StudyPlan:
    out: Path
    data: Path  # ImageFolder root with train/ and test/
    vq_steps: int
    vq_batch_size: int
    gpt: dict  # LlamaGen ModelArgs fields (vocab_size is filled from the VQ)
    steps: int  # optimizer steps of every equal-epoch arm
    batch_size: int
    lr: float
    num_samples: int  # per FID evaluation
    cfg_scale: float
    probe_positions: list[int]
    probe_limit: int  # per split; >= the test split so every test image is probed
    main_seeds: list[int]
    other_seeds: list[int]
    third_seed_if_close: bool = True
    codebook_size: int = 512
    arms: list[Arm] = field(default_factory=list)
    preset: str = "full"
    fid_precision: str = "fp32"  # Inception's: bf16 where the CPU has AMX (2.4x); FIDs compare only within a study
    train_flags: list[str] = field(default_factory=list)  # train/run.py flags every arm shares (the fast step)
    jobs: int = 1  # runs (and their evaluations) side by side, each on cores // jobs threads
    milestones: list[float] = field(default_factory=list)  # long preset: fractions of a run checkpointed and scored
    short_steps: int = 0  # long preset: the length of the short arms
    curve_samples: int = 0  # long preset: samples per FID at every checkpoint (the curves); the last also gets
    # num_samples
    extra_seed_for_best: bool = True  # long preset: the best candidate ST-AR arm gets one more seed
    vq_flags: list[str] = field(default_factory=list)  # tokenize/train_vq.py flags beyond the shared ones
    # round3: the baseline is also checkpointed, and scored with num_samples, where each other arm's last checkpoint
    # falls at equal steps and at equal compute (predicted from the arms' step_cost)
    equal_compute_checkpoints: bool = False

    @property
    def threads_per_job(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.jobs)

    @property
    def model_json(self) -> Path:
        return self.out / "gpt_config.json"


class StageFailed(RuntimeError):
    pass


def stage_settings(argv: list[str], out: Path) -> list[str]:
    """What a stage's argv says beyond where Python, the checkout and the study folder live (a moved checkout or
    study folder is no change)."""
    return [Path(argv[1]).parent.name + "/" + Path(argv[1]).name, *(arg.replace(str(out), "OUT") for arg in argv[2:])]


def run_stage(plan: StudyPlan, name: str, argv: list[str], done: list[Path] | None = None,
              side_by_side: bool = True) -> dict:
    """Run one command unless its marker (and `done` outputs) exist; record seconds. Returns the marker.
    side_by_side: the stage may run beside others (plan.jobs > 1), so it gets cores // jobs threads; the shared
    stages, which run alone, get every core."""
    marker = plan.out / "stages" / f"{name}.json"
    recorded = json.loads(marker.read_text()) if marker.is_file() else None
    if recorded and stage_settings(recorded["argv"], Path(recorded.get("out", plan.out))) != stage_settings(argv, plan.out):
        # a changed setting would retrain or overwrite on top of finished work: refuse, name the way out
        raise StageFailed(f"stage {name} in {plan.out} was run with other settings ({marker}); use a new --out, "
                          f"or delete {marker} and that stage's outputs to redo it")
    if marker.is_file() and all(p.exists() for p in done or []):
        print(f"  [skip] {name} (done in {json.loads(marker.read_text())['seconds']:.0f} s)", flush=True)
        return json.loads(marker.read_text())
    log = plan.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  [run ] {name}: {' '.join(argv[1:3])} ... (log: {log})", flush=True)
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads_per_job)} if plan.jobs > 1 and side_by_side else None
    with open(log, "w") as handle:
        handle.write(" ".join(argv) + "\n\n")
        handle.flush()
        # in the caller's folder: a relative --out or --data-root then names the same place for the study and for
        # the commands it runs (the commands are found by absolute path)
        child = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
        code, cpu_seconds = wait_with_cpu_seconds(child)
    seconds = time.time() - started
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise StageFailed(f"stage {name} failed (exit {code}); see {log}:\n    " + "\n    ".join(tail))
    # CPU seconds as well as wall: on a machine shared with other jobs, CPU time is what predicts an idle run
    record = {"name": name, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "argv": argv,
              "out": str(plan.out)}
    write_json_atomic(marker, record)
    print(f"  [done] {name} in {seconds:.0f} s", flush=True)
    return record


def wait_with_cpu_seconds(child: subprocess.Popen) -> tuple[int, float]:
    """(exit code, CPU seconds of the child and its own children): this child's alone, even while other stages
    run beside it (wait4 reports one child's usage; RUSAGE_CHILDREN would mix every finished child's)."""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_utime + usage.ru_stime


def timed_inline(plan: StudyPlan, name: str, fn, done: list[Path]) -> dict:
    """The same bookkeeping for the one in-process step (decoding the test tokens for the VQ ceiling)."""
    marker = plan.out / "stages" / f"{name}.json"
    if marker.is_file() and all(p.exists() for p in done):
        return json.loads(marker.read_text())
    started, cpu_before = time.time(), time.process_time()
    fn()
    record = {"name": name, "seconds": round(time.time() - started, 2),
              "cpu_seconds": round(time.process_time() - cpu_before, 2)}
    write_json_atomic(marker, record)
    return record


def write_plan_record(plan: StudyPlan) -> None:
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items() if k != "arms"}
    write_json_atomic(plan.out / "plan.json", record | {"arms": [a.key for a in plan.arms]})


def stage_times(plan: StudyPlan) -> dict:
    """{stage: (wall seconds, CPU seconds)} of every finished stage."""
    records = [json.loads(p.read_text()) for p in sorted((plan.out / "stages").glob("*.json"))]
    return {r["name"]: (r["seconds"], r.get("cpu_seconds")) for r in records}

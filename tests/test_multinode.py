"""docs/cluster.md's multi-node launch, rehearsed: its `srun ... bash -c '...'` line run as two "nodes" on
loopback (one CPU process each, sharing one disk), through the token-cache build, SIGTERM on every process,
a resume and a refusal; and what a launch prints: one line per event, from the main process."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CPU_ENV

from star.cli import launch_rank
from star.data.manifest import Manifest
from star.errors import ReportedElsewhere
from star.lock import folder_lock
from star.train import token_cache
from star.train.distributed import one_process_warning
from star.train.loop import TrainConfig, train
from star.train.star_settings import StarSettings

REPO = Path(__file__).resolve().parents[1]
BUILD_HOOK = """
import os, time
import star.train.token_cache as cache
_fill_all = cache._fill_all
def counted_fill_all(*args, **kwargs):
    with open({builds!r}, "a") as handle:
        handle.write(f"{{os.getpid()}}\\n")
    time.sleep(4)  # a build long enough that both nodes start while it runs
    return _fill_all(*args, **kwargs)
cache._fill_all = counted_fill_all
"""


def documented_launch() -> str:
    """The per-node command of docs/cluster.md's job script (what srun runs on every node)."""
    found = re.findall(r"^srun [^\n]*bash -c '([^'\n]+)'$", (REPO / "docs" / "cluster.md").read_text(), re.M)
    assert len(found) == 1, "docs/cluster.md holds one `srun ... bash -c '...'` line"
    return found[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TwoNodes:
    """Two "nodes" of the documented launch on this machine: SLURM's variables faked, one process per node."""

    def __init__(self, tmp_path: Path, shards: Path, out: Path, model: Path):
        hooks = tmp_path / "hooks"
        hooks.mkdir(exist_ok=True)
        self.builds = tmp_path / "builds.txt"
        (hooks / "sitecustomize.py").write_text(textwrap.dedent(BUILD_HOOK.format(builds=str(self.builds))))
        self.env = {**os.environ, **CPU_ENV, "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "SLURM_NNODES": "2", "GPUS_PER_NODE": "1", "MAIN_HOST": "127.0.0.1", "SHARDS": str(shards),
                    "RUN": str(out)}
        self.common = (f"--model {model} --batch-size 8 --num-workers 0 --no-star --no-progress --log-every 1 "
                       "--dist-timeout 2")

    def start(self, train_args: str) -> list[subprocess.Popen]:
        port, self.last = free_port(), []
        for node in (0, 1):
            env = {**self.env, "SLURM_NODEID": str(node), "MAIN_PORT": str(port),
                   "TRAIN_ARGS": f"{self.common} {train_args}"}
            self.last.append(subprocess.Popen(["bash", "-c", documented_launch()], cwd=REPO, env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
        return self.last

    def run(self, train_args: str) -> list[tuple[int, str, str]]:
        outputs = [node.communicate(timeout=600) for node in self.start(train_args)]  # (stdout, stderr) each
        return [(node.returncode, *output) for node, output in zip(self.last, outputs)]

    def build_count(self) -> int:
        return len(self.builds.read_text().splitlines()) if self.builds.is_file() else 0


def our_lines(text: str) -> list[str]:
    """The trainer's own lines (its messages start with these), not the launcher's warnings and tracebacks."""
    starts = ("error:", "warning:", "stopped by", "trained ", "resumed from", "resume:", "teacher EMA", "log:")
    return [line for line in text.splitlines() if line.startswith(starts)]


def test_two_nodes_on_one_disk_build_the_cache_once_stop_on_sigterm_resume_and_print_once(
        tiny_shards, tiny_gpt_json, tmp_path):
    out, shards = tmp_path / "run", tmp_path / "shards"
    # a copy without the token cache that other tests of the session may have built beside the shared shards
    shutil.copytree(tiny_shards, shards, ignore=shutil.ignore_patterns("cache"))
    nodes = TwoNodes(tmp_path, shards, out, tiny_gpt_json)
    cluster = nodes.start("--steps 100000 --ckpt-every 100000")
    deadline = time.time() + 400
    while not (out / "log.jsonl").is_file() or len((out / "log.jsonl").read_text().splitlines()) < 3:
        assert all(node.poll() is None for node in cluster) and time.time() < deadline, \
            [node.communicate()[1][-3000:] for node in cluster]
        time.sleep(0.2)
    for node in cluster:  # the job's time limit: SLURM signals every process of the job step
        os.killpg(node.pid, signal.SIGTERM)
    (out0, err0), (out1, err1) = [node.communicate(timeout=300) for node in cluster]
    assert nodes.build_count() == 1, "the cache on the shared disk is built once, not once per node"
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    stops = [line for line in our_lines(out0 + err0) if line.startswith("stopped by")]
    assert len(stops) == 1 and "stopped by SIGTERM after step" in stops[0], err0[-3000:]
    step = int(re.search(r"after step (\d+)", stops[0]).group(1))
    assert f"checkpoint {out / 'checkpoints' / f'step-{step:07d}'} written" in stops[0]
    assert (out / "checkpoints" / f"step-{step:07d}" / "meta.json").is_file()
    assert our_lines(out1 + err1) == [], "the other node's process stays quiet on a clean stop"

    # the requeued job: the same command resumes by itself and trains two more steps
    (code0, out0, err0), (code1, out1, err1) = nodes.run(f"--steps {step + 2}")
    assert (code0, code1) == (0, 0), err0[-3000:] + err1[-3000:]
    lines = our_lines(out0 + err0)
    assert f"resumed from step {step} ({out / 'checkpoints' / f'step-{step:07d}'}); training to step {step + 2}" \
        in lines
    assert any(line.startswith("trained 2 steps in ") and f"(steps {step + 1}-{step + 2}, resumed from step {step};"
               f" the run is at step {step + 2} of {step + 2})" in line for line in lines), lines
    assert our_lines(out1 + err1) == [] and nodes.build_count() == 1

    # a refusal every process finds (another global batch cannot continue this run): one line, from rank 0
    (code0, out0, err0), (code1, out1, err1) = nodes.run(f"--steps {step + 4} --batch-size 16")
    assert code0 != 0 and code1 != 0
    refusals = our_lines(out0 + err0)
    assert len(refusals) == 1 and refusals[0].startswith("error: --resume") and "global_batch" in err0
    assert our_lines(out1 + err1) == []


# ----------------------------------------------------------------------------------------------------------
# Who builds the token cache


def test_a_build_lock_held_elsewhere_makes_a_node_wait_instead_of_building(tiny_shards, tmp_path, monkeypatch):
    manifest = Manifest.load(tiny_shards)
    root = tmp_path / "cache"
    final = token_cache.cache_folder(manifest, root)
    built = []
    fill_all = token_cache._fill_all
    monkeypatch.setattr(token_cache, "_fill_all", lambda *args: built.append(1) or fill_all(*args))
    waited: list = []
    with folder_lock(root / f".{final.name}.build", "another node's build"):
        waiter = threading.Thread(target=lambda: waited.append(
            token_cache.build_unless_building(tiny_shards, root, manifest, 1, timeout_s=120)))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not built, "it waits for the lock holder's build"
        token_cache.build_token_cache(tiny_shards, root, manifest, workers=1)  # the holder's build
        waiter.join(timeout=60)
    assert waited == [final] and len(built) == 1
    assert token_cache.build_unless_building(tiny_shards, root, manifest, 1, timeout_s=1) == final and len(built) == 1


def test_cache_scope_names_the_builders():
    assert token_cache.builds_cache("node", is_main=False, is_local_main=True)  # each node's first process
    assert not token_cache.builds_cache("shared", is_main=False, is_local_main=True)  # only the job's main
    assert token_cache.builds_cache("shared", is_main=True, is_local_main=True)
    with pytest.raises(ValueError, match="--cache-scope 'disk'"):
        TrainConfig(shards="s", out="o", cache_scope="disk")


# ----------------------------------------------------------------------------------------------------------
# Launch messages


def test_a_launch_that_asked_for_processes_but_runs_one_says_so(tiny_shards, tmp_path):
    assert one_process_warning(2, {"WORLD_SIZE": "2"}) is None
    assert one_process_warning(1, {}) is None  # python train/run.py
    assert one_process_warning(1, {"MASTER_PORT": "29500"}) is None  # not started by accelerate launch
    assert "world size is 4" in one_process_warning(1, {"WORLD_SIZE": "4", "MASTER_PORT": "1"})
    # accelerate launch --num_processes 2 on a CPU, without --multi_gpu: one process
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train" / "run.py"), "--shards",
               str(tiny_shards), "--prepare-only", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(command, env={**os.environ, **CPU_ENV, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: accelerate launch")]
    assert len(warnings) == 1 and "add --multi_gpu" in warnings[0]


def test_flag_errors_print_on_rank_zero_only(monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "train"))
    import run as train_command

    for rank, expected_lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert launch_rank() == int(rank)
        with pytest.raises(SystemExit) as exited:
            train_command.main(["--shards", "s", "--out", "o", "--batch-size", "0"])
        assert exited.value.code == 2
        assert len([line for line in capsys.readouterr().err.splitlines() if "--batch-size 0" in line]) == \
            expected_lines


def test_a_problem_another_process_reports_exits_2_without_a_line(capsys):
    from star.cli import run_command

    def elsewhere(config):
        raise ReportedElsewhere("--out o: process 0 found a problem")

    assert run_command(elsewhere, None) == 2 and capsys.readouterr().err == ""


def test_a_resume_counts_this_invocations_steps_and_says_when_the_teacher_decay_changes(
        tiny_shards, tiny_gpt_json, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "train"))
    from run import summarise

    settings = dict(shards=str(tiny_shards), out=str(tmp_path / "run"), model=str(tiny_gpt_json), batch_size=8,
                    num_workers=0, log_every=1, ckpt_every=100, progress=False, views_per_image=2)
    settings["star_settings"] = StarSettings(teacher_decay="auto")
    first = train(TrainConfig(steps=30, **settings))
    assert (first["start_step"], first["trained_steps"], first["steps"]) == (0, 30, 30)
    capsys.readouterr()
    resumed = train(TrainConfig(steps=32, resume="auto", **settings))
    printed = capsys.readouterr().out
    assert (resumed["start_step"], resumed["trained_steps"], resumed["steps"]) == (30, 2, 32)
    assert "trained 2 steps in" in summarise(resumed) and "(steps 31-32, resumed from step 30;" in summarise(resumed)
    before, after = first["teacher_decay"], resumed["teacher_decay"]
    assert before < after  # auto: 1 - 25 / steps, and the run grew
    assert f"resume: teacher EMA decay changed from {before:.6g} to {after:.6g} (--teacher-decay auto, 32 steps)" \
        in printed
    assert "resumed from step 30 (" in printed


class TwoProcessPeer:
    """Process `rank` of a 2-process launch; its reduce adds the other process's flags (failed or not)."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, rank: int, other_failed: bool = True):
        self.process_index, self.other_failed = rank, other_failed

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        if len(tensor) == self.num_processes:  # the per-rank flags
            other = torch.zeros_like(tensor)
            other[1 - self.process_index] = float(self.other_failed)
            return tensor + other
        return tensor + float(self.other_failed)  # the guard's per-term flags


def test_a_process_that_alone_fails_reports_and_one_whose_peer_failed_stays_quiet():
    from star.train.distributed import agreed

    with pytest.raises(FileNotFoundError, match="no shards on this node"):  # rank 1 alone: its own error
        with agreed(TwoProcessPeer(1, other_failed=False), "--shards s"):
            raise FileNotFoundError("no shards on this node")
    with pytest.raises(ReportedElsewhere, match="process 1 found a problem"):  # rank 0, whose block went well
        with agreed(TwoProcessPeer(0, other_failed=True), "--shards s"):
            pass
    with pytest.raises(ReportedElsewhere):  # both failed: rank 0 reports, rank 1 stays quiet
        with agreed(TwoProcessPeer(1, other_failed=True), "--shards s"):
            raise ValueError("--batch-size 7 must be a multiple of processes")
    with agreed(TwoProcessPeer(0, other_failed=False), "--shards s"):
        pass  # nobody failed: nothing raised


@pytest.mark.parametrize("rank", [0, 1])
def test_a_non_finite_loss_every_process_saw_is_reported_by_one(rank, capsys):
    from types import SimpleNamespace

    from star.cli import run_command
    from star.train.loop import GUARDED, NonFiniteLoss, raise_if_non_finite
    from star.train.safety import NonFiniteGuard

    guard = NonFiniteGuard(GUARDED, "cpu")
    guard.record(torch.tensor([float("nan")] + [1.0] * (len(GUARDED) - 1)), step=7)
    run = SimpleNamespace(guard=guard, accelerator=TwoProcessPeer(rank), last_good_checkpoint=None)
    with pytest.raises(NonFiniteLoss) as caught:
        raise_if_non_finite(run)
    assert caught.value.quiet == (rank == 1)
    assert ("non-finite loss at step 7" in str(caught.value)) == (rank == 0)

    def work(config):
        raise caught.value

    assert run_command(work, None, user_errors=(NonFiniteLoss,)) == 2
    assert (capsys.readouterr().err != "") == (rank == 0), "the lowest rank that saw it prints the one line"

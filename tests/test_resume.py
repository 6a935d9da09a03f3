"""Resume reads and checks, and a run continues on another launch: the data order at the same global batch, old
meta.json and index-keyed optimizer states, the batch-change refusal, and no import cycle in star/."""
import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from star.train.distributed import optimizer_state_by_name
from star.train.run_folder import CheckpointMeta
from star.train.token_loader import EpochBatchSampler

REPO = Path(__file__).resolve().parents[1]


def step_images(num_samples: int, global_batch: int, world: int, micro_batches: int, steps: int, start: int = 0):
    """The images of each step, read through every rank's sampler (micro-batches of a step together)."""
    streams = [iter(EpochBatchSampler(num_samples, global_batch, rank, world, seed=3, micro_batches=micro_batches,
                                      start_step=start)) for rank in range(world)]
    per_step = []
    for _ in range(steps):
        images = []
        for _ in range(micro_batches):
            for stream in streams:
                images += next(stream)
        per_step.append(sorted(images))
    return per_step


def test_a_step_reads_the_same_images_on_any_launch_of_the_same_global_batch():
    # 20 images, batch 8: 2 steps per epoch; with 4 micro-batches of 2 the micro-batch count (10) per epoch is not a
    # multiple of the accumulation, so an order counted in micro-batches would cross epochs at other steps
    reference = step_images(20, 8, world=1, micro_batches=1, steps=7)
    for world, micro in ((2, 1), (4, 1), (1, 2), (2, 2), (1, 4), (2, 4)):
        assert step_images(20, 8, world, micro, steps=7) == reference, (world, micro)
    assert step_images(20, 8, 2, 2, steps=3, start=4) == reference[4:7]  # resumed on another launch
    assert len({i for step in reference[:2] for i in step}) == 16  # one epoch: no image twice
    with pytest.raises(ValueError, match="global batch 8 must be a multiple of processes x micro-batches = 3 x 1"):
        EpochBatchSampler(20, 8, 0, 3, seed=0)


def test_old_meta_json_reads_with_its_global_batch():
    launch = {"step": 4, "world_size": 2, "batch_per_process": 4, "grad_accum": 2,
              "batches_consumed_per_process": 8, "views": 2}
    meta = CheckpointMeta.from_json(launch)
    assert meta.global_batch == 16 and meta.views_per_image == 2 and meta.world_size == 2
    assert CheckpointMeta.from_json({"step": 2, "world_size": 1, "batches_consumed_per_process": 2}).global_batch is None
    now = CheckpointMeta(step=4, views_per_image=2, global_batch=16, world_size=1, batch_per_process=8, grad_accum=2)
    assert meta.differences(now) == []  # another launch of the same global batch continues
    assert meta.differences(dataclasses.replace(now, global_batch=8)) == ["global_batch: checkpoint 16, now 8"]
    assert meta.differences(dataclasses.replace(now, global_batch=8), ignore=("global_batch",)) == []


def test_an_index_keyed_optimizer_state_is_keyed_by_name_in_the_optimizers_order():
    a, b, c = (torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2)),
               torch.nn.Parameter(torch.randn(2, 2)))
    optimizer = torch.optim.AdamW([{"params": [a, c]}, {"params": [b], "weight_decay": 0.0}])
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    optimizer.step()
    by_index = optimizer.state_dict()
    named = optimizer_state_by_name(by_index, [["w.a", "w.c"], ["n.b"]])
    assert [g["params"] for g in named["param_groups"]] == [["w.a", "w.c"], ["n.b"]]
    assert torch.equal(named["state"]["w.c"]["exp_avg"], optimizer.state[c]["exp_avg"])
    assert torch.equal(named["state"]["n.b"]["exp_avg_sq"], optimizer.state[b]["exp_avg_sq"])
    assert named["param_groups"][1]["weight_decay"] == 0.0
    assert optimizer_state_by_name(named, [["x", "y"], ["z"]]) is named  # already keyed by name
    with pytest.raises(ValueError, match=r"param groups of \[2, 1\] parameters, this run's optimizer \[3\]"):
        optimizer_state_by_name(by_index, [["w.a", "w.c", "n.b"]])


def _star_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The star modules a file imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of a module graph, as the modules around it; None when it has none."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for cycle in map(visit, sorted(graph)) if cycle), None)


def star_import_graph() -> dict[str, set[str]]:
    files = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
             for path in (REPO / "star").rglob("*.py")}
    return {module: _star_imports(path, module, set(files)) for module, path in files.items()}


def test_star_has_no_import_cycle():
    graph = star_import_graph()
    assert "star.train.plan" in graph["star.train.loop"]  # the walk sees imports
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and the search finds cycles
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_resume_reads_and_builds_nothing():
    """star/train/resume.py imports neither the model nor the trainer: it reads checkpoints and compares."""
    graph = _star_imports(REPO / "star" / "train" / "resume.py", "star.train.resume",
                          {".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "star").rglob("*.py")})
    assert not graph & {"star.train.loop", "star.gpt.model", "star.train.distributed", "star.weights"}, graph



# ----------------------------------------------------------------------------------------------------------
# A resumed run on another launch (2 CPU processes with gloo, DDP or FSDP2) against one that never stopped

def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


EXACT = dict(batch_size=8, lr=2e-3, num_workers=0, log_every=1, ckpt_every=2, keep_checkpoints=0, progress=False,
             dropout=0.0, token_dropout=0.0, projector_hidden=32)


def _worker(spec_json: str) -> None:
    """One process of a launch: train the spec's TrainConfig under its engine (ddp or fsdp2) and, on rank 0, save
    the states a resumed run starts from (the optimizer's and the teacher's, gathered whole) as loaded.pt."""
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("STAR_TEST_HANG_S", "150")), exit=True)
    sys.path.insert(0, str(REPO))
    from test_fsdp import _fsdp_on_cpu

    import star.train.loop as loop
    from star.train.distributed import full_optimizer_state, full_state_dict
    from star.train.star_settings import StarSettings

    spec = json.loads(spec_json)
    if spec["engine"] == "fsdp2":
        loop.make_accelerator = _fsdp_on_cpu(loop.make_accelerator)
    prepare = loop.prepare_trainer

    def prepare_and_record(*args, **kwargs):
        trainer = prepare(*args, **kwargs)
        if not trainer.progress.start_step:  # a fresh optimizer has no state yet (reading it would make one)
            return trainer
        started = {"optimizer": full_optimizer_state(trainer.trainable, trainer.optimizer),
                   "teacher": full_state_dict(trainer.teacher) if trainer.teacher is not None else None}
        if trainer.accelerator.is_main_process:
            torch.save(started, trainer.run_dir / "loaded.pt")
        return trainer

    loop.prepare_trainer = prepare_and_record
    fields = dict(spec["config"])
    fields["star_settings"] = StarSettings(**fields.get("star_settings", {}))
    loop.train(loop.TrainConfig(**fields))


def launch(engine: str, **config) -> None:
    """Train on 2 CPU processes under `engine` (ddp | fsdp2) with these TrainConfig fields."""
    from conftest import CPU_ENV, TWO_CPU_PROCESSES

    spec = json.dumps({"engine": engine, "config": {key: str(value) if isinstance(value, Path) else value
                                                    for key, value in config.items()}})
    result = subprocess.run([sys.executable, *TWO_CPU_PROCESSES, __file__, spec], capture_output=True, text=True,
                            env={**os.environ, **CPU_ENV, "PYTHONPATH": str(REPO)}, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("[rank")]  # the workers' tracebacks
    assert result.returncode == 0, "\n".join(errors[-40:]) or result.stderr[-4000:]


def assert_same_steps(run: Path, reference: Path, steps: list[int], terms=("loss", "loss_ar")) -> None:
    logged = {record["step"]: record for record in read_log(run)}
    expected = {record["step"]: record for record in read_log(reference)}
    assert sorted(logged) == steps, sorted(logged)
    for step in steps:
        for term in terms:
            assert logged[step][term] == pytest.approx(expected[step][term], abs=2e-5), (run.name, step, term)


def assert_states_equal(found: dict, expected: dict, what: str) -> None:
    assert set(found) == set(expected), what
    for name, value in expected.items():
        if isinstance(value, dict):
            assert_states_equal(found[name], value, f"{what}.{name}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(found[name], value), f"{what}.{name}"


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def test_a_ddp_checkpoint_resumes_under_fsdp2_exactly(tiny_shards, tiny_gpt_json, tmp_path):
    """ST-AR on 2 processes: DDP to step 4 without a stop, and DDP's step-2 checkpoint continued under FSDP2. The
    AdamW state and the teacher are loaded whole and sharded, the losses follow the DDP run's, and FSDP2 writes
    its checkpoints."""
    from safetensors.torch import load_file

    common = dict(EXACT, shards=tiny_shards, model=tiny_gpt_json, batch_size=4, steps=4,
                  star_settings={"teacher_decay": 0.5})
    launch("ddp", out=tmp_path / "ddp", **common)
    launch("fsdp2", out=tmp_path / "fsdp2", resume=checkpoint(tmp_path / "ddp", 2), **common)
    loaded = torch.load(tmp_path / "fsdp2" / "loaded.pt", weights_only=True)
    saved = torch.load(checkpoint(tmp_path / "ddp", 2) / "optimizer.pt", weights_only=True)
    assert_states_equal(loaded["optimizer"]["state"], saved["state"], "optimizer")
    student = {f"student.{name}" for name in load_file(checkpoint(tmp_path / "ddp", 2) / "model.safetensors")}
    assert student < set(saved["state"]) and all(k.startswith(("student.", "projector.")) for k in saved["state"])
    assert_states_equal(loaded["teacher"], load_file(checkpoint(tmp_path / "ddp", 2) / "teacher.safetensors"), "teacher")
    assert_same_steps(tmp_path / "fsdp2", tmp_path / "ddp", [3, 4], terms=("loss", "loss_ar", "loss_mim"))
    for name in ("model", "teacher", "projector"):
        resumed = load_file(checkpoint(tmp_path / "fsdp2", 4) / f"{name}.safetensors")
        unbroken = load_file(checkpoint(tmp_path / "ddp", 4) / f"{name}.safetensors")
        assert max((resumed[k] - unbroken[k]).abs().max().item() for k in unbroken) < 1e-5, name


def test_a_run_continues_on_another_number_of_processes_exactly(tiny_shards, tiny_gpt_json, tmp_path):
    """One process to step 6 without a stop; its step-2 checkpoint continued on 2 processes (DDP with 2
    micro-batches, and FSDP2) to step 4, each of those continued on one process to step 6: every step's losses
    are the uninterrupted run's. (The plain baseline without dropout: no random draw depends on the rank.)"""
    from star.train.loop import TrainConfig, train

    common = dict(EXACT, shards=tiny_shards, model=tiny_gpt_json, self_guided=False, class_dropout=0.0)
    straight = tmp_path / "straight"
    train(TrainConfig(out=str(straight), steps=6, **{k: str(v) if isinstance(v, Path) else v
                                                     for k, v in common.items()}))
    for engine, extra in (("ddp", {"grad_accum": 2}), ("fsdp2", {})):
        two = tmp_path / f"{engine}-two"
        launch(engine, out=two, steps=4, resume=checkpoint(straight, 2), **common, **extra)
        assert_same_steps(two, straight, [3, 4])
        loaded = torch.load(two / "loaded.pt", weights_only=True)["optimizer"]["state"]
        saved = torch.load(checkpoint(straight, 2) / "optimizer.pt", weights_only=True)["state"]
        assert_states_equal(loaded, saved, f"{engine} optimizer")  # resharded over 2 processes, every value kept
        config = json.loads((two / "config.json").read_text())
        assert (config["start_step"], config["world_size"]) == (2, 2)
        one = tmp_path / f"{engine}-one"
        train(TrainConfig(out=str(one), steps=6, resume=str(checkpoint(two, 4)),
                          **{k: str(v) if isinstance(v, Path) else v for k, v in common.items()}))
        assert_same_steps(one, straight, [5, 6])


def test_another_global_batch_is_refused_unless_allowed(tiny_shards, tiny_gpt_json, tmp_path):
    from star.train.loop import TrainConfig, train

    common = dict(EXACT, shards=str(tiny_shards), model=str(tiny_gpt_json), self_guided=False,
                  out=str(tmp_path / "run"))
    train(TrainConfig(steps=2, **common))
    with pytest.raises(ValueError, match=r"(?s)global_batch: checkpoint 8, now 4.*--allow-batch-change continues"):
        train(TrainConfig(steps=4, resume="auto", **{**common, "batch_size": 4}))
    assert not (tmp_path / "run" / "checkpoints" / "step-0000004").exists()
    summary = train(TrainConfig(steps=4, resume="auto", allow_batch_change=True, **{**common, "batch_size": 4}))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["steps"] == 4 and config["changed_on_resume"] == ["global_batch: checkpoint 8, now 4"]
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3, 4]
    assert json.loads((checkpoint(tmp_path / "run", 4) / "meta.json").read_text())["global_batch"] == 4


def test_an_index_keyed_optimizer_pt_still_resumes_exactly(tiny_shards, tiny_gpt_json, tmp_path):
    """A checkpoint whose optimizer.pt is torch's Optimizer.state_dict() (keyed by parameter index, as DDP and
    single-process runs wrote it) continues like a run that never stopped."""
    from star.train.loop import TrainConfig, train

    common = dict(EXACT, shards=str(tiny_shards), model=str(tiny_gpt_json), self_guided=False)
    train(TrainConfig(out=str(tmp_path / "straight"), steps=4, **common))
    cut = tmp_path / "cut"
    train(TrainConfig(out=str(cut), steps=2, **common))
    path = checkpoint(cut, 2) / "optimizer.pt"
    named = torch.load(path, weights_only=True)
    index = {name: i for i, name in enumerate(name for group in named["param_groups"] for name in group["params"])}
    torch.save({"state": {index[name]: value for name, value in named["state"].items()},
                "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                 for group in named["param_groups"]]}, path)
    train(TrainConfig(out=str(cut), steps=4, resume="auto", **common))
    assert_same_steps(cut, tmp_path / "straight", [1, 2, 3, 4])


def test_a_run_folder_config_json_keeps_its_keys_and_resumes(tiny_shards, tiny_gpt_json, tmp_path, capsys):
    """config.json's keys are a file format that run folders of any age hold: the config is "settings" (its
    self_guided is "star") and the resolved StarSettings are "star"; resume reads the recorded teacher decay there."""
    from star.train.loop import TrainConfig, train
    from star.train.star_settings import StarSettings

    common = dict(EXACT, shards=str(tiny_shards), model=str(tiny_gpt_json), out=str(tmp_path / "run"))
    train(TrainConfig(steps=2, star_settings=StarSettings(teacher_decay=0.5, contrastive_layer=1), **common))
    path = tmp_path / "run" / "config.json"
    record = json.loads(path.read_text())
    assert {"settings", "model", "star", "views_per_image", "data_digest"} <= set(record)
    assert not {"config", "star_settings", "self_guided"} & set(record)
    assert record["settings"]["star"] is True and "self_guided" not in record["settings"]
    assert record["star"]["teacher_decay"] == 0.5 and record["settings"]["star_settings"]["teacher_decay"] == 0.5
    capsys.readouterr()
    summary = train(TrainConfig(steps=4, resume="auto", star_settings=StarSettings(teacher_decay=0.75,
                                                                                   contrastive_layer=1), **common))
    assert summary["steps"] == 4 and summary["teacher_decay"] == 0.75
    assert "resume: teacher EMA decay changed from 0.5 to 0.75" in capsys.readouterr().out
    assert json.loads(path.read_text())["star"]["teacher_decay"] == 0.75


if __name__ == "__main__":  # one process of a launch (see `launch`)
    _worker(sys.argv[1])


# Layers that must not reach up: the model and generation know no command line, no trainer and no evaluation;
# our weight format knows no run folder; the run folder knows no evaluation and no command line; the tokenizer and
# stage one know neither trainer's run folder nor the command line (what both trainers share lives below them);
# no library module of the trainer imports the command line.
_EVERY_STAGE = ("star.cli", "star.train", "star.eval", "star.data", "star.vq", "star.gpt", "star.study")
LOWER_LAYERS = {
    "star.gpt": ("star.cli", "star.train", "star.eval", "star.data", "star.study"),
    "star.weights_io": ("star.cli", "star.train", "star.eval"),
    "star.weights": ("star.cli", "star.train", "star.eval"),
    "star.train": ("star.cli",),
    "star.train.run_folder": ("star.cli", "star.eval"),
    "star.train.plan": ("star.cli", "star.eval", "star.study"),
    "star.vq": ("star.cli", "star.train", "star.eval"),
    "star.data": ("star.cli", "star.train", "star.eval"),
    "star.settings": _EVERY_STAGE,
    "star.errors": _EVERY_STAGE,
    "star.signals": _EVERY_STAGE,
    "star.checkpoint_folder": _EVERY_STAGE,
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_lower_layers_do_not_import_upwards():
    graph = star_import_graph()
    assert "star.weights_io" in graph["star.train.run_folder"]  # the walk sees the layers' imports
    assert "star.checkpoint_folder" in graph["star.vq.checkpoints"] and "star.signals" in graph["star.vq.train"]
    for layer, above in LOWER_LAYERS.items():
        reaching_up = sorted(f"{module} -> {target}" for module, targets in graph.items() if _within(module, layer)
                             for target in targets if any(_within(target, upper) for upper in above))
        assert not reaching_up, reaching_up

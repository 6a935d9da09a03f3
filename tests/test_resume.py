"""Resume reads and checks, and a run continues on another launch: the data order at the same global batch, old
meta.json and index-keyed optimizer states, the batch-change refusal, and no import cycle in star/."""
import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from star.checkpoint import CheckpointMeta
from star.train.distributed import optimizer_state_by_name
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
    with pytest.raises(ValueError, match="global batch 8 is not a multiple of processes x micro-batches = 3 x 1"):
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


def test_star_has_no_import_cycle():
    files = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
             for path in (REPO / "star").rglob("*.py")}
    graph = {module: _star_imports(path, module, set(files)) for module, path in files.items()}
    assert "star.train.plan" in graph["star.train.loop"]  # the walk sees imports
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and the search finds cycles
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_resume_reads_and_builds_nothing():
    """star/train/resume.py imports neither the model nor the trainer: it reads checkpoints and compares."""
    graph = _star_imports(REPO / "star" / "train" / "resume.py", "star.train.resume",
                          {".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "star").rglob("*.py")})
    assert not graph & {"star.train.loop", "star.gpt.model", "star.train.distributed", "star.weights"}, graph


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

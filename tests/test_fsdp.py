"""ST-AR under FSDP2 on 2 CPU processes (gloo): the real trainer, with Accelerate's FSDP2 path switched on.

Accelerate only selects FSDP on accelerators (a CPU launch is MULTI_CPU), but its FSDP2 path (`fully_shard`,
DTensor parameters, full state dicts) runs on CPU with gloo in this torch; the worker below (this file, run by
`accelerate launch`) turns it on after the Accelerator is built, so `train()` runs unchanged: the student is
sharded by Accelerate, the teacher by shard_teacher_like, and the teacher's EMA is taken shard by shard.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DECAY = 0.5  # far from 0 and 1: the EMA differs visibly from both the student and the initial teacher


def _fsdp_on_cpu(make_accelerator):
    """Wrap loop.make_accelerator: the same Accelerator, with Accelerate's FSDP2 plugin (per-block wrap) on."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def make(config):
        accelerator, precision = make_accelerator(config)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["TransformerBlock"])
        if accelerator.mixed_precision != "no":  # what Accelerate does on GPUs: an FSDP2 MixedPrecisionPolicy
            accelerator.state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.distributed_type = DistributedType.FSDP
        return accelerator, precision

    return make


def _tracking_update(update_teacher, reference: dict, seen: dict):
    """Wrap update_teacher: keep a float64 EMA of the gathered full student beside the sharded teacher."""
    from torch.distributed.tensor import DTensor

    def update(teacher, student, decay):
        kinds = {(n, type(p).__name__, type(q).__name__) for (n, p), (_, q) in zip(teacher.named_parameters(), student.named_parameters()) if not (isinstance(p, DTensor) and isinstance(q, DTensor))}
        assert not kinds, kinds
        if not reference:
            reference.update({n: p.full_tensor().double() for n, p in teacher.named_parameters()})
            seen["initial"] = {n: v.float() for n, v in reference.items()}
        for name, parameter in student.named_parameters():
            reference[name].lerp_(parameter.detach().full_tensor().double(), 1.0 - decay)
        update_teacher(teacher, student, decay)
        seen["teacher"], seen["student"] = teacher, student

    return update


def _worker(shards: str, model: str, out: str, steps: int, resume: str, precision: str) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("STAR_TEST_HANG_S", "150")), exit=True)  # a collective that hangs fails with its stack, not silently
    sys.path.insert(0, str(REPO))
    import star.train.loop as loop
    from star.train.star_settings import StarSettings

    reference, seen = {}, {}
    loop.make_accelerator = _fsdp_on_cpu(loop.make_accelerator)
    loop.update_teacher = _tracking_update(loop.update_teacher, reference, seen)
    loop.train(loop.TrainConfig(
        shards=shards, out=out, model=model, steps=steps, batch_size=4, lr=2e-3, num_workers=0, log_every=1,
        ckpt_every=2, dropout=0.0, token_dropout=0.0, progress=False, projector_hidden=32, resume=resume,
        precision=precision, star_settings=StarSettings(teacher_decay=DECAY)))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    teacher, student = seen["teacher"], dict(seen["student"].named_parameters())
    shard_error, teacher_minus_student = 0.0, 0.0
    for name, parameter in teacher.named_parameters():
        rows = list(reference[name].chunk(world, dim=0))  # fully_shard's split: rank r holds chunk r
        expected = rows[rank] if rank < len(rows) else reference[name][:0]
        local = parameter.to_local().double()
        shard_error = max(shard_error, (local - expected).abs().max().item())
        teacher_minus_student = max(teacher_minus_student,
                                    (local - student[name].detach().to_local().double()).abs().max().item())
    full = {name: value.float() for name, value in reference.items()}
    if rank == 0:
        torch.save(full, Path(out) / "reference_teacher.pt")
        torch.save(seen["initial"], Path(out) / "initial_teacher.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "shard_error": shard_error, "teacher_minus_student": teacher_minus_student,
        "local_numel": sum(p.to_local().numel() for p in teacher.parameters()),
        "full_numel": sum(p.numel() for p in teacher.parameters()),
        # the compute dtype FSDP2 gathers parameters in (MixedPrecisionPolicy), teacher vs a student block
        "param_dtypes": [str(module._get_fsdp_state()._mp_policy.param_dtype)
                         for module in (teacher, teacher.layers[0], seen["student"].layers[0])]}))


def _launch(tiny_shards, tiny_gpt_json, out: Path, steps: int, resume: str = "", precision: str = "fp32") -> None:
    from conftest import CPU_ENV, TWO_CPU_PROCESSES

    command = [sys.executable, *TWO_CPU_PROCESSES, __file__, str(tiny_shards), str(tiny_gpt_json), str(out),
               str(steps), resume, precision]
    result = subprocess.run(command, env={**os.environ, **CPU_ENV, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=240)
    errors = [line for line in result.stderr.splitlines() if line.startswith("[rank")]  # the workers' tracebacks
    assert result.returncode == 0, "\n".join(errors[-40:]) or result.stderr[-4000:]


def test_star_trains_under_fsdp_with_a_sharded_teacher(tiny_shards, tiny_gpt_json, tmp_path):
    from safetensors.torch import load_file

    from star.eval.generator import load_generator
    from star.gpt.model import GPT

    out = tmp_path / "run"
    _launch(tiny_shards, tiny_gpt_json, out, steps=3)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for record in ranks:
        assert record["shard_error"] < 1e-5, ranks  # each rank's teacher shard == its rows of the full EMA
        assert record["teacher_minus_student"] > 1e-4, ranks  # ... which is not simply the student
        assert record["local_numel"] < 0.6 * record["full_numel"], ranks  # each rank holds about half
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2, 3]
    assert all(r["loss_mim"] > 0 and r["loss_step"] > 0 for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()))

    # teacher.safetensors holds the full gathered teacher and loads into a plain GPT, without FSDP
    reference = torch.load(out / "reference_teacher.pt", weights_only=True)
    checkpoint = out / "checkpoints" / "step-0000003"
    saved = load_file(checkpoint / "teacher.safetensors")
    assert set(saved) == set(reference)
    assert max((saved[name] - reference[name]).abs().max().item() for name in saved) < 1e-5
    teacher = load_generator(str(checkpoint), weights="teacher")
    assert isinstance(teacher, GPT)
    assert torch.equal(teacher.layers[0].attention.wqkv.weight, saved["layers.0.attention.wqkv.weight"])
    student = load_file(checkpoint / "model.safetensors")
    assert set(student) == set(saved)  # the student is gathered whole too (not one rank's shards)
    assert all(student[name].shape == saved[name].shape for name in saved)

    # resume: the full checkpoint is loaded, then sharded (teacher, and AdamW's name-keyed state), and the run
    # continues exactly as one that never stopped
    _launch(tiny_shards, tiny_gpt_json, out, steps=5, resume="auto")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(record["shard_error"] < 1e-5 for record in ranks), ranks
    loaded = torch.load(out / "initial_teacher.pt", weights_only=True)  # the sharded teacher before step 4
    assert max((loaded[name] - saved[name]).abs().max().item() for name in saved) == 0
    straight = tmp_path / "straight"
    _launch(tiny_shards, tiny_gpt_json, straight, steps=5)
    for name in ("model", "teacher", "projector"):
        resumed = load_file(out / "checkpoints" / "step-0000005" / f"{name}.safetensors")
        unbroken = load_file(straight / "checkpoints" / "step-0000005" / f"{name}.safetensors")
        assert max((resumed[k] - unbroken[k]).abs().max().item() for k in unbroken) < 1e-6, name


def test_star_under_fsdp_in_bf16_shards_the_teacher_with_the_students_precision(tiny_shards, tiny_gpt_json,
                                                                                   tmp_path):
    out = tmp_path / "run"
    _launch(tiny_shards, tiny_gpt_json, out, steps=2, precision="bf16")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for record in ranks:
        assert record["param_dtypes"] == ["torch.bfloat16"] * 3, ranks  # teacher forwards in the student's dtype
        assert record["shard_error"] < 1e-5, ranks  # the EMA itself stays in the fp32 shards
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss_mim"] > 0 for r in log), log


def test_star_under_fsdp1_is_refused_naming_the_setting():
    """FSDP1 flattens parameters, so the teacher could not mirror them: refused before anything is wrapped."""
    from types import SimpleNamespace

    import pytest
    from accelerate.utils import DistributedType

    from star.train.loop import Modules, prepare_trainer

    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    parts = Modules(student=None, teacher=torch.nn.Linear(1, 1), projector=None, optimizer=None)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        prepare_trainer(SimpleNamespace(config=SimpleNamespace(compile=False)), parts, fsdp1, None)


if __name__ == "__main__":  # one process of the launch in _launch
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])

"""The run folder (star/train/run_folder.py) on its own: finding checkpoints, refusing poisoned or half-written ones,
reading back; and the weights sampling finds in it (star/eval/generator.py)."""
import errno
import json

import pytest
import safetensors.torch
import torch

from star import checkpoint_folder
from star.eval.generator import ValueNames, load_generator, resolve_checkpoint
from star.gpt.model import GPT, GPTConfig
from star.train import run_folder
from star.weights_io import load_gpt

TINY = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=2, block_size=4, multiple_of=16)


def tiny_state(step: int = 1, teacher: bool = True) -> run_folder.TrainingState:
    torch.manual_seed(step)
    student = GPT(TINY)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    return run_folder.TrainingState(TINY, student.state_dict(), student.state_dict() if teacher else None,
                              {"w": torch.ones(3)} if teacher else None, optimizer.state_dict(),
                              run_folder.CheckpointMeta(step=step, self_guided=teacher))


def test_checkpoints_sort_by_step_number_not_text(tmp_path):
    for step in (9, 10, 10_000_000):
        run_folder.save_training_state(tmp_path, step, tiny_state(step), keep=0)
    (tmp_path / "checkpoints" / "step-0000011").mkdir()  # no meta.json: incomplete, ignored
    names = [p.name for p in checkpoint_folder.checkpoint_dirs(tmp_path)]
    assert names == ["step-0000009", "step-0000010", "step-10000000"]
    # Sampling's "newest checkpoint of a run folder" is the same one.
    assert resolve_checkpoint(str(tmp_path)).parent.name == "step-10000000"
    assert resolve_checkpoint(str(tmp_path), "teacher").name == "teacher.safetensors"


def test_non_finite_weights_are_never_saved(tmp_path):
    state = tiny_state()
    state.student["norm.weight"][0] = float("nan")
    with pytest.raises(run_folder.NonFiniteWeights, match="step-5 checkpoint.*norm.weight"):
        run_folder.save_training_state(tmp_path, 5, state, keep=0)
    assert not (tmp_path / "checkpoints").exists()


def test_disk_full_during_save_is_one_line_and_removes_the_staging_folder(tmp_path, monkeypatch):
    run_folder.save_training_state(tmp_path, 1, tiny_state(1), keep=0)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # the disk fills while a file is written
    with pytest.raises(checkpoint_folder.CheckpointWriteError) as caught:
        run_folder.save_training_state(tmp_path, 2, tiny_state(2), keep=1)
    message = str(caught.value)
    assert "no space left on device" in message and "step-0000002" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]  # staging removed
    assert run_folder.read_training_state(tmp_path / "checkpoints" / "step-0000001", True, True).meta.step == 1


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "teacher.safetensors"])
def test_resume_reader_skips_a_truncated_newest_checkpoint(tmp_path, damaged):
    for step in (2, 4):
        run_folder.save_training_state(tmp_path, step, tiny_state(step), keep=0)
    target = tmp_path / "checkpoints" / "step-0000004" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(checkpoint_folder.CorruptCheckpoint, match=f"step-0000004/{damaged}: "):
        run_folder.read_training_state(target.parent, True, True)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-0000004"):
        state, folder, skipped = run_folder.read_newest_intact(tmp_path, True, True)
    assert folder.name == "step-0000002" and state.meta.step == 2
    assert len(skipped) == 1 and "step-0000004" in skipped[0]


def test_star_checkpoint_without_teacher_is_an_error_not_a_fresh_teacher(tmp_path):
    state = tiny_state(3, teacher=False)
    state.meta.self_guided = True  # an ST-AR checkpoint copied without its teacher and projector
    folder = run_folder.save_training_state(tmp_path, 3, state, keep=0)
    with pytest.raises(ValueError, match="lacks teacher.safetensors and projector.safetensors"):
        run_folder.read_training_state(folder, need_teacher=True, need_projector=True)
    assert run_folder.read_training_state(folder, need_teacher=False, need_projector=False).teacher is None
    plain = run_folder.save_training_state(tmp_path / "plain", 3, tiny_state(3, teacher=False), keep=0)
    # A --no-star checkpoint lacks them by design: read, and the trainer reports "self_guided" as a difference.
    assert run_folder.read_training_state(plain, need_teacher=True, need_projector=True).teacher is None


def test_config_differences_name_every_architecture_field():
    other = GPTConfig(dim=32, n_layer=1, n_head=4, vocab_size=16, num_classes=2, block_size=4, multiple_of=16)
    assert run_folder.config_differences(TINY, other) == ["model n_head: checkpoint 2, now 4",
                                                     "model n_kv_head: checkpoint 2, now 4"]
    assert run_folder.config_differences(TINY, TINY) == []


def test_teacher_file_needs_a_folder_and_weights_choice_is_checked(tmp_path):
    folder = run_folder.save_training_state(tmp_path, 1, tiny_state(1), keep=0)
    teacher = load_generator(str(folder), weights="teacher")
    assert torch.equal(teacher.state_dict()["norm.weight"], tiny_state(1).teacher["norm.weight"])
    with pytest.raises(ValueError, match="^weights 'ema': choose one of student, teacher"):
        resolve_checkpoint(str(folder), "ema")
    with pytest.raises(ValueError, match="^weights teacher needs a run or checkpoint folder"):
        resolve_checkpoint(str(folder / "model.safetensors"), "teacher")


def test_errors_name_the_values_as_the_caller_calls_them(tmp_path):
    flags = ValueNames(ckpt="--ckpt", model="--model", weights="--weights")
    missing = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=f"^ckpt {missing} not found"):
        resolve_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match=f"^--ckpt {missing} not found"):
        resolve_checkpoint(missing, names=flags)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="^--ckpt .*run: the run folder has no complete checkpoint yet"):
        resolve_checkpoint(str(tmp_path / "run"), names=flags)
    student_only = run_folder.save_training_state(tmp_path / "plain", 1, tiny_state(1, teacher=False), keep=0)
    with pytest.raises(FileNotFoundError, match="^--ckpt .*: no teacher.safetensors \\(use --weights student"):
        resolve_checkpoint(str(student_only), "teacher", flags)
    official = tmp_path / "c2i_B_256.pt"
    official.write_bytes(b"")
    with pytest.raises(ValueError, match="official LlamaGen checkpoint: give model_spec"):
        load_generator(str(official))
    with pytest.raises(ValueError, match="^--ckpt .*c2i_B_256.pt is an official LlamaGen checkpoint: give --model"):
        load_generator(str(official), names=flags)


def test_run_config_json_is_read_nowhere_else(tmp_path):
    # A checkpoint folder is self-contained: its config.json alone rebuilds the student.
    folder = run_folder.save_training_state(tmp_path, 1, tiny_state(1), keep=0)
    assert json.loads((folder / "config.json").read_text())["config"]["dim"] == 32
    assert "model" not in json.loads((folder / "meta.json").read_text())
    assert load_gpt(folder).config == TINY


def test_a_checkpoint_written_again_at_its_step_replaces_only_the_trainers_files(tmp_path):
    folder = run_folder.save_training_state(tmp_path, 3, tiny_state(3), keep=0)
    (folder / "notes.txt").write_text("a person's notes")
    again = run_folder.save_training_state(tmp_path, 3, tiny_state(4, teacher=False), keep=0)
    assert again == folder and (folder / "notes.txt").read_text() == "a person's notes"
    # the earlier teacher and projector are gone: no file of another checkpoint stays beside the new meta.json
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "meta.json", "model.safetensors", "notes.txt",
                                                        "optimizer.pt"]
    state = run_folder.read_training_state(folder, need_teacher=False, need_projector=False)
    assert torch.equal(state.student["norm.weight"], tiny_state(4, teacher=False).student["norm.weight"])
    assert not list((tmp_path / "checkpoints").glob(".step-*"))  # the staging folder went

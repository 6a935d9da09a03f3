"""Weights for sampling and analysis: a run folder (its newest checkpoint), a checkpoint folder (the student or
the EMA teacher), our safetensors (star/weights_io.py) or an official LlamaGen .pt (star/weights.py).

It lives with evaluation because evaluation is what reads a generator this way, and it is the one place that
knows both the trainer's run folder (star/train/run_folder.py) and the official files; the weight format itself
knows neither. Errors name the values as the caller calls them (`ValueNames`): the parameters' names for a
library caller, a command's flags for its users.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from star.checkpoint_folder import CHECKPOINTS, checkpoint_dirs
from star.gpt.model import GPT, GPTConfig
from star.train.run_folder import TEACHER_NAME
from star.weights import load_llamagen_gpt
from star.weights_io import CONFIG_NAME, WEIGHTS_NAME, load_gpt, load_gpt_weights

WEIGHT_CHOICES = ("student", "teacher")


@dataclass(frozen=True)
class ValueNames:
    """What errors call the checkpoint, the model spec and the weights choice."""

    ckpt: str = "ckpt"
    model: str = "model_spec"
    weights: str = "weights"


def resolve_checkpoint(ckpt: str, weights: str = "student", names: ValueNames = ValueNames()) -> Path:
    """The weights file for a run folder (its newest checkpoint), a checkpoint folder, or a file."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"{names.weights} {weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
    path = Path(ckpt)
    if (path / CHECKPOINTS).is_dir():
        found = checkpoint_dirs(path)
        if not found:
            raise FileNotFoundError(f"{names.ckpt} {ckpt}: the run folder has no complete checkpoint yet")
        path = found[-1]
    if path.is_dir():
        name = TEACHER_NAME if weights == "teacher" else WEIGHTS_NAME
        if not (path / name).is_file():
            raise FileNotFoundError(f"{names.ckpt} {path}: no {name} (use {names.weights} student, or another "
                                    "checkpoint)")
        return path / name
    if not path.is_file():
        raise FileNotFoundError(f"{names.ckpt} {ckpt} not found")
    if weights == "teacher":
        raise ValueError(f"{names.weights} teacher needs a run or checkpoint folder (with {TEACHER_NAME}), not the "
                         f"file {ckpt}")
    return path


def load_generator(ckpt: str, model_spec: str = "", weights: str = "student", names: ValueNames = ValueNames()) -> GPT:
    """A GPT for sampling (eval mode, CPU): our run/checkpoint folders (student or EMA teacher), our
    safetensors, or an official LlamaGen .pt (then `model_spec` gives the architecture)."""
    path = resolve_checkpoint(ckpt, weights, names)
    if path.suffix == ".safetensors":
        if path.name == TEACHER_NAME:  # the EMA teacher: same architecture as the student beside it
            return load_gpt_weights(path, path.parent / CONFIG_NAME)
        in_checkpoint_folder = (path.parent / CONFIG_NAME).is_file() and path.name == WEIGHTS_NAME
        return load_gpt(path.parent if in_checkpoint_folder else path)
    if not model_spec:
        raise ValueError(f"{names.ckpt} {ckpt} is an official LlamaGen checkpoint: give {names.model} (e.g. GPT-B, "
                         "or a JSON with block_size 256 for *_256.pt, 576 for *_384.pt)")
    return load_llamagen_gpt(path, GPTConfig.resolve(model_spec))

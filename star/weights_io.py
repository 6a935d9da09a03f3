"""Our weight format: a model's safetensors beside its config JSON (official LlamaGen `.pt` files and strict
loading are star/weights.py; the trainer's run folders and checkpoints are star/train/run_folder.py).

A model is saved as a folder (`model.safetensors` + `config.json`) or as a pair `NAME.safetensors` + `NAME.json`.
Every safetensors file we write is marked as ours (`star_format`) and may carry the id of the checkpoint it
belongs to (`checkpoint_id`), which the trainer's reader compares so a file swapped in from elsewhere is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from star.gpt.model import GPT, GPTConfig
from star.io import atomic_path, write_json_atomic
from star.weights import load_state_dict_strict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SAVE_FORMAT = "star-gpt"


def _save_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) paths: `x.safetensors` + `x.json`, or a folder with model.safetensors + config.json."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path / WEIGHTS_NAME, path / CONFIG_NAME


def save_gpt(model: GPT, path: str | Path) -> Path:
    """Save weights as safetensors plus the config as JSON (a folder, or `name.safetensors` + `name.json`).

    Returns the weights path. Both files are written atomically.
    """
    return save_gpt_state(model.config, model.state_dict(), path)


def save_gpt_state(config: GPTConfig, state_dict: Mapping[str, torch.Tensor], path: str | Path,
                   checkpoint_id: str | None = None) -> Path:
    """`save_gpt` for a state dict gathered elsewhere (e.g. a full state dict from FSDP shards)."""
    weights_path, config_path = _save_paths(path)
    save_tensors(state_dict, weights_path, checkpoint_id)
    write_json_atomic(config_path, {"format": SAVE_FORMAT, "format_version": 1, "config": config.to_dict()})
    return weights_path


def save_tensors(state_dict: Mapping[str, torch.Tensor], path: Path, checkpoint_id: str | None = None) -> None:
    """One safetensors file of CPU tensors, atomically, marked as ours and with `checkpoint_id` when given."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"format": "pt", "star_format": SAVE_FORMAT, **({"checkpoint_id": checkpoint_id} if checkpoint_id
                                                                 else {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def file_checkpoint_id(path: Path) -> str | None:
    """The checkpoint id a safetensors file carries (None when it carries none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("checkpoint_id")


def load_gpt(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Load a model written by `save_gpt` (folder, .safetensors or .json path). Strict; returns eval mode."""
    weights_path, config_path = _save_paths(path)
    for needed in (weights_path, config_path):
        if not needed.is_file():
            raise FileNotFoundError(f"load_gpt: {needed} not found (expected the pair written by save_gpt)")
    return load_gpt_weights(weights_path, config_path).to(device)


def load_gpt_weights(weights_path: Path, config_path: Path) -> GPT:
    """A GPT built from `config_path` with the weights of `weights_path` (e.g. a checkpoint's EMA teacher, which
    shares the student's config). Strict; CPU, eval mode."""
    model = GPT(GPTConfig.resolve(config_path))
    load_state_dict_strict(model, load_tensors(weights_path), str(weights_path))
    return model.eval()

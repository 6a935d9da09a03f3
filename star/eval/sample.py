"""Stage three, sampling: class-conditional generation with CFG, decoded by the VQ into an ADM-style `.npz`.

Data-parallel under `accelerate launch`: global batch b (of `batch_size` samples) goes to rank b % world and is
drawn with a generator seeded from (seed, b), so the samples do not depend on the number of processes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from star.checkpoint import load_generator, resolve_checkpoint  # noqa: F401 (moved; imported here for callers)
from star.gpt.generate import generate
from star.images import save_tile_grid
from star.io import atomic_path, write_json_atomic


@dataclass
class SampleConfig:
    ckpt: str
    out: str
    model: str = ""  # preset or JSON, needed for official LlamaGen checkpoints
    weights: str = "student"  # student | teacher (the EMA copy ST-AR keeps) for our own checkpoints
    vq_ckpt: str = ""
    vq_config: str = "VQ-16"
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    cfg_interval: int = -1
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    num_samples: int = 50
    classes: str = ""  # comma list: cycle these instead of balancing over all classes
    batch_size: int = 32
    seed: int = 0
    tokens_only: bool = False
    save_tokens: str = ""
    image_size_eval: int = 0  # resize decoded images (bicubic) for evaluation, 0 = keep
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    progress: bool = True


def sample_labels(num_samples: int, num_classes: int, classes: str) -> torch.Tensor:
    """Balanced over all classes (i % num_classes), or cycling a given comma list."""
    if classes:
        chosen = [int(c) for c in classes.split(",") if c.strip()]
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes {bad} outside 0..{num_classes - 1}")
        return torch.tensor(chosen)[torch.arange(num_samples) % len(chosen)]
    return torch.arange(num_samples) % num_classes


def tokens_to_uint8(vq, tokens: torch.Tensor, grid: int, image_size_eval: int = 0) -> np.ndarray:
    """[B, T] tokens -> uint8 [B, H, W, 3] (LlamaGen: clamp(127.5 x + 128), truncated)."""
    with torch.inference_mode():
        images = vq.decode_indices(tokens.reshape(-1, grid, grid)).float()  # [B, 3, H, W]
        if image_size_eval and image_size_eval != images.shape[-1]:
            images = torch.nn.functional.interpolate(images, size=(image_size_eval, image_size_eval), mode="bicubic")
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 8, max_classes: int = 16) -> Path:
    """A row per class (first `max_classes` classes present), up to `per_class` samples each."""
    classes = list(dict.fromkeys(labels.tolist()))[:max_classes]
    return save_tile_grid([list(images[np.flatnonzero(labels == label)[:per_class]]) for label in classes], path)


def run_sampling(config: SampleConfig) -> dict:
    from accelerate import PartialState

    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = PartialState(cpu=device.type == "cpu")
    device = state.device
    model = load_generator(config.ckpt, config.model, config.weights).to(device)
    use_bf16 = device.type == "cuda" and config.precision in ("auto", "bf16")
    if use_bf16:
        model = model.to(torch.bfloat16)
    vq = None
    if not config.tokens_only:
        if not config.vq_ckpt:
            raise ValueError("--vq-ckpt is needed to decode images (or pass --tokens-only)")
        from star.vq.model import VQConfig, load_vq

        vq = load_vq(config.vq_ckpt, VQConfig.resolve(config.vq_config)).to(device).eval()
        grid = model.config.grid_size
        if vq.config.codebook_size > model.config.vocab_size:
            raise ValueError(f"VQ codebook {vq.config.codebook_size} > model vocab {model.config.vocab_size}")
    labels = sample_labels(config.num_samples, model.config.num_classes, config.classes)
    batches = [(b, labels[start : start + config.batch_size]) for b, start in enumerate(range(0, len(labels), config.batch_size))]
    mine = batches[state.process_index :: state.num_processes]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    part_tokens, part_images, part_indices = [], [], []
    bar = tqdm(mine, desc="sample", unit="batch", disable=not (config.progress and state.is_main_process))
    for batch_index, batch_labels in bar:
        generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + batch_index)
        tokens = generate(model, batch_labels.to(device), cfg_scale=config.cfg_scale, cfg_schedule=config.cfg_schedule,
                          cfg_interval=config.cfg_interval, temperature=config.temperature, top_k=config.top_k,
                          top_p=config.top_p, generator=generator, compile_decode=config.compile)  # [b, T]
        part_tokens.append(tokens.cpu())
        part_indices.append(torch.arange(batch_index * config.batch_size, batch_index * config.batch_size + len(batch_labels)))
        if vq is not None:
            part_images.append(tokens_to_uint8(vq, tokens, grid, config.image_size_eval))
    part = out / f".part-{state.process_index}.npz"
    np.savez(part, tokens=torch.cat(part_tokens).numpy() if part_tokens else np.zeros((0, model.config.block_size), np.int64),
             indices=torch.cat(part_indices).numpy() if part_indices else np.zeros(0, np.int64),
             images=np.concatenate(part_images) if part_images else np.zeros((0, 1, 1, 3), np.uint8))
    state.wait_for_everyone()
    summary = {"num_samples": config.num_samples, "seconds": round(time.time() - started, 2), "out": str(out)}
    if state.is_main_process:
        summary.update(_merge_parts(out, state.num_processes, labels.numpy(), config))
    state.wait_for_everyone()
    return summary


def _merge_parts(out: Path, world: int, labels: np.ndarray, config: SampleConfig) -> dict:
    tokens, images, indices = [], [], []
    for rank in range(world):
        with np.load(out / f".part-{rank}.npz") as part:
            tokens.append(part["tokens"])
            indices.append(part["indices"])
            if not config.tokens_only:
                images.append(part["images"])
        (out / f".part-{rank}.npz").unlink()
    order = np.argsort(np.concatenate(indices))
    all_tokens = np.concatenate(tokens)[order]
    written = {}
    if config.save_tokens:
        with atomic_path(config.save_tokens) as tmp, open(tmp, "wb") as handle:
            np.save(handle, all_tokens)
        written["tokens"] = config.save_tokens
    settings = {**asdict(config), "labels_balanced": not config.classes}
    if not config.tokens_only:
        all_images = np.concatenate(images)[order]
        with atomic_path(out / "samples.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, arr_0=all_images, labels=labels)
        written["samples"] = str(out / "samples.npz")
        written["grid"] = str(save_grid(all_images, labels, out / "grid.png"))
    else:
        with atomic_path(out / "tokens.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, tokens=all_tokens, labels=labels)
        written["tokens_npz"] = str(out / "tokens.npz")
    write_json_atomic(out / "settings.json", settings)
    return written

"""Stage three, sampling: class-conditional generation with CFG, decoded by the VQ into an ADM-style `.npz`.

Data-parallel under `accelerate launch`: global batch b (of `batch_size` samples) goes to rank b % world and is
drawn with a generator seeded from (seed, b), so the samples do not depend on the number of processes.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from star.checkpoint import load_generator, resolve_checkpoint  # noqa: F401 (moved; imported here for callers)
from star.cli import check, setting
from star.gpt.generate import CFG_SCHEDULES, DECODE_MODES, SamplingSettings, generate, resolve_decode_mode
from star.gpt.model import GPTConfig
from star.images import save_tile_grid
from star.io import atomic_path, sha256_file, write_json_atomic
from star.runtime import autocast_dtype, pick_device, resolve_precision

WEIGHT_CHOICES = ("student", "teacher")  # teacher: the EMA copy an ST-AR run keeps
SAMPLE_PRECISIONS = ("auto", "fp32", "bf16")


def parse_int_list(text: str, what: str) -> list[int]:
    """'1, 6,12' -> [1, 6, 12]; a non-integer entry is an error naming the flag."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected a comma-separated list of integers") from None


@dataclass
class SampleConfig:
    """Settings of `evaluate/run.py sample` (flags generated from these fields; checked on creation)."""

    ckpt: str = setting(help="run folder (newest checkpoint), checkpoint folder, .safetensors, or LlamaGen .pt")
    out: str = setting(help="output folder: samples.npz, grid.png, settings.json")
    model: str = setting("", help="preset or JSON (needed for official LlamaGen checkpoints)")
    weights: str = setting("student", choices=WEIGHT_CHOICES, help="student, or the EMA teacher of an ST-AR run")
    vq_ckpt: str = setting("", help="VQ checkpoint that decodes the tokens (not needed with --tokens-only)")
    vq_config: str = setting("VQ-16", help="VQ preset or JSON")
    allow_other_tokenizer: bool = setting(False, help="sample with a VQ other than the one the checkpoint was "
                                                      "trained on (warn instead of refusing)")
    cfg_scale: float = setting(1.0, help="classifier-free guidance scale (1.0 = off)")
    cfg_schedule: str = setting("constant", choices=CFG_SCHEDULES, help="guidance over the steps")
    cfg_interval: int = setting(-1, help="LlamaGen's cfg-interval: CFG off after this decode step (-1 = never)")
    top_k: int = setting(0, help="keep the k most likely tokens (0 = all)")
    top_p: float = setting(1.0, help="nucleus filter (1.0 = off)")
    temperature: float = setting(1.0, help="sampling temperature (>= 0)")
    num_samples: int = setting(50, help="images to sample")
    classes: str = setting("", help="comma list of class ids to cycle (empty: balanced over all classes)")
    batch_size: int = setting(32, help="images per batch (CFG doubles the model's batch)")
    seed: int = setting(0, help="global seed; batch b uses (seed, b), independent of the process count")
    tokens_only: bool = setting(False, help="write tokens.npz instead of decoding images")
    save_tokens: str = setting("", help="also save the tokens [N, T] as this .npy")
    image_size_eval: int = setting(0, help="bicubic resize of decoded images for evaluation (e.g. 384 -> 256; 0 = keep)")
    precision: str = setting("auto", choices=SAMPLE_PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N (under accelerate launch: the launcher's)")
    decode: str = setting("auto", choices=DECODE_MODES, help="static (CUDA graphs) or dynamic KV-cache decoding; "
                                                              "auto: static on CUDA")
    compile: bool = setting(False, help="torch.compile the decode step")
    progress: bool = setting(True, help="progress bar")

    def __post_init__(self) -> None:
        check(bool(self.ckpt), "--ckpt is required")
        check(bool(self.out), "--out is required")
        check(self.weights in WEIGHT_CHOICES, f"--weights {self.weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
        check(self.precision in SAMPLE_PRECISIONS,
              f"--precision {self.precision!r}: choose one of {', '.join(SAMPLE_PRECISIONS)}")
        check(self.device == "auto" or self.device in ("cpu", "cuda") or self.device.startswith("cuda:"),
              f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        check(self.num_samples > 0, f"--num-samples {self.num_samples}: must be > 0")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(self.image_size_eval >= 0, f"--image-size-eval {self.image_size_eval}: must be >= 0 (0 = keep)")
        check(self.tokens_only or bool(self.vq_ckpt), "--vq-ckpt is needed to decode images (or pass --tokens-only)")
        check(all(c >= 0 for c in parse_int_list(self.classes, "--classes")), f"--classes {self.classes}: ids >= 0")
        self.sampling()  # cfg scale, temperature, top-k/p, interval, schedule, decode mode

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(cfg_scale=self.cfg_scale, cfg_schedule=self.cfg_schedule,
                                cfg_interval=self.cfg_interval, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, decode=self.decode, compile_decode=self.compile)


def sample_labels(num_samples: int, num_classes: int, classes: str) -> torch.Tensor:
    """Balanced over all classes (i % num_classes), or cycling a given comma list."""
    if classes:
        chosen = parse_int_list(classes, "--classes")
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes {bad} outside 0..{num_classes - 1}")
        return torch.tensor(chosen)[torch.arange(num_samples) % len(chosen)]
    return torch.arange(num_samples) % num_classes


def recorded_tokenizer_sha256(checkpoint_file: Path) -> str | None:
    """sha256 of the VQ checkpoint the generator's training shards were made with, as the trainer records it
    (the checkpoint folder's meta.json, else the run folder's config.json); None where nothing is recorded
    (an official LlamaGen .pt, a bare .safetensors)."""
    folder = checkpoint_file.parent
    for record in (folder / "meta.json", folder.parent.parent / "config.json"):
        if record.is_file():
            try:
                value = json.loads(record.read_text()).get("tokenizer_sha256")
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, str) and value:
                return value
    return None


def check_tokenizer(config: SampleConfig, checkpoint_file: Path) -> str:
    """Refuse (or, with allow_other_tokenizer, warn about) a VQ other than the one the checkpoint was trained
    with: its tokens would decode into other images. Returns what was found, for settings.json."""
    recorded = recorded_tokenizer_sha256(checkpoint_file)
    if recorded is None:
        return "not recorded in the checkpoint (not checked)"
    if not Path(config.vq_ckpt).is_file():
        raise FileNotFoundError(f"--vq-ckpt {config.vq_ckpt} not found")
    actual = sha256_file(config.vq_ckpt)
    if actual == recorded:
        return "matches the checkpoint's tokenizer_sha256"
    message = (f"--vq-ckpt {config.vq_ckpt} (sha256 {actual[:12]}) is not the tokenizer {checkpoint_file} was trained "
               f"with (sha256 {recorded[:12]})")
    if not config.allow_other_tokenizer:
        raise ValueError(message + ": give that VQ checkpoint, or --allow-other-tokenizer to sample anyway")
    warnings.warn(message + "; sampling anyway (--allow-other-tokenizer)", stacklevel=2)
    return f"differs from the checkpoint's ({recorded}); allowed"


def load_decoder(config: SampleConfig, model_config: GPTConfig, device: torch.device):
    """The VQ that turns tokens into images; its codebook must cover every token the model can sample."""
    from star.vq.model import VQConfig, load_vq

    vq = load_vq(config.vq_ckpt, VQConfig.resolve(config.vq_config)).to(device).eval()
    if vq.config.codebook_size < model_config.vocab_size:
        raise ValueError(f"--vq-ckpt {config.vq_ckpt}: codebook of {vq.config.codebook_size} codes cannot decode the "
                         f"model's vocabulary of {model_config.vocab_size} tokens; use the VQ the model was trained with")
    return vq


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


def sampling_device(config: SampleConfig):
    """(accelerate state, device): the launcher's device under a multi-process launch, else --device."""
    from accelerate import PartialState

    device = pick_device(config.device)
    state = PartialState(cpu=device.type == "cpu")
    return state, (state.device if state.num_processes > 1 else device)


def run_sampling(config: SampleConfig) -> dict:
    """Sample, decode and write samples.npz + grid.png + settings.json (or tokens.npz), each atomically.

    Everything that can be checked is checked before the first token is drawn: the settings (on creation),
    the checkpoint, the tokenizer against the one the checkpoint records, and the VQ codebook size.
    """
    started = time.time()
    state, device = sampling_device(config)
    checkpoint_file = resolve_checkpoint(config.ckpt, config.weights)
    if config.weights == "teacher" and checkpoint_file.name != "teacher.safetensors":
        raise ValueError(f"--weights teacher: {checkpoint_file} is not an ST-AR run's teacher.safetensors; "
                         "use --weights student, or give the run or checkpoint folder")
    tokenizer_check = None if config.tokens_only else check_tokenizer(config, checkpoint_file)
    model = load_generator(config.ckpt, config.model, config.weights).to(device)
    precision = resolve_precision(config.precision, device)
    if autocast_dtype(precision) is not None:
        model = model.to(autocast_dtype(precision))
    vq = None if config.tokens_only else load_decoder(config, model.config, device)
    labels = sample_labels(config.num_samples, model.config.num_classes, config.classes)
    sampling = config.sampling()
    batches = [(b, labels[start : start + config.batch_size])
               for b, start in enumerate(range(0, len(labels), config.batch_size))]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    part_tokens, part_images, part_indices = [], [], []
    bar = tqdm(batches[state.process_index :: state.num_processes], desc="sample", unit="batch",
               disable=not (config.progress and state.is_main_process))
    for batch_index, batch_labels in bar:
        generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + batch_index)
        tokens = generate(model, batch_labels.to(device), sampling, generator)  # [b, T]
        part_tokens.append(tokens.cpu())
        first = batch_index * config.batch_size
        part_indices.append(torch.arange(first, first + len(batch_labels)))
        if vq is not None:
            part_images.append(tokens_to_uint8(vq, tokens, model.config.grid_size, config.image_size_eval))
    with atomic_path(out / f".part-{state.process_index}.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle,
                 tokens=torch.cat(part_tokens).numpy() if part_tokens else np.zeros((0, model.config.block_size), np.int64),
                 indices=torch.cat(part_indices).numpy() if part_indices else np.zeros(0, np.int64),
                 images=np.concatenate(part_images) if part_images else np.zeros((0, 1, 1, 3), np.uint8))
    state.wait_for_everyone()
    summary = {"num_samples": config.num_samples, "seconds": round(time.time() - started, 2), "out": str(out)}
    if state.is_main_process:
        resolved = {"precision": precision, "decode": resolve_decode_mode(config.decode, device),
                    "device": str(device), "world_size": state.num_processes, "checkpoint_file": str(checkpoint_file),
                    "tokenizer_check": tokenizer_check}
        summary.update(_merge_parts(out, state.num_processes, labels.numpy(), config, resolved))
    state.wait_for_everyone()
    return summary


def format_sampling_summary(summary: dict) -> str:
    """One line for the main process; "" on the other ranks (they wrote only their part)."""
    written = ", ".join(f"{k}: {v}" for k, v in summary.items() if k in ("samples", "grid", "tokens", "tokens_npz"))
    return f"{summary['num_samples']} samples in {summary['seconds']} s -> {written}" if written else ""


def _merge_parts(out: Path, world: int, labels: np.ndarray, config: SampleConfig, resolved: dict) -> dict:
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
    settings = {**asdict(config), "labels_balanced": not config.classes, "resolved": resolved}
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

"""Train a small VQ tokenizer of LlamaGen's family on an ImageFolder tree (CPU-friendly, no downloads).

A modest tool for demos and tests, not LlamaGen's recipe: loss = L2 reconstruction (+ optional L1) + the
quantizer's codebook and commitment terms; no LPIPS, no GAN. Random crops (LlamaGen's random_crop_arr geometry:
shorter side resized to [S, S/min_crop_fraction], then an S x S crop) and horizontal flips. Tiny codebooks
collapse, so codes unused for a while are re-seeded from current encoder outputs (dead-code restart).

Outputs, in `out_dir`: `vq.pt` (`{"model": state_dict}`, LlamaGen's format), `vq.json` (`{"config": ...}`,
readable by VQConfig.resolve and load_vq), `metrics.json` (held-out PSNR and codebook usage), and
`train_config.json` (the resolved run settings).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from star.images import IMAGE_EXTENSIONS
from star.io import write_json_atomic
from star.lock import folder_lock
from star.runtime import autocast_dtype, pick_device, resolve_precision
from star.settings import check, setting
from star.vq.model import VQConfig, VQModel, save_vq_checkpoint

# Restarted codes need time to be fitted by the decoder: stop re-seeding for the last part of training.
RESTART_STOP_FRACTION = 0.9
# Also re-seed at these early steps: step 1 is a data-dependent codebook init (random codes are far from the
# encoder's outputs, so a fresh VQ otherwise starts with a handful of live codes).
EARLY_RESTART_STEPS = (1, 5, 10, 20)


VQ_TRAIN_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class VQTrainConfig:
    data_root: str = setting(flag="data", metavar="DIR",
                             help="ImageFolder tree: root/class/*.png|jpg (any depth is accepted)")
    out_dir: str = setting("runs/vq", flag="out", metavar="DIR", help="output folder")
    vq_config: str = setting("VQ-tiny", flag="config", metavar="CONFIG",
                             help="VQ preset (VQ-tiny, VQ-8, VQ-16) or JSON file of VQConfig fields")
    image_size: int = setting(64, help="side of the training crops in pixels")
    batch_size: int = setting(16, help="crops per step")
    steps: int = setting(1000, help="optimizer steps")
    lr: float = setting(2e-3, help="Adam learning rate (tuned for the tiny CPU configs; LlamaGen's full-size recipe "
                                   "uses 1e-4)")
    adam_beta1: float = setting(0.9, help="Adam beta1 (LlamaGen's VQ training: (0.9, 0.95), no weight decay)")
    adam_beta2: float = setting(0.95, help="Adam beta2")
    grad_clip: float = setting(1.0, help="gradient-norm clip (0 = off)")
    l1_weight: float = setting(0.0, help="extra L1 reconstruction term (L2 is always on, weight 1)")
    codebook_weight: float = setting(1.0, help="weight of the vq + commitment (+ entropy) terms")
    min_crop_fraction: float = setting(0.8, help="random crops keep at least this fraction of the shorter side")
    dead_code_restart_every: int = setting(25, help="re-seed codes unused for this many steps (0 = off, also the "
                                                    "early re-seeds)")
    holdout_fraction: float = setting(0.1, help="fraction of images kept out of training for PSNR / usage")
    max_holdout_images: int = setting(500, help="at most this many held-out images")
    seed: int = setting(0, help="seed of the hold-out split, crops, flips and initialisation")
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N")
    precision: str = setting("auto", choices=VQ_TRAIN_PRECISIONS,
                             help="training autocast; auto = bf16 on CUDA (LlamaGen's VQ default), fp32 elsewhere")
    num_workers: int = setting(0, help="DataLoader workers for cropping (0 = in the training process)")
    eval_batch_size: int = setting(64, help="images per batch in the held-out evaluation")
    progress: bool = setting(True, help="tqdm progress bar")

    def __post_init__(self) -> None:
        check(bool(self.data_root), "--data is required")
        for name in ("image_size", "batch_size", "steps", "eval_batch_size", "max_holdout_images"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        check(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            check(0.0 <= getattr(self, name) < 1.0, f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        for name in ("grad_clip", "l1_weight", "codebook_weight"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        check(self.dead_code_restart_every >= 0, f"--dead-code-restart-every must be >= 0, got {self.dead_code_restart_every}")
        check(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        check(0.0 <= self.holdout_fraction < 1.0, f"--holdout-fraction must be in [0, 1), got {self.holdout_fraction}")
        check(0.0 < self.min_crop_fraction <= 1.0, f"--min-crop-fraction must be in (0, 1], got {self.min_crop_fraction}")
        check(self.precision in VQ_TRAIN_PRECISIONS,
              f"--precision {self.precision!r}: choose one of {', '.join(VQ_TRAIN_PRECISIONS)}")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def list_images(root: str | Path) -> list[Path]:
    """All images under `root` (recursively), sorted by relative path so the order is stable across machines."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected an ImageFolder tree root/class/*.png)")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}; expected root/class/*.png|jpg")
    return paths


def split_holdout(paths: list[Path], fraction: float, max_images: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, held_out): a seeded random subset is held out; both keep the sorted order."""
    if fraction == 0.0:
        return list(paths), []
    if len(paths) < 2:
        raise ValueError(f"need at least 2 images to hold some out for evaluation, found {len(paths)}; "
                         "add images or set holdout_fraction=0")
    count = min(max_images, max(1, round(fraction * len(paths))), len(paths) - 1)
    held = set(np.random.default_rng(seed).permutation(len(paths))[:count].tolist())
    train = [p for i, p in enumerate(paths) if i not in held]
    held_out = [p for i, p in enumerate(paths) if i in held]
    return train, held_out


def _load_rgb(path: Path) -> Image.Image:
    from star.data.views import to_rgb  # handles RGBA/CMYK/16-bit the project's one way

    try:
        with Image.open(path) as image:
            image.load()  # read pixels before the file closes (to_rgb returns RGB images as they are)
            return to_rgb(image)
    except Exception as error:  # PIL raises many types for broken files
        raise ValueError(f"cannot read image {path}: {error}; remove it or fix it") from error


def _resize_shorter_side(image: Image.Image, shorter: int) -> Image.Image:
    width, height = image.size
    scale = shorter / min(width, height)
    size = (max(shorter, round(width * scale)), max(shorter, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def center_crop_array(image: Image.Image, size: int) -> np.ndarray:
    """[size, size, 3] uint8: shorter side resized to `size`, centre crop (the held-out view)."""
    image = _resize_shorter_side(image, size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def uint8_to_model(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] uint8 -> float in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    return pixels.float() / 127.5 - 1.0


def model_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] float -> uint8 the way LlamaGen saves samples: clamp(127.5 x + 128), truncated."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


class RandomCropImages(torch.utils.data.Dataset):
    """Item k = the k-th training sample overall: a seeded epoch permutation picks the image, and the crop and
    flip come from a generator seeded by (seed, k), so the stream does not depend on the number of workers."""

    def __init__(self, paths: list[Path], image_size: int, min_crop_fraction: float, seed: int):
        self.image_size = image_size
        self.max_shorter = math.ceil(image_size / min_crop_fraction)
        self.seed = seed
        # Images are kept in memory at the largest size a crop can need, so a step never decodes a file.
        self.images = [self._shrink(_load_rgb(path)) for path in paths]
        self._epoch_orders: dict[int, np.ndarray] = {}

    def _shrink(self, image: Image.Image) -> Image.Image:
        return _resize_shorter_side(image, self.max_shorter) if min(image.size) > self.max_shorter else image

    def _image_index(self, sample_number: int) -> int:
        epoch, position = divmod(sample_number, len(self.images))
        if epoch not in self._epoch_orders:
            self._epoch_orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.images))}
        return int(self._epoch_orders[epoch][position])

    def __len__(self) -> int:
        return 2**62  # an endless stream, indexed by sample number

    def __getitem__(self, sample_number: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, 1, sample_number])
        image = self.images[self._image_index(sample_number)]
        image = _resize_shorter_side(image, int(rng.integers(self.image_size, self.max_shorter + 1)))
        left = int(rng.integers(0, image.width - self.image_size + 1))
        top = int(rng.integers(0, image.height - self.image_size + 1))
        crop = image.crop((left, top, left + self.image_size, top + self.image_size))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)  # [3, S, S]
        return uint8_to_model(pixels)


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_reconstruction(model: VQModel, pixels: torch.Tensor, batch_size: int = 64) -> dict[str, Any]:
    """Tokenize and decode uint8 images [N, 3, S, S]; PSNR (dB, uint8 scale, mean over images) and usage.

    Reconstructions are converted to uint8 exactly as samples are saved, so the PSNR is that of saved files.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    psnrs, used_codes, squared_errors = [], [], []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start:start + batch_size].to(device)  # [b, 3, S, S] uint8
        indices = model.encode_indices(uint8_to_model(batch))  # [b, h, w]
        reconstruction = model_to_uint8(model.decode_indices(indices))
        mse = (reconstruction.float() - batch.float()).pow(2).flatten(1).mean(dim=1)  # [b]
        squared_errors.append(mse.cpu())
        psnrs.append(10.0 * torch.log10(255.0**2 / mse.clamp_min(1e-10)).cpu())
        used_codes.append(indices.flatten().unique().cpu())
    model.train(was_training)
    codes_used = int(torch.cat(used_codes).unique().numel())
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "mse_uint8": float(torch.cat(squared_errors).mean()),
        "codes_used": codes_used,
        "codebook_size": model.config.codebook_size,
        "codebook_usage": codes_used / model.config.codebook_size,
        "num_images": int(len(pixels)),
    }


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def restart_dead_codes(
    model: VQModel, optimizer: torch.optim.Optimizer, code_counts: torch.Tensor, latents: torch.Tensor,
    generator: torch.Generator,
) -> int:
    """Re-seed codes with zero count from random current encoder outputs; returns how many were re-seeded.

    latents: [B, C, h, w] pre-quantization. Adam's moments for the re-seeded rows are cleared so stale momentum
    does not drag them straight back.
    """
    dead = (code_counts == 0).nonzero().flatten()  # [D]
    if dead.numel() == 0:
        return 0
    quantizer = model.quantize
    candidates = quantizer.prepare_latents(latents).reshape(-1, quantizer.embed_dim)  # [N, C]
    picks = torch.randint(0, candidates.shape[0], (dead.numel(),), generator=generator).to(candidates.device)
    noise = 0.01 * torch.randn(dead.numel(), quantizer.embed_dim, generator=generator).to(candidates.device)
    weight = quantizer.embedding.weight
    weight[dead] = (candidates[picks] + noise).to(weight.dtype)
    state = optimizer.state.get(weight, {})
    for moment in ("exp_avg", "exp_avg_sq"):
        if moment in state:
            state[moment][dead] = 0.0
    return int(dead.numel())


def train_vq(config: VQTrainConfig) -> dict[str, Any]:
    """Train, evaluate on held-out images, write checkpoint + config + metrics; return the metrics dict.

    The output folder is locked for the run (star.lock.folder_lock): a second trainer on it is refused."""
    started = time.time()
    vq_config = VQConfig.resolve(config.vq_config)
    if config.image_size % vq_config.downsample:
        raise ValueError(f"--image-size {config.image_size} must be a multiple of the VQ downsample factor "
                         f"{vq_config.downsample} ({config.vq_config})")
    device = pick_device(config.device)
    train_paths, holdout_paths = split_holdout(
        list_images(config.data_root), config.holdout_fraction, config.max_holdout_images, config.seed
    )
    with folder_lock(config.out_dir, "tokenize/train_vq.py"):
        if (Path(config.out_dir) / "vq.pt").exists():  # shards made with it name its hash: never replace it by mistake
            raise ValueError(f"--out {config.out_dir} already holds a trained VQ (vq.pt); choose a new --out folder, "
                             "or delete that folder to retrain there")
        torch.manual_seed(config.seed)
        dataset = RandomCropImages(train_paths, config.image_size, config.min_crop_fraction, config.seed)
        holdout_pixels = torch.from_numpy(
            np.stack([center_crop_array(_load_rgb(p), config.image_size) for p in holdout_paths])
        ).permute(0, 3, 1, 2) if holdout_paths else None  # [N, 3, S, S] uint8
        model = VQModel(vq_config).to(device)
        before = evaluate_reconstruction(model, holdout_pixels, config.eval_batch_size) if holdout_paths else None
        training = _fit(model, dataset, config, device)
        train_seconds = time.time() - started
        model.eval()
        after = evaluate_reconstruction(model, holdout_pixels, config.eval_batch_size) if holdout_paths else None
        metrics = {
            "holdout_psnr": after["psnr"] if after else None,
            "holdout_psnr_untrained": before["psnr"] if before else None,
            "holdout_codebook_usage": after["codebook_usage"] if after else None,
            "holdout_codes_used": after["codes_used"] if after else None,
            "codebook_size": vq_config.codebook_size,
            "num_holdout_images": len(holdout_paths),
            "num_train_images": len(train_paths),
            "steps": config.steps,
            "batch_size": config.batch_size,
            "image_size": config.image_size,
            **training,
            "train_seconds": round(train_seconds, 2),
            "device": str(device),
        }
        return _write_outputs(model, config, metrics)


def _write_outputs(model: VQModel, config: VQTrainConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / "vq.pt"
    config_path = save_vq_checkpoint(model, checkpoint_path, extra={
        "note": "trained by star.vq.train (L2 + codebook losses; no LPIPS/GAN)",
        "image_size": config.image_size,
    })
    metrics = {**metrics, "checkpoint": str(checkpoint_path), "vq_config": str(config_path)}
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "train_config.json", dataclasses.asdict(config))
    return metrics


def _fit(model: VQModel, dataset: RandomCropImages, config: VQTrainConfig, device: torch.device) -> dict[str, Any]:
    """The training steps; returns the training-side metrics (recent losses, codes re-seeded, precision)."""
    codebook_size = model.config.codebook_size
    precision = resolve_precision(config.precision, device)
    amp_dtype = autocast_dtype(precision)  # None: fp32
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=range(config.steps * config.batch_size),
        num_workers=config.num_workers, drop_last=True,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
    code_counts = torch.zeros(codebook_size, dtype=torch.long, device=device)
    restart_generator = torch.Generator().manual_seed(config.seed + 1)
    restarted_total, recent = 0, {"rec": [], "vq": [], "commit": []}
    model.train()
    progress = tqdm(loader, total=config.steps, desc="train VQ", disable=not config.progress, dynamic_ncols=True)
    for step, images in enumerate(progress, start=1):
        images = images.to(device, non_blocking=True)  # [B, 3, S, S] in [-1, 1]
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            latents = model.encode_latents(images)  # [B, C, h, w]
            quantized, losses, indices = model.quantize(latents)
            reconstruction = model.decode_latents(quantized)
        reconstruction = reconstruction.float()
        reconstruction_loss = F.mse_loss(reconstruction, images)
        if config.l1_weight > 0:
            reconstruction_loss = reconstruction_loss + config.l1_weight * F.l1_loss(reconstruction, images)
        loss = reconstruction_loss + config.codebook_weight * losses.total

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        code_counts += torch.bincount(indices.flatten(), minlength=codebook_size)
        restart_now = step in EARLY_RESTART_STEPS or step % max(config.dead_code_restart_every, 1) == 0
        if config.dead_code_restart_every > 0 and restart_now and step <= RESTART_STOP_FRACTION * config.steps:
            restarted_total += restart_dead_codes(model, optimizer, code_counts, latents.detach(), restart_generator)
            code_counts.zero_()

        for name, value in (("rec", reconstruction_loss), ("vq", losses.vq_loss), ("commit", losses.commit_loss)):
            recent[name] = (recent[name] + [value.item()])[-50:]
        if step % 10 == 0 or step == config.steps:
            progress.set_postfix(rec=f"{np.mean(recent['rec']):.4f}", vq=f"{np.mean(recent['vq']):.4f}",
                                 usage=f"{losses.codebook_usage:.2f}")
    progress.close()
    return {
        "train_reconstruction_mse_last50": float(np.mean(recent["rec"])),
        "train_vq_loss_last50": float(np.mean(recent["vq"])),
        "codes_restarted": restarted_total,
        "precision": precision,
    }


def format_summary(metrics: dict[str, Any]) -> str:
    lines = [
        f"VQ training: {metrics['steps']} steps x {metrics['batch_size']} crops of {metrics['image_size']} px "
        f"on {metrics['num_train_images']} images, {metrics['train_seconds']:.1f} s on {metrics['device']}",
        f"  train reconstruction MSE (last 50 steps, [-1,1] scale): {metrics['train_reconstruction_mse_last50']:.4f}"
        f"; codes re-seeded: {metrics['codes_restarted']}",
    ]
    if metrics["holdout_psnr"] is not None:
        lines.append(
            f"  held-out ({metrics['num_holdout_images']} images, centre crops): PSNR {metrics['holdout_psnr']:.2f} dB "
            f"(untrained {metrics['holdout_psnr_untrained']:.2f}); codebook usage "
            f"{metrics['holdout_codebook_usage']:.1%} ({metrics['holdout_codes_used']}/{metrics['codebook_size']})"
        )
    lines.append(f"  wrote {metrics['checkpoint']}, {metrics['vq_config']}, "
                 f"{Path(metrics['checkpoint']).parent / 'metrics.json'}")
    return "\n".join(lines)

"""Train a small VQ tokenizer of LlamaGen's family on an ImageFolder tree (CPU-friendly, no downloads).

Loss (LlamaGen's VQ recipe, less its perceptual term): L2 reconstruction (+ optional L1) + the quantizer's
codebook and commitment terms + a PatchGAN hinge term (star/vq/discriminator.py) after --disc-start, scaled by
the adaptive weight times --disc-weight. LPIPS needs downloaded VGG weights and is not shipped: --perceptual is
the place a perceptual loss plugs in. Random crops (LlamaGen's random_crop_arr geometry: shorter side resized to
[S, S/min_crop_fraction], then an S x S crop) and horizontal flips. Tiny codebooks collapse, so codes unused for
a while are re-seeded from current encoder outputs (dead-code restart).

Read top-down: `train_vq` claims --out, builds or resumes the `VQTraining` state, runs `train_loop` (one
`train_step` per optimizer step, a checkpoint every --ckpt-every steps and on SIGINT / SIGTERM), evaluates and
writes the outputs. Every step's randomness is a function of (seed, step), so --resume auto continues exactly.

Outputs, in `out_dir`: `vq.pt` (`{"model": state_dict}`, LlamaGen's format), `vq.json` (`{"config": ...}`,
readable by VQConfig.resolve and load_vq), `metrics.json` (held-out PSNR and codebook usage),
`train_config.json` (the resolved run settings) and `checkpoints/step-NNNNNNN/` (star/vq/checkpoints.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from star.checkpoint_folder import CHECKPOINTS
from star.data.out_folder import foreign_output
from star.images import IMAGE_EXTENSIONS
from star.io import write_json_atomic
from star.lock import folder_lock
from star.runtime import autocast_dtype, indexed_seed, pick_device, resolve_precision
from star.settings import check, check_device, setting
from star.signals import SignalStop, StopRequested
from star.vq.checkpoints import (
    VQCheckpoint,
    read_newest_vq_checkpoint,
    save_vq_checkpoint_folder,
    settings_differences,
)
from star.vq.discriminator import (
    LPIPS_UNAVAILABLE,
    PERCEPTUAL_CHOICES,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    discriminator_logits_side,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    perceptual_loss,
)
from star.vq.model import VQConfig, VQModel, save_vq_checkpoint

# Restarted codes need time to be fitted by the decoder: stop re-seeding for the last part of training.
RESTART_STOP_FRACTION = 0.9
# Also re-seed at these early steps: step 1 is a data-dependent codebook init (random codes are far from the
# encoder's outputs, so a fresh VQ otherwise starts with a handful of live codes).
EARLY_RESTART_STEPS = (1, 5, 10, 20)


VQ_TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
RESUME_AUTO = "auto"
LR_SCHEDULES = ("constant", "cosine")


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
    lr_schedule: str = setting("constant", choices=LR_SCHEDULES,
                               help="constant (LlamaGen's) or cosine: from --lr down to --min-lr-fraction x --lr at "
                                    "--steps, after --lr-warmup-steps of linear warmup; both optimizers follow it")
    min_lr_fraction: float = setting(0.0, help="cosine: the learning rate at the last step, as a fraction of --lr")
    lr_warmup_steps: int = setting(0, help="linear warmup from 0 to --lr over this many steps (0 = none)")
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
    # Off by default: on Fashion-MNIST at this trainer's --lr 2e-3 it cost 5 dB of held-out PSNR; at 1e-4 it was
    # neutral (README, train_vq.py).
    disc_weight: float = setting(0.0, help="weight of the PatchGAN term, times the adaptive weight (LlamaGen: 0.5); "
                                           "0 = no discriminator")
    disc_start: int = setting(0, help="the discriminator and the generator's GAN term are off for this many steps, "
                                      "on after (neither is computed before)")
    disc_channels: int = setting(64, help="width of the discriminator's first conv (LlamaGen: 64)")
    disc_layers: int = setting(2, help="stride-2 convs of the discriminator (LlamaGen: 3, for 256 px); the logit "
                                       "grid is image-size / 2**layers - 2 on a side")
    perceptual: str = setting("none", choices=PERCEPTUAL_CHOICES,
                              help="perceptual loss: none (LPIPS needs downloaded VGG weights, not shipped)")
    ckpt_every: int = setting(250, help="write a checkpoint every this many steps (and at the end, and on Ctrl-C)")
    keep_checkpoints: int = setting(2, help="keep the newest this many checkpoints (0 = all)")
    resume: str = setting("", choices=("", "auto"), help="auto: continue from the newest intact checkpoint in --out")
    break_lock: bool = setting(False, help="take over --out's lock even if its holder may be alive")
    progress: bool = setting(True, help="tqdm progress bar")

    def __post_init__(self) -> None:
        check(bool(self.data_root), "--data is required")
        for name in ("image_size", "batch_size", "steps", "eval_batch_size", "max_holdout_images", "ckpt_every",
                     "disc_channels", "disc_layers"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        check(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            check(0.0 <= getattr(self, name) < 1.0, f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        for name in ("grad_clip", "l1_weight", "codebook_weight", "disc_weight"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        check(0.0 <= self.min_lr_fraction <= 1.0, f"--min-lr-fraction must be in [0, 1], got {self.min_lr_fraction}")
        for name in ("dead_code_restart_every", "num_workers", "disc_start", "keep_checkpoints", "lr_warmup_steps"):
            check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        check(0.0 <= self.holdout_fraction < 1.0, f"--holdout-fraction must be in [0, 1), got {self.holdout_fraction}")
        check(0.0 < self.min_crop_fraction <= 1.0, f"--min-crop-fraction must be in (0, 1], got {self.min_crop_fraction}")
        check(self.precision in VQ_TRAIN_PRECISIONS,
              f"--precision {self.precision!r}: choose one of {', '.join(VQ_TRAIN_PRECISIONS)}")
        check_device(self.device)
        check(self.resume in ("", RESUME_AUTO), f"--resume {self.resume!r}: the only value is auto")
        check(self.perceptual != "lpips", LPIPS_UNAVAILABLE)
        check(self.perceptual in PERCEPTUAL_CHOICES,
              f"--perceptual {self.perceptual!r}: choose one of {', '.join(PERCEPTUAL_CHOICES)}")
        side = discriminator_logits_side(self.image_size, self.disc_layers)
        check(self.disc_weight == 0 or side >= 1,
              f"--disc-layers {self.disc_layers} leaves no logits for {self.image_size} px crops "
              f"({self.image_size} / 2**{self.disc_layers} - 2 = {side}); use fewer layers or --disc-weight 0")

    @property
    def uses_discriminator(self) -> bool:
        return self.disc_weight > 0

    def resume_settings(self, vq_config: VQConfig, data_digest: str) -> dict[str, Any]:
        """What continuing a checkpoint exactly depends on (recorded in it, compared on --resume). The rest (the
        length, learning rate and its schedule, loss weights, --disc-start, restarts) may change on resume, and so may turning the
        discriminator on (a fresh one starts) or off (--disc-weight 0)."""
        return {"vq_config": vq_config.to_dict(), "data": data_digest, "seed": self.seed,
                "batch_size": self.batch_size, "image_size": self.image_size,
                "min_crop_fraction": self.min_crop_fraction, "holdout_fraction": self.holdout_fraction,
                "max_holdout_images": self.max_holdout_images, "betas": [self.adam_beta1, self.adam_beta2],
                "discriminator": [self.disc_channels, self.disc_layers] if self.uses_discriminator else None}


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


RECENT_TERMS = ("rec", "vq", "commit", "gan_g", "gan_d", "gan_weight")
RECENT_STEPS = 50  # the training-side metrics average the last this many steps


@dataclass
class VQTraining:
    """Everything a step changes, and so everything a checkpoint holds."""

    model: VQModel
    optimizer: torch.optim.Optimizer
    discriminator: PatchDiscriminator | None
    disc_optimizer: torch.optim.Optimizer | None
    code_counts: torch.Tensor  # [codebook_size] uses since the last dead-code restart
    restart_generator: torch.Generator
    recent: dict[str, list[float]]  # per term, the last RECENT_STEPS values
    restarted_total: int = 0
    step: int = 0

    def to_checkpoint(self, settings: dict[str, Any]) -> VQCheckpoint:
        trainer = {"optimizer": self.optimizer.state_dict(), "code_counts": self.code_counts.cpu(),
                   "restart_generator": self.restart_generator.get_state(), "recent": self.recent,
                   "restarted_total": self.restarted_total,
                   "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer else None}
        return VQCheckpoint(step=self.step, settings=settings, vq=self.model.state_dict(),
                            discriminator=self.discriminator.state_dict() if self.discriminator else None,
                            trainer=trainer)

    def load_checkpoint(self, checkpoint: VQCheckpoint) -> None:
        self.model.load_state_dict(checkpoint.vq)
        self.optimizer.load_state_dict(checkpoint.trainer["optimizer"])
        if self.discriminator is not None and checkpoint.discriminator is not None:  # else a fresh one starts
            self.discriminator.load_state_dict(checkpoint.discriminator)
            self.disc_optimizer.load_state_dict(checkpoint.trainer["disc_optimizer"])
        self.code_counts.copy_(checkpoint.trainer["code_counts"])
        self.restart_generator.set_state(checkpoint.trainer["restart_generator"])
        self.recent = {name: list(values) for name, values in checkpoint.trainer["recent"].items()}
        self.restarted_total = int(checkpoint.trainer["restarted_total"])
        self.step = checkpoint.step

    def set_learning_rate(self, lr: float) -> None:
        """Both optimizers' rate (the saved param groups hold the checkpoint's: a resumed run uses its own flags)."""
        for optimizer in (self.optimizer, self.disc_optimizer):
            for group in optimizer.param_groups if optimizer is not None else ():
                group["lr"] = lr


def learning_rate_at(step: int, config: VQTrainConfig) -> float:
    """The learning rate of 1-based `step`: a function of the step and the run's flags only, so a resumed run
    continues the schedule exactly (a larger --steps on resume stretches the cosine from there on)."""
    if config.lr_warmup_steps and step <= config.lr_warmup_steps:
        return config.lr * step / config.lr_warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    span = max(config.steps - config.lr_warmup_steps, 1)
    progress = min(max(step - config.lr_warmup_steps, 0) / span, 1.0)
    floor = config.min_lr_fraction * config.lr
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_training(config: VQTrainConfig, vq_config: VQConfig, device: torch.device) -> VQTraining:
    """A fresh, seeded tokenizer (and discriminator) with their optimizers: Adam for the VQ (LlamaGen: no weight
    decay), AdamW for the discriminator, both with --lr and the same betas."""
    torch.manual_seed(config.seed)
    model = VQModel(vq_config).to(device)
    betas = (config.adam_beta1, config.adam_beta2)
    discriminator, disc_optimizer = None, None
    if config.uses_discriminator:
        discriminator = PatchDiscriminator(config.disc_channels, config.disc_layers).to(device)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.lr, betas=betas, weight_decay=0.0)
    return VQTraining(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas),
        discriminator=discriminator, disc_optimizer=disc_optimizer,
        code_counts=torch.zeros(vq_config.codebook_size, dtype=torch.long, device=device),
        restart_generator=torch.Generator().manual_seed(indexed_seed(config.seed, 1)),
        recent={name: [] for name in RECENT_TERMS})


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


def train_step(run: VQTraining, images: torch.Tensor, config: VQTrainConfig, amp_dtype: torch.dtype | None,
               perceptual: PerceptualLoss | None = None) -> dict[str, Any]:
    """One optimizer step of the tokenizer, then (when the GAN is on) one of the discriminator. images: [B, 3, S, S]
    in [-1, 1]. The GAN is on for steps after --disc-start (1-based step > disc_start). Returns the step's loss
    terms (tensors), its code indices [B, h, w] and pre-quantization latents [B, C, h, w]."""
    model, step = run.model, run.step + 1
    gan_on = run.discriminator is not None and step > config.disc_start
    with _autocast(images.device, amp_dtype):
        latents = model.encode_latents(images)  # [B, C, h, w]
        quantized, losses, indices = model.quantize(latents)
        reconstruction = model.decode_latents(quantized)
    reconstruction = reconstruction.float()  # [B, 3, S, S]
    reconstruction_loss = F.mse_loss(reconstruction, images)
    if config.l1_weight > 0:
        reconstruction_loss = reconstruction_loss + config.l1_weight * F.l1_loss(reconstruction, images)
    if perceptual is not None:
        reconstruction_loss = reconstruction_loss + perceptual(reconstruction, images)
    loss = reconstruction_loss + config.codebook_weight * losses.total
    terms = {"rec": reconstruction_loss.detach(), "vq": losses.vq_loss.detach(), "commit": losses.commit_loss.detach()}
    if gan_on:
        run.discriminator.requires_grad_(False)  # the generator's pass: gradients flow to the images only
        with _autocast(images.device, amp_dtype):
            generator_loss = generator_adversarial_loss(run.discriminator(reconstruction).float())
        gan_weight = config.disc_weight * adaptive_gan_weight(reconstruction_loss, generator_loss,
                                                              model.decoder.conv_out.weight)
        loss = loss + gan_weight * generator_loss
        run.discriminator.requires_grad_(True)
        terms.update(gan_g=generator_loss.detach(), gan_weight=gan_weight)

    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    run.optimizer.step()
    if gan_on:
        terms["gan_d"] = discriminator_step(run, images, reconstruction.detach(), config, amp_dtype)
    run.step = step
    return {"terms": terms, "indices": indices, "latents": latents.detach(), "usage": losses.codebook_usage}


def discriminator_step(run: VQTraining, images: torch.Tensor, reconstruction: torch.Tensor, config: VQTrainConfig,
                       amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One AdamW step of the discriminator on the hinge loss (real images vs this step's reconstructions, one
    batch of each through the discriminator separately); returns the loss, detached."""
    with _autocast(images.device, amp_dtype):
        logits_real = run.discriminator(images).float()  # [B, 1, P, P]
        logits_fake = run.discriminator(reconstruction).float()  # [B, 1, P, P]
    loss = hinge_discriminator_loss(logits_real, logits_fake)
    run.disc_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.discriminator.parameters(), config.grad_clip)
    run.disc_optimizer.step()
    return loss.detach()


def _after_step(run: VQTraining, result: dict[str, Any], config: VQTrainConfig) -> None:
    """Dead-code restarts on their schedule, and the recent-loss record."""
    step = run.step
    run.code_counts += torch.bincount(result["indices"].flatten(), minlength=run.code_counts.numel())
    restart_now = step in EARLY_RESTART_STEPS or step % max(config.dead_code_restart_every, 1) == 0
    if config.dead_code_restart_every > 0 and restart_now and step <= RESTART_STOP_FRACTION * config.steps:
        run.restarted_total += restart_dead_codes(run.model, run.optimizer, run.code_counts, result["latents"],
                                                  run.restart_generator)
        run.code_counts.zero_()
    for name, value in result["terms"].items():
        run.recent[name] = (run.recent[name] + [float(value)])[-RECENT_STEPS:]


def _ignore_sigint() -> None:
    """DataLoader workers leave Ctrl-C to the training process, which stops at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batches(dataset: RandomCropImages, config: VQTrainConfig, first_step: int):
    """The batches of steps first_step+1 .. config.steps: sample numbers continue where the checkpoint stopped."""
    samples = range(first_step * config.batch_size, config.steps * config.batch_size)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=samples,
                                            num_workers=config.num_workers, drop_last=True,
                                            worker_init_fn=_ignore_sigint if config.num_workers else None))


def train_loop(run: VQTraining, dataset: RandomCropImages, config: VQTrainConfig, settings: dict[str, Any],
               stop) -> str:
    """Steps run.step+1 .. config.steps; a checkpoint every --ckpt-every steps and at the end. When `stop` (a
    star.signals.SignalStop) has received SIGINT / SIGTERM: a checkpoint at the step boundary, then
    StopRequested. Returns the precision trained in."""
    device = next(run.model.parameters()).device
    precision = resolve_precision(config.precision, device)
    amp_dtype = autocast_dtype(precision)  # None: fp32
    perceptual = perceptual_loss(config.perceptual)
    run.model.train()
    progress = tqdm(total=config.steps, initial=run.step, desc="train VQ", disable=not config.progress,
                    dynamic_ncols=True)
    for images in _batches(dataset, config, run.step):
        run.set_learning_rate(learning_rate_at(run.step + 1, config))
        result = train_step(run, images.to(device, non_blocking=True), config, amp_dtype, perceptual)
        _after_step(run, result, config)
        progress.update(1)
        if run.step % 10 == 0 or run.step == config.steps:
            progress.set_postfix(rec=f"{np.mean(run.recent['rec']):.4f}", vq=f"{np.mean(run.recent['vq']):.4f}",
                                 usage=f"{result['usage']:.2f}")
        stopping = stop is not None and stop.requested(None, every_process=False) and run.step < config.steps
        if run.step % config.ckpt_every == 0 or run.step == config.steps or stopping:
            folder = save_vq_checkpoint_folder(config.out_dir, run.to_checkpoint(settings), config.keep_checkpoints)
            tqdm.write(progress_line(run, config), file=sys.stdout)
        if stopping:
            progress.close()
            name, code = stop.received
            raise StopRequested(f"stopped at step {run.step} by {name}: checkpoint written to {folder}; continue "
                                "with the same command plus --resume auto", code)
    progress.close()
    return precision


def progress_line(run: VQTraining, config: VQTrainConfig) -> str:
    """One line per checkpoint (the log of a run without a progress bar): recent means of the loss terms."""
    terms = ", ".join(f"{name} {np.mean(values):.4f}" for name, values in run.recent.items() if values)
    return f"step {run.step}/{config.steps}: {terms}; lr {run.optimizer.param_groups[0]['lr']:.2e}"


def _recent_mean(run: VQTraining, name: str) -> float | None:
    return float(np.mean(run.recent[name])) if run.recent[name] else None


def training_metrics(run: VQTraining, precision: str) -> dict[str, Any]:
    """The training side of metrics.json: means over the last RECENT_STEPS steps (GAN terms: None if never on)."""
    return {
        "train_reconstruction_mse_last50": _recent_mean(run, "rec"),
        "train_vq_loss_last50": _recent_mean(run, "vq"),
        "train_gan_generator_loss_last50": _recent_mean(run, "gan_g"),
        "train_gan_discriminator_loss_last50": _recent_mean(run, "gan_d"),
        "train_gan_weight_last50": _recent_mean(run, "gan_weight"),
        "codes_restarted": run.restarted_total,
        "precision": precision,
    }


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def claim_vq_folder(config: VQTrainConfig, held: contextlib.ExitStack) -> None:
    """Lock --out for the run; refuse a folder that is not a VQ run folder (shards, images, a file), a finished
    VQ (shards made with it name its hash) or an unfinished run without --resume auto."""
    out = Path(config.out_dir)
    problem = foreign_output(out)
    if problem:
        raise ValueError(problem)
    held.enter_context(folder_lock(out, "tokenize/train_vq.py", break_lock=config.break_lock))
    if config.resume:
        return
    if (out / "vq.pt").exists():
        raise ValueError(f"--out {out} already holds a trained VQ (vq.pt); choose a new --out folder, or pass "
                         "--resume auto with a larger --steps to train it longer")
    if (out / CHECKPOINTS).exists() or (out / "train_config.json").exists():
        raise ValueError(f"--out {out} holds an unfinished VQ run (checkpoints/ or train_config.json); pass "
                         "--resume auto to continue it, or choose a new --out")


def data_digest(root: str | Path, paths: list[Path]) -> str:
    """Names the training images (their paths under --data, in order): what a checkpoint was trained on."""
    names = "\n".join(str(path.relative_to(root)) for path in paths)
    return hashlib.sha256(names.encode()).hexdigest()


def resume_from_checkpoint(run: VQTraining, config: VQTrainConfig, settings: dict[str, Any]) -> str | None:
    """--resume auto: load the newest intact checkpoint of --out into `run` after checking it continues this run
    exactly; returns its folder (None: no checkpoint yet, a fresh start)."""
    checkpoint = read_newest_vq_checkpoint(config.out_dir)
    if checkpoint is None and (Path(config.out_dir) / "vq.pt").exists():
        raise ValueError(f"--resume auto: --out {config.out_dir} holds a vq.pt but no checkpoint to continue from; "
                         "choose a new --out")
    if checkpoint is None:
        return None
    folder = Path(config.out_dir) / CHECKPOINTS / f"step-{checkpoint.step:07d}"
    saved = dict(checkpoint.settings)
    if saved.get("discriminator") is None or settings["discriminator"] is None:  # turning the GAN on or off is a
        saved["discriminator"] = settings["discriminator"]  # change a resume may make (a new discriminator starts)
    differences = settings_differences(saved, settings)
    if differences:
        raise ValueError(f"--resume auto: {folder} cannot be continued exactly by this run:\n  "
                         + "\n  ".join(differences) + "\nResume with the checkpoint's settings and data, or start "
                         "a new --out")
    if checkpoint.step > config.steps:
        raise ValueError(f"--resume auto: {folder} is at step {checkpoint.step}, past --steps {config.steps}; pass "
                         f"--steps {checkpoint.step} or more")
    if checkpoint.step == config.steps and (Path(config.out_dir) / "vq.pt").exists():
        raise ValueError(f"--out {config.out_dir} already finished its {config.steps} steps (vq.pt); pass a larger "
                         "--steps to train it longer, or choose a new --out")
    run.load_checkpoint(checkpoint)  # the loop sets each step's learning rate from this run's flags
    return str(folder)


def train_vq(config: VQTrainConfig, stop=None) -> dict[str, Any]:
    """Train, evaluate on held-out images, write checkpoint + config + metrics; return the metrics dict.

    --out is locked for the run (star.lock.folder_lock): a second trainer on it is refused. SIGINT / SIGTERM stop
    the run at a step boundary with a checkpoint (StopRequested); `stop` replaces the signal handlers (tests)."""
    started = time.time()
    vq_config = VQConfig.resolve(config.vq_config)
    if config.image_size % vq_config.downsample:
        raise ValueError(f"--image-size {config.image_size} must be a multiple of the VQ downsample factor "
                         f"{vq_config.downsample} ({config.vq_config})")
    device = pick_device(config.device)
    all_paths = list_images(config.data_root)
    train_paths, holdout_paths = split_holdout(
        all_paths, config.holdout_fraction, config.max_holdout_images, config.seed
    )
    settings = config.resume_settings(vq_config, data_digest(config.data_root, train_paths))
    with contextlib.ExitStack() as held:
        claim_vq_folder(config, held)
        run = build_training(config, vq_config, device)
        dataset = RandomCropImages(train_paths, config.image_size, config.min_crop_fraction, config.seed)
        holdout_pixels = torch.from_numpy(
            np.stack([center_crop_array(_load_rgb(p), config.image_size) for p in holdout_paths])
        ).permute(0, 3, 1, 2) if holdout_paths else None  # [N, 3, S, S] uint8
        before = evaluate_reconstruction(run.model, holdout_pixels, config.eval_batch_size) if holdout_paths else None
        resumed_from = resume_from_checkpoint(run, config, settings) if config.resume else None
        write_json_atomic(Path(config.out_dir) / "train_config.json", dataclasses.asdict(config))
        stop = stop or held.enter_context(SignalStop())  # from here on, Ctrl-C / SIGTERM end with a checkpoint
        print(f"training VQ: steps {run.step + 1}..{config.steps}, a checkpoint every {config.ckpt_every} steps in "
              f"{Path(config.out_dir) / CHECKPOINTS}", flush=True)
        precision = train_loop(run, dataset, config, settings, stop)
        train_seconds = time.time() - started
        run.model.eval()
        after = evaluate_reconstruction(run.model, holdout_pixels, config.eval_batch_size) if holdout_paths else None
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
            "gan": {"disc_weight": config.disc_weight, "disc_start": config.disc_start} if run.discriminator else None,
            "perceptual": config.perceptual,
            "resumed_from": resumed_from,
            **training_metrics(run, precision),
            "train_seconds": round(train_seconds, 2),
            "device": str(device),
        }
        return _write_outputs(run.model, config, metrics)


def _write_outputs(model: VQModel, config: VQTrainConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / "vq.pt"
    gan = f"PatchGAN weight {config.disc_weight} from step {config.disc_start}" if config.uses_discriminator else "no GAN"
    config_path = save_vq_checkpoint(model, checkpoint_path, extra={
        "note": f"trained by star.vq.train (L2 + codebook losses, {gan}; no LPIPS)",
        "image_size": config.image_size,
    })
    metrics = {**metrics, "checkpoint": str(checkpoint_path), "vq_config": str(config_path)}
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def format_summary(metrics: dict[str, Any]) -> str:
    lines = [
        f"VQ training: {metrics['steps']} steps x {metrics['batch_size']} crops of {metrics['image_size']} px "
        f"on {metrics['num_train_images']} images, {metrics['train_seconds']:.1f} s on {metrics['device']}",
        f"  train reconstruction MSE (last 50 steps, [-1,1] scale): {metrics['train_reconstruction_mse_last50']:.4f}"
        f"; codes re-seeded: {metrics['codes_restarted']}",
    ]
    if metrics["train_gan_weight_last50"] is not None:
        lines.append(f"  GAN (last 50 steps): generator {metrics['train_gan_generator_loss_last50']:.4f}, "
                     f"discriminator {metrics['train_gan_discriminator_loss_last50']:.4f}, weight "
                     f"{metrics['train_gan_weight_last50']:.4f}")
    if metrics["holdout_psnr"] is not None:
        lines.append(
            f"  held-out ({metrics['num_holdout_images']} images, centre crops): PSNR {metrics['holdout_psnr']:.2f} dB "
            f"(untrained {metrics['holdout_psnr_untrained']:.2f}); codebook usage "
            f"{metrics['holdout_codebook_usage']:.1%} ({metrics['holdout_codes_used']}/{metrics['codebook_size']})"
        )
    lines.append(f"  wrote {metrics['checkpoint']}, {metrics['vq_config']}, "
                 f"{Path(metrics['checkpoint']).parent / 'metrics.json'}")
    return "\n".join(lines)

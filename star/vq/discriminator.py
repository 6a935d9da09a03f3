"""The tokenizer's adversarial loss: a PatchGAN discriminator, the hinge loss and the adaptive weight.

What LlamaGen's VQ training uses (after taming-transformers / pix2pix): a convolutional discriminator whose
output is a grid of logits, one per overlapping image patch; the hinge loss for the discriminator and -mean(logits
on reconstructions) for the generator; the generator's GAN term scaled by the ratio of the reconstruction loss's
gradient norm to the GAN loss's gradient norm at the decoder's last layer (clamped), times a fixed weight.

The perceptual (LPIPS) term LlamaGen also uses needs VGG16 weights downloaded from the internet; this offline
project ships none, so `perceptual_loss("none")` is the only choice (see PERCEPTUAL_CHOICES).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2  # pix2pix / taming: LeakyReLU(0.2) after every conv but the last
ADAPTIVE_WEIGHT_MAX = 1e4  # LlamaGen/taming clamp the gradient-norm ratio to [0, 1e4]
GRADIENT_NORM_EPS = 1e-4  # added to the GAN gradient norm so a vanishing one does not divide by zero


class PatchDiscriminator(nn.Module):
    """`layers` stride-2 4x4 convs (widths channels x 1, 2, 4, 8, ... capped at 8x), then a stride-1 4x4 conv
    and a 1-channel stride-1 4x4 conv: [B, 3, S, S] -> logits [B, 1, S / 2**layers - 2, S / 2**layers - 2].

    BatchNorm after every conv but the first and the last (the pix2pix / taming choice); the discriminator only
    ever runs in training mode, on one batch of real or one batch of reconstructed images at a time.
    """

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(LEAKY_SLOPE)]
        width = channels
        for index in range(1, layers + 1):
            stride = 2 if index < layers else 1  # the last widening conv keeps the resolution
            next_width = channels * min(2**index, 8)
            blocks += [nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(next_width), nn.LeakyReLU(LEAKY_SLOPE)]
            width = next_width
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = layers
        self.main = nn.Sequential(*blocks)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def discriminator_logits_side(image_size: int, layers: int) -> int:
    """Side of the PatchDiscriminator's logit grid for images of `image_size` px (<= 0: too small)."""
    side = image_size
    for _ in range(layers):
        side = (side + 2 - 4) // 2 + 1  # 4x4 conv, stride 2, padding 1
    return side - 2  # two 4x4 convs, stride 1, padding 1


def _init_weights(module: nn.Module) -> None:
    """pix2pix's initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), norm shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))): zero once real logits are >= 1 and fake <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's term: -mean(D(reconstruction)) (the hinge GAN's generator loss)."""
    return -logits_fake.mean()


def adaptive_gan_weight(reconstruction_loss: torch.Tensor, gan_loss: torch.Tensor,
                        last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d W|| / (||d gan / d W|| + 1e-4), clamped to [0, 1e4], detached; W = the decoder's last weight.

    Balances the two terms where they meet the image: the GAN term then moves the decoder's output as strongly as
    the reconstruction term does, whatever the scale of the discriminator's logits.
    """
    (reconstruction_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    ratio = reconstruction_grad.norm() / (gan_grad.norm() + GRADIENT_NORM_EPS)
    return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


# --------------------------------------------------------------------------------------------------------------
# The perceptual term's place
# --------------------------------------------------------------------------------------------------------------
PERCEPTUAL_CHOICES = ("none", "lpips")
LPIPS_UNAVAILABLE = ("--perceptual lpips needs LPIPS's VGG16 weights, downloaded from the internet; this offline "
                     "project ships none: use --perceptual none (the reconstruction and GAN terms only)")

PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (reconstruction, images) -> scalar


def perceptual_loss(name: str) -> PerceptualLoss | None:
    """The perceptual term for --perceptual: None for "none". A perceptual loss (e.g. LPIPS with local weights)
    plugs in here as a callable (reconstruction [B, 3, S, S], images [B, 3, S, S], both in [-1, 1]) -> scalar;
    the trainer adds it, times --perceptual-weight, to the reconstruction loss."""
    if name == "none":
        return None
    if name == "lpips":
        raise ValueError(LPIPS_UNAVAILABLE)
    raise ValueError(f"--perceptual {name!r}: choose one of {', '.join(PERCEPTUAL_CHOICES)}")

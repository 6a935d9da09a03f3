"""View policies: how each source image becomes V square crops, with each crop's box in source pixels.

`tencrop` is LlamaGen's extraction geometry exactly: ADM centre crop to `int(crop_range * size)`, then the four
corners and the centre, then the same five of the mirrored image (torchvision TenCrop order). `random:N` is N
random-resized crops with flips, seeded per image so a rerun reproduces them. `center` is one centre crop.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from star.runtime import key_seed

TENCROP_VIEWS = 10
MAX_RANDOM_VIEWS = 64  # random:N; LlamaGen stores 10 per image
VIEW_POLICY_CHOICES = ("tencrop", "center", "random:N")


@dataclass(frozen=True)
class ViewPolicy:
    name: str  # "tencrop" | "random" | "center"
    num_random: int = 0  # N for random:N

    @classmethod
    def parse(cls, spec: str) -> "ViewPolicy":
        """'tencrop' | 'center' | 'random:N' (1 <= N <= MAX_RANDOM_VIEWS), lower-case exactly: one spelling each."""
        if spec in ("tencrop", "center"):
            return cls(spec)
        if spec.startswith("random:"):
            count_text = spec.split(":", 1)[1]
            count = int(count_text) if count_text.isascii() and count_text.isdigit() else 0
            if 1 <= count <= MAX_RANDOM_VIEWS:
                return cls("random", count)
            raise ValueError(f"view policy {spec!r}: N in random:N must be an integer from 1 to {MAX_RANDOM_VIEWS} "
                             f"(all N views of an image are encoded in one batch and stored in one sample)")
        raise ValueError(f"unknown view policy {spec!r}: choose one of {', '.join(VIEW_POLICY_CHOICES)} "
                         "(lower-case)")

    @property
    def num_views(self) -> int:
        return {"tencrop": TENCROP_VIEWS, "center": 1}.get(self.name, self.num_random)

    def __str__(self) -> str:
        return f"random:{self.num_random}" if self.name == "random" else self.name


@dataclass(frozen=True)
class View:
    pixels: np.ndarray  # [S, S, 3] uint8, what the tokenizer sees
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in source-image pixels
    flip: bool  # True: the crop was mirrored horizontally after cropping


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (CMYK, P, RGBA, LA, I;16, I, F, L, 1) to 8-bit RGB; transparency composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            peak = max(float(values.max()), 1.0)
        else:  # 16-bit PNGs open as I;16 or I; an "I" image whose values fit a byte is already 8-bit
            peak = 255.0 if image.mode == "I" and values.max() <= 255 else 65535.0
        gray = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def adm_center_crop(image: Image.Image, crop_size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """ADM's centre crop (as LlamaGen's `center_crop_arr`): BOX-halve while the short side >= 2*crop_size,
    BICUBIC-resize the short side to crop_size, take the centre. Small images are upscaled the same way.

    Returns the crop [crop_size, crop_size, 3] and its box in source pixels.
    """
    source_w, source_h = image.size
    while min(image.size) >= 2 * crop_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = crop_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    resized_h, resized_w = pixels.shape[:2]
    top = (resized_h - crop_size) // 2
    left = (resized_w - crop_size) // 2
    # Map the resized frame back to the source frame (the halvings and the resize compose to one scale per axis).
    sx, sy = source_w / resized_w, source_h / resized_h
    box = (left * sx, top * sy, (left + crop_size) * sx, (top + crop_size) * sy)
    return pixels[top : top + crop_size, left : left + crop_size], box


def five_crop_offsets(frame: int, size: int) -> list[tuple[int, int]]:
    """(left, top) of torchvision's FiveCrop on a square frame: tl, tr, bl, br, centre."""
    far = frame - size
    centre = int(round(far / 2.0))
    return [(0, 0), (far, 0), (0, far), (far, far), (centre, centre)]


def tencrop_views(image: Image.Image, size: int, crop_range: float) -> list[View]:
    frame_size = int(size * crop_range)
    if frame_size < size:
        raise ValueError(f"--crop-range {crop_range} must be >= 1.0 (the ten crops are taken inside the frame)")
    frame, (fx0, fy0, fx1, fy1) = adm_center_crop(image, frame_size)
    scale_x, scale_y = (fx1 - fx0) / frame_size, (fy1 - fy0) / frame_size
    mirrored = frame[:, ::-1]
    views = []
    for flipped, source in ((False, frame), (True, mirrored)):
        for left, top in five_crop_offsets(frame_size, size):
            pixels = np.ascontiguousarray(source[top : top + size, left : left + size])
            # A crop of the mirrored frame at `left` covers frame columns [F - left - size, F - left).
            frame_left = frame_size - left - size if flipped else left
            box = (
                fx0 + frame_left * scale_x,
                fy0 + top * scale_y,
                fx0 + (frame_left + size) * scale_x,
                fy0 + (top + size) * scale_y,
            )
            views.append(View(pixels, box, flipped))
    return views


def random_views(
    image: Image.Image,
    size: int,
    count: int,
    key: str,
    seed: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> list[View]:
    """Random-resized crops (area fraction in `scale`, aspect in `ratio`) with random flips, seeded by (seed, key)."""
    rng = random.Random(key_seed(key, seed))  # the image's own stream: a rerun reproduces its views
    width, height = image.size
    views = []
    for _ in range(count):
        crop_w, crop_h = width, height
        left, top = 0, 0
        for _attempt in range(10):
            area = width * height * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            candidate_w = int(round(math.sqrt(area * aspect)))
            candidate_h = int(round(math.sqrt(area / aspect)))
            if 0 < candidate_w <= width and 0 < candidate_h <= height:
                crop_w, crop_h = candidate_w, candidate_h
                left = rng.randint(0, width - crop_w)
                top = rng.randint(0, height - crop_h)
                break
        else:  # fall back to the largest centred square, as torchvision does in spirit
            crop_w = crop_h = min(width, height)
            left, top = (width - crop_w) // 2, (height - crop_h) // 2
        flipped = rng.random() < 0.5
        crop = image.resize((size, size), resample=Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(crop)
        if flipped:
            pixels = pixels[:, ::-1]
        views.append(View(np.ascontiguousarray(pixels), (float(left), float(top), float(left + crop_w), float(top + crop_h)), flipped))
    return views


def make_views(image: Image.Image, policy: ViewPolicy, size: int, crop_range: float, key: str, seed: int) -> list[View]:
    image = to_rgb(image)
    if policy.name == "tencrop":
        return tencrop_views(image, size, crop_range)
    if policy.name == "center":
        return tencrop_views(image, size, crop_range)[4:5]
    return random_views(image, size, policy.num_random, key, seed)

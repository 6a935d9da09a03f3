"""LlamaGen's VQ image tokenizer (VQ-16 / VQ-8), checkpoint-compatible with the official release.

Module and parameter names match LlamaGen's `tokenizer/tokenizer_image/vq_model.py`, so an official
`vq_ds16_c2i.pt` loads strictly.

Public API:
    VQConfig.resolve(spec)            preset name ("VQ-16", "VQ-8", "VQ-tiny"), JSON file, dict or VQConfig
    VQModel(config)                   encode_indices / decode_indices / forward / codebook_vectors
    load_vq(ckpt_path, config)        strict load of an official (or our) checkpoint, eval mode
    save_vq_checkpoint(model, path)   `{"model": state_dict}` + `<path>.json` config, both atomic
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from star.io import atomic_path, load_torch_weights, write_json_atomic

# LlamaGen keeps a rolling queue of this many recent code indices to log codebook usage during training.
CODEBOOK_USAGE_QUEUE_LENGTH = 65536
GROUP_NORM_GROUPS = 32  # LlamaGen's Normalize(): GroupNorm(32, C, eps=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------
@dataclass
class VQConfig:
    """LlamaGen `ModelArgs` field names, plus the encoder/decoder base width `ch` and `num_res_blocks`."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        problems = []
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = getattr(self, name)
            if not mult or any(m <= 0 for m in mult):
                problems.append(f"{name}={list(mult)} must be a non-empty list of positive ints")
            elif any((self.ch * m) % GROUP_NORM_GROUPS for m in mult):
                problems.append(
                    f"every level width ch*mult must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm groups, as in "
                    f"LlamaGen); got ch={self.ch}, {name}={list(mult)}"
                )
        if problems:
            raise ValueError("invalid VQ config: " + "; ".join(problems))

    @property
    def downsample(self) -> int:
        """Image pixels per token side: 16 for VQ-16 (256 px -> 16x16 tokens)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["encoder_ch_mult"] = list(self.encoder_ch_mult)
        out["decoder_ch_mult"] = list(self.decoder_ch_mult)
        return out

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], source: str = "<dict>") -> "VQConfig":
        """Build from a plain field dict or LlamaGen-style `{"config": {...}, ...}`; unknown fields are an error."""
        if "config" in fields and isinstance(fields["config"], Mapping):
            fields = fields["config"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"unknown VQ config field(s) {unknown} in {source}; known fields are {sorted(known)}. "
                "Fix the spelling or remove them."
            )
        try:
            return cls(**dict(fields))
        except (TypeError, ValueError) as error:
            raise ValueError(f"bad VQ config in {source}: {error}") from error

    @classmethod
    def resolve(cls, spec: "VQConfig | str | os.PathLike | Mapping[str, Any]") -> "VQConfig":
        """A preset name (see VQ_PRESETS), a JSON file path, a dict of fields, or a VQConfig (returned as is)."""
        if isinstance(spec, VQConfig):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, str) and spec in VQ_PRESETS:
            return dataclasses.replace(VQ_PRESETS[spec])
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"VQ config {str(spec)!r} is neither a preset ({', '.join(VQ_PRESETS)}) nor an existing JSON file"
            )
        try:
            fields = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"VQ config {path} is not a JSON config file ({type(error).__name__}): give a preset "
                             f"({', '.join(VQ_PRESETS)}) or the .json written beside the checkpoint") from error
        if not isinstance(fields, Mapping):
            raise ValueError(f"VQ config file {path} must hold a JSON object, got {type(fields).__name__}")
        return cls.from_dict(fields, source=str(path))


VQ_PRESETS: dict[str, VQConfig] = {
    # LlamaGen's two released tokenizers.
    "VQ-16": VQConfig(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
    # Not LlamaGen's: a CPU-sized member of the same family for demos (downsample 8, 512 codes).
    "VQ-tiny": VQConfig(
        codebook_size=512, encoder_ch_mult=(1, 2, 2, 2), decoder_ch_mult=(1, 2, 2, 2), z_channels=64, ch=32,
        num_res_blocks=1,
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUP_NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout_p: float):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout_p)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # [B, 1, h*w, C]: one head; SDPA's default scale C^-0.5 is LlamaGen's
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, 1, h*w, C]
        attended = attended.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pad right and bottom only (asymmetric), as LlamaGen/taming do
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `res` blocks, optional `attn` blocks, optional `downsample`/`upsample`."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block_index, res_block in enumerate(self.res):
            h = res_block(h)
            if len(self.attn) > 0:
                h = self.attn[block_index](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class Encoder(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        ch, ch_mult = config.ch, config.encoder_ch_mult
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            is_last = level == len(ch_mult) - 1
            block = _Level()
            block_in = ch * in_ch_mult[level]
            for _ in range(config.num_res_blocks):
                block.res.append(ResnetBlock(block_in, ch * mult, config.dropout_p))
                block_in = ch * mult
                if is_last:  # attention only at the lowest resolution
                    block.attn.append(AttnBlock(block_in))
            if not is_last:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, config.dropout_p), AttnBlock(block_in),
             ResnetBlock(block_in, block_in, config.dropout_p)]
        )
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for block in self.conv_blocks:
            h = block(h)
        for mid_block in self.mid:
            h = mid_block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Levels are stored lowest resolution first: `conv_blocks.0` mirrors the encoder's last level."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, ch_mult = config.ch, config.decoder_ch_mult
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, config.dropout_p), AttnBlock(block_in),
             ResnetBlock(block_in, block_in, config.dropout_p)]
        )
        self.conv_blocks = nn.ModuleList()
        for level, mult in enumerate(reversed(ch_mult)):
            block = _Level()
            for _ in range(config.num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, ch * mult, config.dropout_p))
                block_in = ch * mult
                if level == 0:
                    block.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latents)
        for mid_block in self.mid:
            h = mid_block(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh: roughly [-1, 1], clamp when saving


# --------------------------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------------------------
@dataclass
class VQLosses:
    """Codebook terms as LlamaGen's quantizer computes them (add them, weighted, to the reconstruction loss)."""

    vq_loss: torch.Tensor  # mean((z_q - sg(z))^2): moves codes toward encoder outputs
    commit_loss: torch.Tensor  # beta * mean((sg(z_q) - z)^2): keeps encoder outputs near their codes
    entropy_loss: torch.Tensor  # ratio * (per-sample entropy - batch entropy) of softmax(-d / 0.01); 0 by default
    codebook_usage: float = field(default=0.0)  # fraction of codes in the rolling training queue (training only)

    @property
    def total(self) -> torch.Tensor:
        return self.vq_loss + self.commit_loss + self.entropy_loss


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-sample entropy minus the entropy of the mean assignment (low = confident and diverse).

    affinity: [N, K] (LlamaGen passes minus the squared distances).
    """
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    mean_probs = probs.mean(dim=0)
    batch_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(dim=-1).mean()
    return sample_entropy - batch_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.embed_dim = config.codebook_embed_dim
        self.beta = config.commit_loss_beta
        self.entropy_loss_ratio = config.entropy_loss_ratio
        self.l2_norm = config.codebook_l2_norm
        self.show_usage = config.codebook_show_usage
        self.embedding = nn.Embedding(self.codebook_size, self.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.codebook_size, 1.0 / self.codebook_size)
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if self.show_usage:
            # float, as in LlamaGen's checkpoints; holds recent indices (training only)
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_QUEUE_LENGTH))

    def codebook_vectors(self) -> torch.Tensor:
        """[K, C]: the codebook as used (L2-normalised when codebook_l2_norm)."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def _distances(self, z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        # [N, K] squared distances, |z|^2 + |e|^2 - 2 z.e, the same expansion LlamaGen uses (so ties break alike).
        # Always float32, also under bf16 autocast: a bf16 matmul here would change which code wins.
        with torch.autocast(device_type=z_flat.device.type, enabled=False):
            z_flat, codebook = z_flat.float(), codebook.float()
            return (
                z_flat.pow(2).sum(dim=1, keepdim=True)
                + codebook.pow(2).sum(dim=1)
                - 2.0 * z_flat @ codebook.t()
            )

    def prepare_latents(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, h, w, C] channel-last, L2-normalised when codebook_l2_norm."""
        z = z.permute(0, 2, 3, 1).contiguous()
        return F.normalize(z, p=2, dim=-1) if self.l2_norm else z

    def nearest_code_indices(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] encoder latents -> [B, h, w] int64 code indices (raster order)."""
        z = self.prepare_latents(z)  # [B, h, w, C]
        distances = self._distances(z.reshape(-1, self.embed_dim), self.codebook_vectors())
        return distances.argmin(dim=1).reshape(z.shape[:3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, h, w] code indices -> [B, C, h, w] code vectors."""
        return self.codebook_vectors()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, VQLosses, torch.Tensor]:
        """[B, C, h, w] -> (straight-through quantized [B, C, h, w], VQLosses, indices [B, h, w])."""
        z = self.prepare_latents(z)  # [B, h, w, C]
        z_flat = z.reshape(-1, self.embed_dim)  # [N, C]
        codebook = self.codebook_vectors()  # [K, C]
        distances = self._distances(z_flat, codebook)  # [N, K]
        flat_indices = distances.argmin(dim=1)  # [N]
        z_q = codebook[flat_indices].view(z.shape)  # [B, h, w, C]

        usage = 0.0
        if self.show_usage and self.training:
            with torch.no_grad():  # rolling queue of the latest indices, newest last
                recent = flat_indices[-CODEBOOK_USAGE_QUEUE_LENGTH:].to(self.codebook_used.dtype)
                self.codebook_used.copy_(torch.cat([self.codebook_used[len(recent):], recent]))
                usage = len(torch.unique(self.codebook_used)) / self.codebook_size

        vq_loss = torch.mean((z_q - z.detach()) ** 2)
        commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
        if self.entropy_loss_ratio > 0:
            entropy = self.entropy_loss_ratio * entropy_loss(-distances)
        else:
            entropy = z_flat.new_zeros(())
        losses = VQLosses(vq_loss=vq_loss, commit_loss=commit_loss, entropy_loss=entropy, codebook_usage=usage)

        z_q = z + (z_q - z).detach()  # straight-through: forward = code, backward = identity to z
        return z_q.permute(0, 3, 1, 2).contiguous(), losses, flat_indices.view(z.shape[:3])


# --------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------
class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> pre-quantization latents [B, C, H/ds, W/ds]."""
        return self.quant_conv(self.encoder(images))

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] code vectors -> [B, 3, h*ds, w*ds] images (unclamped)."""
        return self.decoder(self.post_quant_conv(quantized))

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, H/ds, W/ds] int64 token ids, raster order (row y, then column x)."""
        return self.quantize.nearest_code_indices(self.encode_latents(images))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, h, w] token ids -> [B, 3, h*ds, w*ds] images, unclamped (LlamaGen's decode_code)."""
        if indices.dim() != 3:
            raise ValueError(f"decode_indices wants token ids shaped [B, h, w], got {tuple(indices.shape)}")
        return self.decode_latents(self.quantize.lookup(indices.long()))

    def codebook_vectors(self) -> torch.Tensor:
        """[K, C] L2-normalised codebook (as used for lookup and search)."""
        return self.quantize.codebook_vectors()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, VQLosses]:
        """Training path: (reconstruction [B, 3, H, W], VQLosses), gradients via the straight-through estimator."""
        quantized, losses, _ = self.quantize(self.encode_latents(images))
        return self.decode_latents(quantized), losses


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------
_USAGE_BUFFER_KEY = "quantize.codebook_used"


def _unwrap_state_dict(checkpoint: Any, ckpt_path: Path) -> dict[str, torch.Tensor]:
    """Official `{"model": sd}`; also training states (`"ema"` preferred, as vq_demo.py does), `"state_dict"`, raw."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"VQ checkpoint {ckpt_path} holds a {type(checkpoint).__name__}, not a state dict")
    for container in ("ema", "model", "state_dict"):
        if isinstance(checkpoint.get(container), Mapping):
            checkpoint = checkpoint[container]
            break
    state_dict = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not state_dict:
        raise ValueError(
            f"VQ checkpoint {ckpt_path} has no tensors (top-level keys: {sorted(checkpoint)[:8]}); "
            "expected an official LlamaGen VQ file such as vq_ds16_c2i.pt ({'model': state_dict})"
        )
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def load_vq(
    ckpt_path: str | os.PathLike,
    config: "VQConfig | str | os.PathLike | Mapping[str, Any] | None" = None,
) -> VQModel:
    """Load a VQ checkpoint strictly into a fresh VQModel in eval mode (float32, CPU; move it yourself).

    `config` is anything VQConfig.resolve accepts; None uses the JSON beside the checkpoint (`<ckpt>.json`).
    Only the usage-logging buffer `quantize.codebook_used` may be missing (or extra when show_usage is off).
    """
    ckpt_path = Path(ckpt_path)
    if config is None:
        sidecar = ckpt_path.with_suffix(".json")
        if not sidecar.is_file():
            raise ValueError(
                f"no VQ config given for {ckpt_path} and no {sidecar.name} beside it; pass --vq-config "
                f"(a preset: {', '.join(VQ_PRESETS)}; or a JSON file)"
            )
        config = sidecar
    config = VQConfig.resolve(config)
    state_dict = _unwrap_state_dict(load_torch_weights(ckpt_path), ckpt_path)

    model = VQModel(config)
    expected = model.state_dict()
    from star.weights import raise_if_mismatched

    raise_if_mismatched(
        expected, state_dict, ignore=(_USAGE_BUFFER_KEY,),
        header=f"VQ checkpoint {ckpt_path} does not match the VQ config {config.to_dict()}",
        advice="Check --vq-config: it must be the config the checkpoint was trained with (VQ-16 for "
        "vq_ds16_c2i.pt, VQ-8 for vq_ds8_c2i.pt, the JSON written beside a checkpoint you trained).",
    )
    state_dict = {key: value for key, value in state_dict.items() if key in expected}
    model.load_state_dict(state_dict, strict=False)  # completeness was checked above
    return model.eval()


def save_vq_checkpoint(model: VQModel, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `{"model": state_dict}` (LlamaGen's format) atomically, and `{"config": ...}` to `<path>.json`.

    Returns the config path. `extra` is merged into the JSON (e.g. provenance); it never goes into the .pt.
    """
    path = Path(path)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state_dict}, tmp)
    config_path = path.with_suffix(".json")
    write_json_atomic(config_path, {"config": model.config.to_dict(), **dict(extra or {})})
    return config_path

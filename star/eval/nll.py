"""Held-out negative log-likelihood: how well a checkpoint predicts tokens it never trained on.

The teacher-forced next-token NLL of every held-out image (one stored view each), in eval mode (no dropout),
with the plain causal mask (no ST-AR key mask), computed twice: with the true class label, and with the null
class (the unconditional model CFG uses). Reported in nats per token and in bits per dimension of the image:
NLL in bits of the whole token grid over the image's H x W x 3 values. Unlike the training log's L_AR, this is
the same quantity for every run, whatever its losses, masks and views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from star.data.manifest import Manifest, shard_tokens
from star.eval.understanding import AnalysisModel
from star.gpt.model import GPT
from star.io import check_output_file, is_json_with, write_json_atomic
from star.settings import check, setting


@dataclass
class NllConfig:
    """Settings of `evaluate/run.py nll`."""

    generator: AnalysisModel
    shards: str = setting(help="held-out token shards (e.g. the test split, tokenized with --view-policy center)")
    out: str = setting(help="output .json file")
    view: int = setting(0, help="which stored view of each image")
    limit: int = setting(0, help="at most this many images (0 = all)")
    batch_size: int = setting(256, help="sequences per forward pass")
    overwrite: bool = setting(False, help="replace --out even if it is not an NLL record this tool wrote")

    def __post_init__(self) -> None:
        check(bool(self.shards), "--shards is required")
        check(bool(self.out), "--out is required")
        check(self.view >= 0, f"--view {self.view}: must be >= 0")
        check(self.limit >= 0, f"--limit {self.limit}: must be >= 0 (0 = all)")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")


@torch.inference_mode()
def token_nll(model: GPT, tokens: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Mean next-token NLL in nats per token of `tokens` [N, T] given class `labels` [N] (eval mode)."""
    model.eval()
    device = model.tok_embeddings.weight.device
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start : start + batch_size]).to(device)  # [b, T]
        classes = torch.from_numpy(labels[start : start + batch_size]).to(device)  # [b]
        loss = model(batch[:, :-1], classes, targets=batch).loss  # mean over the b x T predicted tokens
        total += float(loss) * batch.numel()
        count += batch.numel()
    return total / count


def bits_per_dim(nats_per_token: float, tokens_per_image: int, image_size: int) -> float:
    return nats_per_token * tokens_per_image / math.log(2) / (image_size * image_size * 3)


def run_nll(config: NllConfig) -> dict:
    """Held-out NLL with and without the label; writes `out` and returns the same record."""
    check_output_file(config.out, "--out", "NLL record", lambda path: is_json_with(path, "conditional", "unconditional"),
                      inputs=(config.shards, config.generator.ckpt), overwrite=config.overwrite)
    model = config.generator.load()
    manifest = Manifest.load(config.shards)
    tokens, labels = shard_tokens(config.shards, config.view, config.limit)  # [N, T], [N]
    if tokens.shape[1] != model.config.block_size:
        raise ValueError(f"--shards {config.shards}: {tokens.shape[1]} tokens per image, the model's block_size is "
                         f"{model.config.block_size}; score it on shards of its own tokenizer and image size")
    if labels.max() >= model.config.num_classes:
        raise ValueError(f"--shards {config.shards}: class id {labels.max()} but the model has "
                         f"{model.config.num_classes} classes")
    config.generator.check_shards(config.shards)  # after the grid: a foreign grid is the plainer message
    record = {"images": len(tokens), "tokens_per_image": int(tokens.shape[1]), "image_size": manifest.image_size,
              "view": config.view, "shards": str(config.shards), "ckpt": config.generator.ckpt}
    null = np.full_like(labels, model.config.null_class)
    for name, given in (("conditional", labels), ("unconditional", null)):
        nats = token_nll(model, tokens, given, config.batch_size)
        record[name] = {"nats_per_token": nats,
                        "bits_per_dim": bits_per_dim(nats, tokens.shape[1], manifest.image_size)}
    write_json_atomic(Path(config.out), record)
    return record


def format_nll(result: dict) -> str:
    lines = [f"held-out NLL of {result['images']} images ({result['tokens_per_image']} tokens, "
             f"{result['image_size']} px), {result['ckpt']}", "  label          nats/token  bits/dim"]
    for name in ("conditional", "unconditional"):
        lines.append(f"  {name:<13} {result[name]['nats_per_token']:>10.4f}  {result[name]['bits_per_dim']:>8.4f}")
    return "\n".join(lines)

"""One argv builder per stage command: the study runs the project's own commands, nothing study-only.

Every flag name the study uses appears here and nowhere else in star/study.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def script(relative: str) -> list[str]:
    return [sys.executable, str(REPO / relative)]


def vq_train_argv(data: Path, out: Path, config_json: Path, steps: int, batch_size: int,
                  preset_flags: list[str] = ()) -> list[str]:
    return script("tokenize/train_vq.py") + ["--data", str(data), "--out", str(out), "--config", str(config_json),
                                              "--image-size", "32", "--steps", str(steps), "--batch-size",
                                              str(batch_size), "--resume", "auto", "--no-progress", *preset_flags]


def tokenize_argv(data: Path, out: Path, vq_ckpt: Path, vq_config: Path, views: str) -> list[str]:
    return script("tokenize/run.py") + ["--data", str(data), "--out", str(out), "--vq-ckpt", str(vq_ckpt),
                                         "--vq-config", str(vq_config), "--image-size", "32", "--view-policy", views,
                                         "--crop-range", "1.1", "--shard-size", "5000", "--batch-size", "256",
                                         "--num-workers", "0", "--no-progress"]


def train_argv(shards: Path, out: Path, model_json: Path, steps: int, batch_size: int, lr: float, seed: int,
               arm_flags: list[str]) -> list[str]:
    return script("train/run.py") + ["--shards", str(shards), "--out", str(out), "--model", str(model_json),
                                      "--steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr),
                                      "--seed", str(seed), "--num-workers", "0", "--log-every", "25",
                                      "--ckpt-every", str(steps), "--keep-checkpoints", "1", "--resume", "auto",
                                      "--no-progress", *arm_flags]


def fine_tune_flags(init_checkpoint: Path, warmup_steps: int) -> list[str]:
    """train/run.py flags of a fine-tune: its weights, AdamW moments and compute from `init_checkpoint`; the lr and
    the self-guided weights ramped up over `warmup_steps`."""
    return ["--init-from", str(init_checkpoint), "--warmup-steps", str(warmup_steps), "--star-warmup-steps",
            str(warmup_steps)]


def sample_argv(run: Path, out: Path, vq_ckpt: Path, vq_config: Path, cfg_scale: float, num_samples: int,
                seed: int) -> list[str]:
    return script("evaluate/run.py") + ["sample", "--ckpt", str(run), "--out", str(out), "--vq-ckpt", str(vq_ckpt),
                                         "--vq-config", str(vq_config), "--cfg-scale", str(cfg_scale),
                                         "--num-samples", str(num_samples), "--batch-size", "250", "--seed",
                                         str(seed), "--no-progress"]


def fid_argv(samples: Path, reference: Path, out_json: Path, cache_dir: Path, precision: str = "fp32") -> list[str]:
    return script("evaluate/run.py") + ["fid", "--samples", str(samples), "--ref", str(reference), "--out",
                                         str(out_json), "--cache-dir", str(cache_dir), "--batch-size", "100",
                                         "--precision", precision]


def probe_argv(run: Path, train_shards: Path, test_shards: Path, out: Path, positions: list[int],
               train_limit: int) -> list[str]:
    # --limit caps both splits: keep it >= the test split so the probe scores every test image
    return script("evaluate/run.py") + ["probe", "--ckpt", str(run), "--shards", str(train_shards), "--eval-shards",
                                         str(test_shards), "--positions", ",".join(map(str, positions)), "--view", "0",
                                         "--limit", str(train_limit), "--out", str(out)]


def nll_argv(ckpt: Path, shards: Path, out_json: Path) -> list[str]:
    return script("evaluate/run.py") + ["nll", "--ckpt", str(ckpt), "--shards", str(shards), "--out", str(out_json)]

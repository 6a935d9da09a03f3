"""What a run derives from its config (`TrainConfig`, the flags), the shards and the launch, once: the `TrainPlan`
(the model config, the ST-AR settings with the layer and the decay resolved, the batch split, the run length, the
lr, the data's identity), written as the run folder's config.json."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any

from star.data.manifest import Manifest
from star.gpt.config import GPTConfig, preset_name
from star.settings import check
from star.train.config import TrainConfig
from star.train.run_folder import CheckpointMeta
from star.train.star_settings import StarSettings, resolve_teacher_decay

# config.json's keys where they differ from the field names: TrainPlan's (top level) and TrainConfig's (in "settings")
PLAN_KEYS = {"config": "settings", "star_settings": "star"}
CONFIG_KEYS = {"self_guided": "star"}


@dataclass(frozen=True)
class TrainPlan:
    """Everything a run uses, derived once from its TrainConfig, the shards and the launch (config.json)."""

    config: TrainConfig  # as given
    model: GPTConfig  # architecture and dropouts used, class_dropout_prob included (the model config, once)
    star_settings: StarSettings | None  # resolved (contrastive layer, numeric teacher decay); None: plain LlamaGen
    views_per_image: int  # M as used (1 without ST-AR)
    lr: float
    precision: str  # fp32 | bf16 | fp16
    world_size: int
    batch_per_process: int
    total_steps: int
    steps_per_epoch: int
    tokenizer_sha256: str
    tokenizer_checkpoint: str  # the VQ the shards were made with, as an absolute path: evaluation decodes with it
    tokenizer_config: dict  # its VQConfig fields (the manifest's), so evaluation needs no --vq-config
    data_digest: str  # the shards' Manifest.digest: resume checks the data is the data the run started on
    command: str
    model_source: str = ""  # one line: the model's size and where its vocabulary, grid and classes came from

    @property
    def self_guided(self) -> bool:
        """ST-AR's self-guided losses are trained (--star with at least one of them on); False: plain LlamaGen."""
        return self.star_settings is not None

    @property
    def needs_teacher(self) -> bool:
        return self.self_guided

    @property
    def needs_projector(self) -> bool:
        return self.star_settings is not None and (self.star_settings.use_step or self.star_settings.use_view)

    @property
    def projector_hidden(self) -> int:
        return self.config.projector_hidden or min(2048, 4 * self.model.dim)

    def to_json(self) -> dict[str, Any]:
        """The run folder's config.json. Its keys are a file format (read by star/eval, star/study and resume, in
        run folders of any age), mapped from the field names here, in this one place: the config is `settings`,
        its `self_guided` is `star`, and the resolved `star_settings` are `star`."""
        record = {PLAN_KEYS.get(name, name): value for name, value in dataclasses.asdict(self).items()}
        record["settings"] = {CONFIG_KEYS.get(name, name): value for name, value in record["settings"].items()}
        return record

    def checkpoint_meta(self, step: int, cpu_s: float = 0.0) -> CheckpointMeta:
        """What this run records in a checkpoint at `step` (and compares with a checkpoint it resumes)."""
        config = self.config
        return CheckpointMeta(
            step=step, tokenizer_sha256=self.tokenizer_sha256, self_guided=self.self_guided,
            views_per_image=self.views_per_image, seed=config.seed, global_batch=config.batch_size,
            world_size=self.world_size, batch_per_process=self.batch_per_process, grad_accum=config.grad_accum,
            optimizer={"lr": self.lr, "weight_decay": config.weight_decay, "grad_clip": config.grad_clip,
                       "betas": list(config.betas)},
            cpu_s=round(cpu_s, 2), data_digest=self.data_digest)


def build_model_config(config: TrainConfig, manifest: Manifest | None = None) -> GPTConfig:
    """The --model config with the dropout flags applied; a flag left unset keeps the JSON's (or preset's) value,
    so a --model JSON's class_dropout_prob is honoured unless --class-dropout overrides it. A size (GPT-B,
    GPT-tiny, ...) takes its vocabulary, token grid and classes from `manifest` when one is given; a JSON is used
    as written (and checked against the data by `check_data_against_model`)."""
    overrides: dict[str, float] = {}
    if config.class_dropout is not None:
        overrides["class_dropout_prob"] = config.class_dropout
    if config.token_dropout is not None:
        overrides["token_dropout_p"] = config.token_dropout
    if config.dropout is not None:
        overrides["resid_dropout_p"] = config.dropout
        overrides["ffn_dropout_p"] = config.dropout
    if manifest is not None and preset_name(config.model) is not None:
        overrides.update(data_shapes(manifest, config.shards))
    return GPTConfig.resolve(config.model, **overrides)  # checks every size and rate


def data_shapes(manifest: Manifest, shards: str) -> dict[str, int]:
    """What a model size takes from the data: vocabulary (the tokenizer's codebook), block_size (the token grid,
    square for 2D RoPE) and classes."""
    h, w = manifest.grid
    check(h == w, f"shards {shards}: token grid {h}x{w} is not square; 2D RoPE needs a square grid")
    return {"vocab_size": manifest.codebook_size, "block_size": h * w, "num_classes": manifest.num_classes}


def describe_model(config: TrainConfig, model: GPTConfig) -> str:
    """One line saying where the model's shapes came from: the shards for a size, the file for a JSON."""
    name = preset_name(config.model)
    side = model.grid_size
    origin = f"from {config.shards}" if name is not None else f"as written in {config.model}"
    return (f"model {name or config.model}: dim {model.dim}, {model.n_layer} layers, vocab {model.vocab_size}, "
            f"grid {side}x{side}, {model.num_classes} classes, {origin}")


def check_data_against_model(manifest: Manifest, model_config: GPTConfig, shards: str) -> None:
    """Mismatched tokenizer/model settings are errors before any step, naming the value that differs."""
    h, w = manifest.grid
    problems = []
    if manifest.codebook_size > model_config.vocab_size:
        problems.append(f"tokenizer codebook size {manifest.codebook_size} > model vocab_size {model_config.vocab_size}")
    if h * w != model_config.block_size:
        problems.append(f"token grid {h}x{w} = {h * w} tokens != model block_size {model_config.block_size} "
                        f"(image size {manifest.image_size})")
    if manifest.num_classes > model_config.num_classes:
        problems.append(f"shards have {manifest.num_classes} classes > model num_classes {model_config.num_classes}")
    if problems:
        raise ValueError(f"shards {shards} do not fit the model:\n  " + "\n  ".join(problems)
                         + "\nPass a --model JSON with matching vocab_size / block_size / num_classes, or re-tokenize.")


def _resolve_star_settings(config: TrainConfig, model: GPTConfig, total_steps: int) -> StarSettings | None:
    """The StarSettings a run uses (layer and teacher decay resolved); None without --star or with every term off."""
    asked = config.star_settings
    if not (config.self_guided and asked.any):
        return None
    layer = asked.contrastive_layer or model.n_layer // 2
    check(1 <= layer <= model.n_layer, f"--contrastive-layer {asked.contrastive_layer}: outside 1..{model.n_layer}")
    check(not (asked.use_step or asked.use_view) or asked.num_positions <= model.block_size - 1,
          f"--num-positions {asked.num_positions}: more than the {model.block_size - 1} image positions")
    return dataclasses.replace(asked, contrastive_layer=layer,
                               teacher_decay=resolve_teacher_decay(asked.teacher_decay, total_steps))


def make_plan(config: TrainConfig, manifest: Manifest, world_size: int, precision: str) -> TrainPlan:
    """The run's plan, derived once: model config, batch split, run length, lr, ST-AR settings. ValueError names
    the flag."""
    model = build_model_config(config, manifest)
    check_data_against_model(manifest, model, config.shards)
    batch_per_process, leftover = divmod(config.batch_size, world_size * config.grad_accum)
    check(batch_per_process > 0 and not leftover, f"--batch-size {config.batch_size} must be a multiple of processes "
          f"x grad_accum = {world_size} x {config.grad_accum}")
    check(config.steps > 0 or config.epochs > 0, "give --steps or --epochs (both are 0)")
    steps_per_epoch = manifest.num_samples // config.batch_size
    check(steps_per_epoch > 0, f"--batch-size {config.batch_size}: more than the {manifest.num_samples} "
          f"images in {config.shards}")
    total_steps = config.steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    star_settings = _resolve_star_settings(config, model, total_steps)
    views = config.views_per_image if star_settings is not None else 1  # M as used
    check(views <= manifest.num_views, f"--views-per-image {views}: the shards {config.shards} store "
          f"{manifest.num_views} views per image; tokenize with more views (e.g. --view-policy tencrop) or lower it")
    return TrainPlan(
        config=config, model=model, star_settings=star_settings, views_per_image=views,
        lr=config.lr if config.lr is not None else 1e-4 * config.batch_size / 256, precision=precision,
        world_size=world_size, batch_per_process=batch_per_process, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, tokenizer_sha256=manifest.tokenizer_sha256, data_digest=manifest.digest,
        tokenizer_checkpoint=manifest.tokenizer_checkpoint, tokenizer_config=manifest.tokenizer.get("config", {}),
        command=" ".join(sys.argv), model_source=describe_model(config, model))

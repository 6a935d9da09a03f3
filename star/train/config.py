"""Stage two's settings, declared once: `TrainConfig` (the flags of train/run.py, checked on construction) and
`ResolvedTrainConfig`, everything a run derives from them once (written as the run's config.json)."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any

from star.cli import check, setting
from star.data.manifest import Manifest
from star.gpt.model import GPT_PRESETS, GPTConfig
from star.runtime import PRECISION_CHOICES
from star.train.token_loader import VIEW_MATCH_CHOICES

AUTO = "auto"
PAPER_TEACHER_DECAY = 0.9999
# The paper's EMA horizon 1 / (1 - 0.9999) = 10k steps over its ~250k-step runs (1.28M images x 50 epochs / 256):
# a horizon of 4% of the run. `--teacher-decay auto` keeps that ratio for any run length.
PAPER_HORIZON_FRACTION = 0.04


class TeacherDecay:
    """The type of --teacher-decay: a float in [0, 1], or 'auto' (calling it parses a flag or a library value)."""

    def __new__(cls, value: float | str) -> float | str:  # type: ignore[misc]
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        return float(value)


def resolve_teacher_decay(decay: float | str, total_steps: int) -> float:
    """The EMA decay a run uses: a given number as is; 'auto' = 1 - 1 / (0.04 x total_steps), clamped to
    [0, 0.9999]: 0.9999 at the paper's 250k steps, 0.975 at 1k, 0.875 at 200 (the teacher follows the
    student within 4% of the run instead of staying at its random initialisation)."""
    if decay != AUTO:
        return float(decay)
    return min(PAPER_TEACHER_DECAY, max(0.0, 1.0 - 1.0 / (PAPER_HORIZON_FRACTION * max(total_steps, 1))))


@dataclass
class StarSettings:
    """ST-AR's self-guided losses (docs/st-ar.md). Flags of train/run.py; checked here for every caller."""

    mim_weight: float = setting(1.0, help="alpha, the weight of L_MIM")
    contrastive_weight: float = setting(0.5, help="beta, the weight of (L_step + L_view) / 2")
    mask_ratio: float = setting(0.25, help="fraction of image key positions hidden from every query for L_MIM, "
                                           "in [0, 1)")
    contrastive_layer: int = setting(0, help="block whose output feeds L_step / L_view; 0: the middle one")
    num_positions: int = setting(4, help="K sampled positions per sequence for the contrastive terms (>= 2 with "
                                         "L_step)")
    contrastive_temperature: float = setting(0.2, help="InfoNCE temperature of L_step and L_view (> 0)")
    teacher_decay: TeacherDecay = setting(PAPER_TEACHER_DECAY, metavar="DECAY",
                                          help="EMA decay of the teacher, in [0, 1], or 'auto': keep the paper's "
                                               "ratio of EMA horizon (1 / (1 - decay)) to run length, 4%%")
    use_mim: bool = setting(True, flag="mim", help="L_MIM, the masked-attention feature loss")
    use_step: bool = setting(True, flag="step", help="L_step, the inter-step contrastive loss")
    use_view: bool = setting(True, flag="view", help="L_view, the inter-view contrastive loss")

    def __post_init__(self) -> None:
        try:
            self.teacher_decay = TeacherDecay(self.teacher_decay)
        except (TypeError, ValueError):
            raise ValueError(f"--teacher-decay {self.teacher_decay!r}: give a number in [0, 1] or 'auto'") from None
        check(self.teacher_decay == AUTO or 0.0 <= self.teacher_decay <= 1.0,
              f"--teacher-decay {self.teacher_decay}: must be in [0, 1] or 'auto'")
        check(0.0 <= self.mask_ratio < 1.0, f"--mask-ratio {self.mask_ratio}: must be in [0, 1) (1 would hide every "
                                            "image key)")
        check(self.contrastive_temperature > 0 and math.isfinite(self.contrastive_temperature),
              f"--contrastive-temperature {self.contrastive_temperature}: must be a finite number > 0")
        check(self.mim_weight >= 0 and math.isfinite(self.mim_weight), f"--mim-weight {self.mim_weight}: must be >= 0")
        check(self.contrastive_weight >= 0 and math.isfinite(self.contrastive_weight),
              f"--contrastive-weight {self.contrastive_weight}: must be >= 0")
        check(self.contrastive_layer >= 0, f"--contrastive-layer {self.contrastive_layer}: must be >= 0 (0: middle)")
        check(self.num_positions >= (2 if self.use_step else 1),
              f"--num-positions {self.num_positions}: must be >= 1, and >= 2 with L_step (it contrasts pairs of "
              "positions; or pass --no-step)")

    @property
    def any(self) -> bool:
        return self.use_mim or self.use_step or self.use_view


VERIFY_CHOICES = ("sizes", "full", "none")
LOADER_CHOICES = ("map", "stream")  # map: memory-mapped token cache, exact resume; stream: WebDataset, resampled
RESUME_AUTO = "auto"


def _fraction(value: float | None, flag: str, upper_open: bool = False) -> None:
    """None (unset) or a number in [0, 1] (or [0, 1) when upper_open); NaN fails every comparison."""
    if value is None:
        return
    inside = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    check(inside, f"{flag} {value}: must be in [0, 1{')' if upper_open else ']'}")


@dataclass
class TrainConfig:
    """Settings of one training run; each is a flag of train/run.py (see `star.cli`)."""

    shards: str = setting(help="token-shard folder written by tokenize/run.py")
    out: str = setting("", help="run folder: config.json, log.jsonl, checkpoints/ (refused if it holds a run, unless "
                                "--resume); required unless --prepare-only")
    model: str = setting("GPT-B", help=f"a preset ({', '.join(GPT_PRESETS)}) or a JSON file of LlamaGen ModelArgs")
    steps: int = setting(0, help="optimizer steps; 0: derive from --epochs")
    epochs: float = setting(0.0, help="passes over the shards (used when --steps is 0)")
    batch_size: int = setting(256, help="global batch, in images (each with --views-per-image views)")
    grad_accum: int = setting(1, help="micro-batches per optimizer step")
    lr: float | None = setting(None, help="AdamW learning rate; None: 1e-4 per 256 images of --batch-size")
    weight_decay: float = setting(0.05, help="AdamW weight decay on 2-D weights (LlamaGen's rule)")
    betas: tuple[float, float] = setting((0.9, 0.95), help="AdamW betas")
    grad_clip: float = setting(1.0, help="clip the global gradient norm to this (> 0)")
    class_dropout: float | None = setting(None, help="probability of replacing a label by the null class (CFG); "
                                                     "None: the model config's class_dropout_prob (LlamaGen: 0.1)")
    token_dropout: float | None = setting(None, help="None: the model config's token_dropout_p (LlamaGen: 0.1)")
    dropout: float | None = setting(None, help="residual and FFN dropout; None: the model config's (LlamaGen: 0.1)")
    seed: int = setting(0, help="seed of the weights, data order and every per-step random choice")
    star: bool = setting(True, help="ST-AR's self-guided losses; --no-star: the plain LlamaGen baseline")
    views_per_image: int = setting(2, help="M views of each image per batch for ST-AR (>= 2 with L_view); 1 with "
                                           "--no-star")
    view_match: str = setting("index", choices=VIEW_MATCH_CHOICES,
                              help="L_view's token pairs: index (the paper) or geometry (same source point)")
    star_settings: StarSettings = setting(default_factory=StarSettings)
    projector_hidden: int = setting(0, help="hidden width of the contrastive projector; 0: min(2048, 4 x dim)")
    ckpt_every: int = setting(5000, help="steps between checkpoints (the last step is always saved)")
    keep_checkpoints: int = setting(3, help="newest checkpoints kept; 0: keep all")
    ckpt_at: str = setting("", help="comma list of further steps to checkpoint (e.g. 300,1500), never pruned: "
                                    "evaluate a run along its length")
    log_every: int = setting(10, help="steps between log.jsonl records")
    resume: str = setting("", help="'auto' (newest intact checkpoint in --out) or a checkpoint folder")
    init_from: str = setting("", help="start from these weights (LlamaGen .pt or our checkpoint) to fine-tune")
    deterministic: bool = setting(False, help="deterministic kernels (slower)")
    compile: bool = setting(False, help="torch.compile the student")
    num_workers: int = setting(4, help="DataLoader worker processes")
    loader: str = setting("map", choices=LOADER_CHOICES,
                          help="map: memory-mapped token cache, exact resume; stream: WebDataset, resampled")
    cache_dir: str = setting("", help="where the token cache goes (default: <shards>/cache)")
    cache_workers: int = setting(0, help="processes that build the token cache, a shard each at a time (0: a core "
                                         "each)")
    cache_timeout: float = setting(240.0, help="minutes the other processes wait for the first one's token cache")
    prepare_only: bool = setting(False, help="check the shards and build the token cache, then exit (before a "
                                             "launch: the run then starts at once)")
    verify_shards: str = setting("sizes", choices=VERIFY_CHOICES, help="stream loader: check each local shard's "
                                 "size against the manifest (sizes), every tar header too (full), or nothing (none)")
    dist_timeout: float = setting(30.0, help="minutes a collective may wait before the process group gives up")
    break_lock: bool = setting(False, help="take over --out's lock even if its holder may be alive (you know it is "
                                           "gone); a lock not refreshed for 3 minutes is taken over anyway")
    tensorboard: bool = setting(False, help="also log to TensorBoard (log.jsonl is always written)")
    precision: str = setting("auto", choices=PRECISION_CHOICES, help="auto: bf16 on CUDA, fp32 on CPU")
    progress: bool = setting(True, help="tqdm progress bar")

    def __post_init__(self) -> None:
        check(bool(self.shards), "--shards: give the token-shard folder")
        check(bool(self.out) or self.prepare_only, "--out: give the run folder")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(self.steps >= 0, f"--steps {self.steps}: must be >= 0 (0: use --epochs)")
        check(self.epochs >= 0 and math.isfinite(self.epochs), f"--epochs {self.epochs}: must be a finite number >= 0")
        check(self.grad_accum >= 1, f"--grad-accum {self.grad_accum}: must be >= 1")
        check(self.lr is None or (self.lr >= 0 and math.isfinite(self.lr)), f"--lr {self.lr}: must be >= 0")
        check(self.weight_decay >= 0 and math.isfinite(self.weight_decay),
              f"--weight-decay {self.weight_decay}: must be >= 0")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"--betas {self.betas}: two "
              "numbers in [0, 1)")
        check(self.grad_clip > 0 and math.isfinite(self.grad_clip), f"--grad-clip {self.grad_clip}: must be > 0")
        _fraction(self.class_dropout, "--class-dropout")
        _fraction(self.token_dropout, "--token-dropout", upper_open=True)
        _fraction(self.dropout, "--dropout", upper_open=True)
        check(self.seed >= 0, f"--seed {self.seed}: must be >= 0")
        check(self.views_per_image >= 1, f"--views-per-image {self.views_per_image}: must be >= 1")
        check(not (self.star and self.star_settings.use_view) or self.views_per_image >= 2,
              f"--views-per-image {self.views_per_image}: ST-AR's L_view contrasts views of one image, so it needs "
              ">= 2 (or pass --no-view)")
        check(self.view_match in VIEW_MATCH_CHOICES, f"--view-match {self.view_match!r}: choose one of "
              f"{', '.join(VIEW_MATCH_CHOICES)}")
        check(self.loader in LOADER_CHOICES, f"--loader {self.loader!r}: choose one of {', '.join(LOADER_CHOICES)}")
        check(self.precision in PRECISION_CHOICES, f"--precision {self.precision!r}: choose one of "
              f"{', '.join(PRECISION_CHOICES)}")
        check(self.projector_hidden >= 0, f"--projector-hidden {self.projector_hidden}: must be >= 0")
        check(self.ckpt_every >= 1, f"--ckpt-every {self.ckpt_every}: must be >= 1")
        check(self.keep_checkpoints >= 0, f"--keep-checkpoints {self.keep_checkpoints}: must be >= 0 (0: all)")
        check(all(step > 0 for step in self.milestones), f"--ckpt-at {self.ckpt_at}: steps must be > 0")
        check(self.log_every >= 1, f"--log-every {self.log_every}: must be >= 1")
        check(self.num_workers >= 0, f"--num-workers {self.num_workers}: must be >= 0")
        check(self.cache_workers >= 0, f"--cache-workers {self.cache_workers}: must be >= 0 (0: a core each)")
        check(self.cache_timeout > 0, f"--cache-timeout {self.cache_timeout}: must be > 0 minutes")
        check(self.dist_timeout > 0, f"--dist-timeout {self.dist_timeout}: must be > 0 minutes")
        check(self.verify_shards in VERIFY_CHOICES, f"--verify-shards {self.verify_shards!r}: choose one of "
              f"{', '.join(VERIFY_CHOICES)}")

    @property
    def milestones(self) -> tuple[int, ...]:
        """The --ckpt-at steps, sorted."""
        try:
            return tuple(sorted({int(part) for part in self.ckpt_at.split(",") if part.strip()}))
        except ValueError:
            raise ValueError(f"--ckpt-at {self.ckpt_at!r}: give a comma list of step numbers") from None

    @property
    def uses_star(self) -> bool:
        return self.star and self.star_settings.any


@dataclass(frozen=True)
class ResolvedTrainConfig:
    """Everything a run uses, resolved once from a TrainConfig, the shards and the launch (config.json)."""

    settings: TrainConfig  # as given
    model: GPTConfig  # architecture and dropouts used, class_dropout_prob included (the model config, once)
    star: StarSettings | None  # resolved (contrastive layer, numeric teacher decay); None: plain LlamaGen
    views_per_image: int  # M as used (1 without ST-AR)
    lr: float
    precision: str  # fp32 | bf16 | fp16
    world_size: int
    batch_per_process: int
    total_steps: int
    steps_per_epoch: int
    tokenizer_sha256: str
    tokenizer_checkpoint: str
    data_digest: str  # the shards' Manifest.digest: resume checks the data is the data the run started on
    command: str
    start_step: int = 0
    start_cpu_s: float = 0.0  # training-loop CPU seconds of the run before this invocation (from the checkpoint)
    resumed_from: str | None = None
    changed_on_resume: tuple[str, ...] = ()  # optimizer settings the resumed run changed (applied)
    skipped_on_resume: tuple[str, ...] = ()  # damaged checkpoints `--resume auto` passed over

    @property
    def needs_teacher(self) -> bool:
        return self.star is not None

    @property
    def needs_projector(self) -> bool:
        return self.star is not None and (self.star.use_step or self.star.use_view)

    @property
    def projector_hidden(self) -> int:
        return self.settings.projector_hidden or min(2048, 4 * self.model.dim)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_model_config(config: TrainConfig) -> GPTConfig:
    """The --model config with the dropout flags applied; a flag left unset keeps the JSON's (or preset's) value,
    so a --model JSON's class_dropout_prob is honoured unless --class-dropout overrides it."""
    overrides: dict[str, float] = {}
    if config.class_dropout is not None:
        overrides["class_dropout_prob"] = config.class_dropout
    if config.token_dropout is not None:
        overrides["token_dropout_p"] = config.token_dropout
    if config.dropout is not None:
        overrides["resid_dropout_p"] = config.dropout
        overrides["ffn_dropout_p"] = config.dropout
    return GPTConfig.resolve(config.model, **overrides)  # checks every size and rate


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


def _resolve_star(config: TrainConfig, model: GPTConfig, total_steps: int) -> StarSettings | None:
    if not config.uses_star:
        return None
    star = config.star_settings
    layer = star.contrastive_layer or model.n_layer // 2
    check(1 <= layer <= model.n_layer, f"--contrastive-layer {star.contrastive_layer}: outside 1..{model.n_layer}")
    check(not (star.use_step or star.use_view) or star.num_positions <= model.block_size - 1,
          f"--num-positions {star.num_positions}: more than the {model.block_size - 1} image positions")
    return dataclasses.replace(star, contrastive_layer=layer,
                               teacher_decay=resolve_teacher_decay(star.teacher_decay, total_steps))


def resolve_config(config: TrainConfig, manifest: Manifest, world_size: int, precision: str) -> ResolvedTrainConfig:
    """Resolve once: model config, batch split, run length, lr, ST-AR settings. ValueError names the flag."""
    model = build_model_config(config)
    check_data_against_model(manifest, model, config.shards)
    batch_per_process, leftover = divmod(config.batch_size, world_size * config.grad_accum)
    check(batch_per_process > 0 and not leftover, f"--batch-size {config.batch_size} must be a multiple of processes "
          f"x grad_accum = {world_size} x {config.grad_accum}")
    check(config.steps > 0 or config.epochs > 0, "give --steps or --epochs (both are 0)")
    steps_per_epoch = manifest.num_samples // config.batch_size
    check(steps_per_epoch > 0, f"--batch-size {config.batch_size}: more than the {manifest.num_samples} "
          f"images in {config.shards}")
    total_steps = config.steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    star = _resolve_star(config, model, total_steps)
    return ResolvedTrainConfig(
        settings=config, model=model, star=star, views_per_image=config.views_per_image if star else 1,
        lr=config.lr if config.lr is not None else 1e-4 * config.batch_size / 256, precision=precision,
        world_size=world_size, batch_per_process=batch_per_process, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, tokenizer_sha256=manifest.tokenizer_sha256, data_digest=manifest.digest,
        tokenizer_checkpoint=manifest.tokenizer_checkpoint, command=" ".join(sys.argv))

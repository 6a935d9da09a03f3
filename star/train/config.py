"""Stage two's config, declared once: `TrainConfig`, the flags of train/run.py, checked on construction (what a run
derives from it, its `TrainPlan`, is star/train/plan.py's)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from star.gpt.config import MODEL_SIZES
from star.runtime import PRECISION_CHOICES
from star.settings import check, setting
from star.train.star_settings import StarSettings
from star.train.token_cache import CACHE_SCOPES
from star.train.token_loader import VIEW_MATCH_CHOICES

VERIFY_CHOICES = ("sizes", "full", "none")
LOADER_CHOICES = ("map", "stream")  # map: memory-mapped token cache, exact resume; stream: WebDataset, resampled
RESUME_AUTO = "auto"
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")  # Accelerate's trackers that --log-with offers


def _fraction(value: float | None, flag: str, upper_open: bool = False) -> None:
    """None (unset) or a number in [0, 1] (or [0, 1) when upper_open); NaN fails every comparison."""
    if value is None:
        return
    inside = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    check(inside, f"{flag} {value}: must be in [0, 1{')' if upper_open else ']'}")


@dataclass
class TrainConfig:
    """A run's config: what was asked for, each field a flag of train/run.py (see `star.cli`)."""

    shards: str = setting(help="token-shard folder written by tokenize/run.py")
    out: str = setting("", help="run folder: config.json, log.jsonl, checkpoints/ (refused if it holds a run, unless "
                                "--resume); required unless --prepare-only")
    model: str = setting("GPT-B", help=f"a size ({', '.join(MODEL_SIZES)}; vocabulary, token grid and classes from "
                                       "the shards' manifest) or a JSON file of LlamaGen ModelArgs (used as written)")
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
    self_guided: bool = setting(True, flag="star", help="ST-AR's self-guided losses; --no-star: the plain LlamaGen "
                                                        "baseline")
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
    resume: str = setting("", help="'auto' (newest intact checkpoint in --out) or a checkpoint folder; it may "
                                   "continue on another number of processes or --grad-accum at the same --batch-size")
    allow_batch_change: bool = setting(False, help="--resume with another --batch-size: the step, weights and "
                                       "AdamW state carry over, but the data order becomes the new batch's (images "
                                       "of the current epoch are then seen twice or skipped)")
    init_from: str = setting("", help="start from these weights (LlamaGen .pt or our checkpoint) to fine-tune; the "
                                      "run's steps count from 0")
    init_optimizer: bool = setting(True, help="--init-from one of our checkpoints: carry its AdamW moments over to the "
                                              "student (the projector starts fresh); official .pt files have none")
    warmup_steps: int = setting(0, help="linear lr warmup from 0 to --lr over this many steps (0: constant lr, "
                                        "LlamaGen's)")
    star_warmup_steps: int = setting(0, help="ramp ST-AR's weights alpha and beta linearly from 0 to their values "
                                             "over this many steps (0: full weight from step 0)")
    star_every: int = setting(1, help="ST-AR's self-guided terms and teacher pass on every K-th step only; the other "
                                      "steps are next-token steps on the same views (the EMA updates every step)")
    deterministic: bool = setting(False, help="deterministic kernels (slower)")
    compile: bool = setting(False, help="torch.compile the student")
    num_workers: int = setting(4, help="DataLoader worker processes")
    loader: str = setting("map", choices=LOADER_CHOICES,
                          help="map: memory-mapped token cache, exact resume; stream: WebDataset, resampled")
    cache_dir: str = setting("", help="where the token cache goes (default: <shards>/cache)")
    cache_workers: int = setting(0, help="processes that build the token cache, a shard each at a time (0: a core "
                                         "each)")
    cache_scope: str = setting("node", choices=CACHE_SCOPES, help="who builds the token cache: node (each node's "
                               "first process, unless another node already builds it on a shared disk) or shared "
                               "(only the job's main process; every node must see --cache-dir)")
    cache_timeout: float = setting(240.0, help="minutes the other processes wait for the first one's token cache")
    prepare_only: bool = setting(False, help="check the shards and build the token cache, then exit (before a "
                                             "launch: the run then starts at once)")
    verify_shards: str = setting("sizes", choices=VERIFY_CHOICES, help="stream loader: check each local shard's "
                                 "size against the manifest (sizes), every tar header too (full), or nothing (none)")
    dist_timeout: float = setting(30.0, help="minutes a collective may wait before the process group gives up")
    break_lock: bool = setting(False, help="take over --out's lock even if its holder may be alive (you know it is "
                                           "gone); a lock not refreshed for 3 minutes is taken over anyway")
    log_with: str = setting("", help=f"also log to these trackers, a comma list of {', '.join(TRACKERS)} "
                                     "(Accelerate's; files in --out, wandb offline unless WANDB_MODE is set); "
                                     "log.jsonl is always written")
    tensorboard: bool = setting(False, help="the same as --log-with tensorboard")
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
        check(self.warmup_steps >= 0, f"--warmup-steps {self.warmup_steps}: must be >= 0 (0: constant lr)")
        check(self.star_warmup_steps >= 0, f"--star-warmup-steps {self.star_warmup_steps}: must be >= 0 (0: none)")
        check(self.star_every >= 1, f"--star-every {self.star_every}: must be >= 1 (1: every step)")
        check(self.views_per_image >= 1, f"--views-per-image {self.views_per_image}: must be >= 1")
        check(not (self.self_guided and self.star_settings.use_view) or self.views_per_image >= 2,
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
        check(self.cache_scope in CACHE_SCOPES, f"--cache-scope {self.cache_scope!r}: choose one of "
              f"{', '.join(CACHE_SCOPES)}")
        check(self.cache_timeout > 0, f"--cache-timeout {self.cache_timeout}: must be > 0 minutes")
        check(self.dist_timeout > 0, f"--dist-timeout {self.dist_timeout}: must be > 0 minutes")
        unknown = [name for name in self.trackers if name not in TRACKERS]
        check(not unknown, f"--log-with {self.log_with}: {', '.join(unknown)} is not one of "
              f"{', '.join(TRACKERS)}")
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
    def trackers(self) -> tuple[str, ...]:
        """The trackers to log to: --log-with's, plus tensorboard for --tensorboard; each once, in order."""
        names = [part.strip().lower() for part in self.log_with.split(",") if part.strip()]
        return tuple(dict.fromkeys(names + (["tensorboard"] if self.tensorboard else [])))

"""ST-AR's settings, the flags of train/run.py that shape its losses (checked here for every caller), and the
resolution of `--teacher-decay auto`."""
from __future__ import annotations

import math
from dataclasses import dataclass

from star.settings import check, setting

AUTO = "auto"
PAPER_TEACHER_DECAY = 0.9999
# The paper's EMA horizon 1 / (1 - 0.9999) = 10k steps over its ~250k-step runs (1.28M images x 50 epochs / 256):
# a horizon of 4% of the run. `--teacher-decay auto` keeps that ratio for any run length.
PAPER_HORIZON_FRACTION = 0.04
# global: the InfoNCE negatives are the whole global batch (gathered over processes and accumulation micro-batches),
# so the loss does not depend on the launch; local: each process's micro-batch alone (the method then changes with
# the process count and --grad-accum)
NEGATIVES_CHOICES = ("global", "local")


def parse_teacher_decay(value: float | str) -> float | str:
    """--teacher-decay as a run uses it: 'auto', or a number in [0, 1]."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        decay = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--teacher-decay {value!r}: give a number in [0, 1] or 'auto'") from None
    check(0.0 <= decay <= 1.0, f"--teacher-decay {decay}: must be in [0, 1] or 'auto'")
    return decay


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
    teacher_decay: str = setting(PAPER_TEACHER_DECAY, metavar="DECAY",  # a number, or 'auto' (parsed below)
                                          help="EMA decay of the teacher, in [0, 1], or 'auto': keep the paper's "
                                               "ratio of EMA horizon (1 / (1 - decay)) to run length, 4%%")
    negatives: str = setting("global", choices=NEGATIVES_CHOICES,
                             help="InfoNCE negatives of L_step / L_view: global (the whole global batch, any process "
                                  "count or --grad-accum) or local (each process's micro-batch)")
    use_mim: bool = setting(True, flag="mim", help="L_MIM, the masked-attention feature loss")
    use_step: bool = setting(True, flag="step", help="L_step, the inter-step contrastive loss")
    use_view: bool = setting(True, flag="view", help="L_view, the inter-view contrastive loss")

    def __post_init__(self) -> None:
        self.teacher_decay = parse_teacher_decay(self.teacher_decay)
        check(0.0 <= self.mask_ratio < 1.0, f"--mask-ratio {self.mask_ratio}: must be in [0, 1) (1 would hide every "
                                            "image key)")
        check(self.contrastive_temperature > 0 and math.isfinite(self.contrastive_temperature),
              f"--contrastive-temperature {self.contrastive_temperature}: must be a finite number > 0")
        check(self.mim_weight >= 0 and math.isfinite(self.mim_weight), f"--mim-weight {self.mim_weight}: must be >= 0")
        check(self.contrastive_weight >= 0 and math.isfinite(self.contrastive_weight),
              f"--contrastive-weight {self.contrastive_weight}: must be >= 0")
        check(self.contrastive_layer >= 0, f"--contrastive-layer {self.contrastive_layer}: must be >= 0 (0: middle)")
        check(self.negatives in NEGATIVES_CHOICES, f"--negatives {self.negatives!r}: choose one of "
              f"{', '.join(NEGATIVES_CHOICES)}")
        check(self.num_positions >= (2 if self.use_step else 1),
              f"--num-positions {self.num_positions}: must be >= 1, and >= 2 with L_step (it contrasts pairs of "
              "positions; or pass --no-step)")

    @property
    def any(self) -> bool:
        return self.use_mim or self.use_step or self.use_view

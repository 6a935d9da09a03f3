"""What changes along a run, as functions of the step alone (so `--resume` continues exactly): the learning rate's
warmup (--warmup-steps), the ramp of ST-AR's weights alpha and beta (--star-warmup-steps), and which steps carry the
self-guided terms (--star-every). `step` is the 0-based index of the optimizer step being taken."""
from __future__ import annotations


def warmup_fraction(step: int, warmup_steps: int) -> float:
    """(step + 1) / warmup_steps, up to 1: the first step already moves (no wasted step at 0), step warmup_steps - 1
    and later are at full value; 1 throughout when warmup_steps is 0."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def lr_at(peak_lr: float, step: int, warmup_steps: int) -> float:
    """The learning rate of optimizer step `step`: linear warmup to --lr, then constant (LlamaGen's schedule)."""
    return peak_lr * warmup_fraction(step, warmup_steps)


def star_weight_scale(step: int, star_warmup_steps: int) -> float:
    """The factor on alpha and beta at step `step`: a linear ramp from 0 to 1 over --star-warmup-steps."""
    return warmup_fraction(step, star_warmup_steps)


def is_self_guided(step: int, star_every: int) -> bool:
    """Whether step `step` carries ST-AR's teacher pass and self-guided terms: every --star-every-th, from step 0."""
    return step % star_every == 0

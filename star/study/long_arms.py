"""The long presets' arms: long runs evaluated along their length (so equal compute is read off the curves, with
no arm of its own), and short arms that separate the paper's ImageNet settings (loss weights, dropout, the mask)
from ST-AR itself (LONG_ARMS); round 3's recipes at equal compute (ROUND3_ARMS); the GPU preset's (GPU_ARMS)."""
from __future__ import annotations

from star.study.arms import Arm

NO_DROPOUT = ("--dropout", "0", "--token-dropout", "0")  # residual, FFN and token dropout; class dropout stays (CFG)
# The fixed decay: arm 6's 0.917 (--teacher-decay auto at 300 steps) gave the short study's best probe; held
# fixed while the run grows 10x, it separates a horizon of ~12 steps from a horizon scaled with the run.
FIXED_DECAY = "0.92"
LONG_ARMS: tuple[Arm, ...] = (
    # The baseline runs 8/3 as long: about the compute of 3000 ST-AR steps at the fast step's measured cost ratio
    # (2.6x), so the equal-compute curves cover ST-AR's whole run.
    Arm("L1_llamagen", "L1 LlamaGen", star=False, main=True, length=8 / 3, notes="--no-star, 8/3 of the steps"),
    Arm("L3_star", "L3 ST-AR (paper, decay 0.9999)", star=True, candidate=True,
        flags=("--view-match", "index", "--teacher-decay", "0.9999"), notes="the paper's settings"),
    Arm("L6_star_auto", "L6 ST-AR, decay auto", star=True, candidate=True,
        flags=("--view-match", "index", "--teacher-decay", "auto"), notes="1 - 1/(0.04 x steps)"),
    Arm("L7_star_decay092", f"L7 ST-AR, decay {FIXED_DECAY}", star=True, candidate=True,
        flags=("--view-match", "index", "--teacher-decay", FIXED_DECAY), notes="arm 6's short-run decay, fixed"),
    Arm("S1_star_w025", "S1 ST-AR, weights 0.25 / 0.125", star=True, short=True, main=True,
        flags=("--view-match", "index", "--teacher-decay", "0.9999", "--mim-weight", "0.25",
               "--contrastive-weight", "0.125"), notes="alpha, beta a quarter of the paper's"),
    Arm("S2_star_w010", "S2 ST-AR, weights 0.1 / 0.05", star=True, short=True, main=True,
        flags=("--view-match", "index", "--teacher-decay", "0.9999", "--mim-weight", "0.1",
               "--contrastive-weight", "0.05"), notes="alpha, beta a tenth of the paper's"),
    Arm("S3_llamagen_drop0", "S3 LlamaGen, dropout 0", star=False, short=True, main=True, flags=NO_DROPOUT,
        notes="--no-star, residual / FFN / token dropout 0"),
    Arm("S4_star_drop0", "S4 ST-AR, dropout 0", star=True, short=True, main=True,
        flags=("--view-match", "index", "--teacher-decay", "0.9999", *NO_DROPOUT), notes="dropout 0"),
    Arm("S5_star_mask0", "S5 ST-AR, mask ratio 0", star=True, short=True, main=True,
        flags=("--view-match", "index", "--teacher-decay", "0.9999", "--mask-ratio", "0"),
        notes="L_MIM without the mask: what the mask adds"),
)

# An ST-AR step (two views) in plain steps, as the long round measured it end to end at GPT_SMALL, batch 64, the
# fast step, two runs side by side: 0.62-0.65 CPU-s per ST-AR step against 0.31 per baseline step (docs/study.md,
# "Time"). `make bench`'s study-step row (0.393 / 0.154 s, steady state, no data loading or logging) reads 2.55.
STAR_STEP_COST = 2.05
# The one-view step (--views-per-image 1 --no-view) in plain steps: `make bench`'s recipe_steps, median of three
# runs (1.13-1.33x; docs/st-ar.md).
ONE_VIEW_STEP_COST = 1.2
# The fine-tune branches off its baseline at two thirds of the baseline's run; its lr and its self-guided weights
# ramp up over the first 5% of its own steps (the jump a fresh ST-AR loss at full weight would give a trained model).
FINE_TUNE_FRACTION = 2 / 3
FINE_TUNE_WARMUP_FRACTION = 0.05
ROUND3_BASELINE = "R1_llamagen"
ROUND3_ARMS: tuple[Arm, ...] = (
    Arm("R1_llamagen", "R1 LlamaGen", star=False, main=True, length=8 / 3,
        notes="--no-star, 8/3 of the steps: covers R2's compute at STAR_STEP_COST"),
    Arm("R2_star_paper", "R2 ST-AR (paper: decay 0.9999, weights 1 / 0.5)", star=True, main=True,
        step_cost=STAR_STEP_COST, flags=("--view-match", "index", "--teacher-decay", "0.9999"),
        notes="the paper's settings"),
    Arm("R3_star_auto", "R3 ST-AR, decay auto", star=True, main=True, step_cost=STAR_STEP_COST,
        flags=("--view-match", "index", "--teacher-decay", "auto"), notes="the long round's best decay (L6)"),
    Arm("R4_star_finetune", "R4 ST-AR fine-tune of R1", star=True, main=True, step_cost=STAR_STEP_COST,
        fine_tune_of=ROUND3_BASELINE, init_fraction=FINE_TUNE_FRACTION,
        flags=("--view-match", "index", "--teacher-decay", "auto"),
        notes="R1's checkpoint at 2/3 of its run, continued with ST-AR to R1's whole compute"),
    Arm("R5_star_tuned", "R5 ST-AR, decay auto, weights 0.25 / 0.125", star=True, main=True,
        step_cost=STAR_STEP_COST, flags=("--view-match", "index", "--teacher-decay", "auto", "--mim-weight", "0.25",
                                         "--contrastive-weight", "0.125"),
        notes="the best decay with the weights that won at 300 steps"),
    Arm("R6_star_one_view", "R6 ST-AR one view, decay auto", star=True, main=True, step_cost=ONE_VIEW_STEP_COST,
        flags=("--views-per-image", "1", "--no-view", "--teacher-decay", "auto"),
        notes="the cheap step: one view, L_MIM and L_step, no L_view"),
)
# The GPU preset's table: the long arms and a fine-tune of L1 (the same recipe as R4).
GPU_ARMS: tuple[Arm, ...] = (*LONG_ARMS, Arm(
    "L8_star_finetune", "L8 ST-AR fine-tune of L1", star=True, step_cost=STAR_STEP_COST, fine_tune_of="L1_llamagen",
    init_fraction=FINE_TUNE_FRACTION, flags=("--view-match", "index", "--teacher-decay", "auto"),
    notes="L1's checkpoint at 2/3 of its run, continued with ST-AR to L1's whole compute"))


def arm_table(preset: str) -> tuple[Arm, ...]:
    """The arms a long preset chooses from (--arms): round3's, the GPU preset's, or the long round's."""
    if preset.startswith("round3"):
        return ROUND3_ARMS
    return GPU_ARMS if preset.startswith("gpu") else LONG_ARMS


def baseline_arm(table: tuple[Arm, ...]) -> Arm:
    """The table's long baseline: its first long --no-star arm (L1, R1)."""
    return next(arm for arm in table if not arm.star and not arm.short)

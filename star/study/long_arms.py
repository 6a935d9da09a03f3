"""The long preset's arms: long runs evaluated along their length (so equal compute is read off the curves,
with no arm of its own), and short arms that separate the paper's ImageNet settings (loss weights, dropout, the
mask) from ST-AR itself."""
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

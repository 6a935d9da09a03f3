"""The study's arms: what each one changes on the shared GPT, data, seed and batch.

Step counts: every arm trains `steps` optimizer steps of the same batch, i.e. the same epochs as ST-AR, except
arm 2, the baseline given arm 3's wall-clock compute: steps_1 x (train time of arm 3 / train time of arm 1),
measured in this study (both times are recorded in the report).
The long preset's arms are star/study/long_arms.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arm:
    key: str  # folder name and command-line id
    label: str  # table / plot label
    star: bool
    flags: tuple[str, ...] = ()  # train/run.py flags beyond the shared ones
    equal_compute: bool = False  # arm 2: steps scaled by the measured ST-AR / baseline time ratio
    main: bool = False  # arms 1 and 3: the ones that get every seed
    notes: str = ""
    extra: dict = field(default_factory=dict)
    short: bool = False  # long preset: trained the preset's short length (the cheap arms)
    candidate: bool = False  # long preset: an ST-AR arm that gets the extra seed if it is the best one
    length: float = 1.0  # long preset: run length as a multiple of the preset's steps
    fine_tune_of: str = ""  # long presets: the arm (key) whose checkpoint, of the same seed, this run continues
    init_fraction: float = 0.0  # fine-tune: that checkpoint's step as a fraction of its arm's run
    step_cost: float = 1.0  # the step's training compute in plain (--no-star) steps: where equal compute falls


ARMS: tuple[Arm, ...] = (
    Arm("1_llamagen", "1 LlamaGen (equal epochs)", star=False, main=True,
        notes="--no-star, the same steps and batch as ST-AR"),
    Arm("2_llamagen_compute", "2 LlamaGen (equal compute)", star=False, equal_compute=True,
        notes="--no-star, steps x (ST-AR time / baseline time)"),
    Arm("3_star", "3 ST-AR (paper)", star=True, flags=("--view-match", "index", "--teacher-decay", "0.9999"), main=True,
        notes="--view-match index, teacher decay 0.9999"),
    Arm("4_star_geometry", "4 ST-AR geometry", star=True, flags=("--view-match", "geometry", "--teacher-decay", "0.9999"),
        notes="--view-match geometry (ours)"),
    Arm("5a_star_no_mim", "5a ST-AR w/o L_MIM", star=True, flags=("--view-match", "index", "--teacher-decay", "0.9999",
                                                                  "--no-mim"),
        notes="--no-mim"),
    Arm("5b_star_no_contrastive", "5b ST-AR w/o L_step, L_view", star=True,
        flags=("--view-match", "index", "--teacher-decay", "0.9999", "--no-step", "--no-view"),
        notes="--no-step --no-view"),
    Arm("6_star_decay_scaled", "6 ST-AR decay scaled", star=True, flags=("--view-match", "index", "--teacher-decay",
                                                                          "auto"),
        notes="--teacher-decay auto: 1 - 1/(0.04 x steps), the paper's horizon / run length"),
)
ARM_KEYS = tuple(arm.key for arm in ARMS)

def select_arms(spec: str, table: tuple[Arm, ...] = ARMS) -> list[Arm]:
    """'all' or a comma list of arm keys or their leading ids ('1,3,5a', 'L1,S2'); unknown names are errors."""
    if spec.strip() in ("", "all"):
        return list(table)
    chosen = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        matches = [arm for arm in table if item in (arm.key, arm.key.split("_")[0])]
        if not matches:
            keys = ", ".join(arm.key for arm in table)
            raise ValueError(f"--arms {item!r}: not an arm; choose from {keys} (or their leading ids)")
        chosen.extend(arm for arm in matches if arm not in chosen)
    return [arm for arm in table if arm in chosen]  # table order


def arm_seeds(arm: Arm, main_seeds: list[int], other_seeds: list[int]) -> list[int]:
    return list(main_seeds) if arm.main else list(other_seeds)

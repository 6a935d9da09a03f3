"""`make study`: does ST-AR beat LlamaGen on Fashion-MNIST, at equal epochs and at equal compute?

    python -m star.study                       # the full study -> runs/study/report.md
    python -m star.study --quick               # the same pipeline on a subset -> runs/study-quick/
    python -m star.study --arms 1,3 --seeds 0,1,2  # (re)run a subset; finished stages are skipped
    python -m star.study --report-only         # redraw the report from finished runs

Arms: 1 LlamaGen (--no-star, equal epochs), 2 LlamaGen at arm 3's measured compute, 3 ST-AR (paper),
4 ST-AR --view-match geometry, 5a without L_MIM, 5b without L_step and L_view, 6 teacher decay scaled to the run.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from star.cli import parse_config
from star.runtime import cpu_description
from star.settings import check, setting
from star.study.arms import ARM_KEYS, ARMS, select_arms
from star.study.fashion_mnist import FetchError, make_subset, prepare_fashion_mnist
from star.study.long_arms import arm_table
from star.study.presets import DEFAULT_ARMS, PRESETS


@dataclass
class StudyConfig:
    """The study's settings; `python -m star.study --help` lists them."""

    quick: bool = setting(False, help="the QUICK preset (subset, own folder runs/study-quick)")
    preset: str = setting("", choices=("", *sorted(PRESETS)),
                          help="full (default) | quick | long (runs scored along their length) | gpu (long at GPU "
                               "scale) | round3 (recipes at equal compute, its own tokenizer) | smoke, long-smoke, "
                               "gpu-smoke, round3-smoke (tests)")
    out: str = setting("", help="default: runs/study, or runs/study-quick with --quick")
    data_root: str = setting("data/fashion-mnist", help="where the converted ImageFolder goes")
    idx_folder: str = setting("", help="use these idx(.gz) files instead of downloading the package")
    arms: str = setting("", help=f"comma list of {', '.join(ARM_KEYS)} or their numbers (1,3,5a); the long presets' "
                                 "arms by their ids (L1,S2; round3: R1-R6); default all (quick: 1,2,3; gpu: "
                                 "L1,L3,L6,L8)")
    seeds: str = setting("", help="seeds of arms 1 and 3 (default: the preset's, full: 0,1)")
    other_seeds: str = setting("", help="seeds of the other arms (default 0)")
    steps: int = setting(0, help="override the equal-epoch step count (0: the preset's)")
    num_samples: int = setting(0, help="override samples per FID (0: the preset's)")
    third_seed: bool = setting(True, help="add a third seed when arms 1 and 3 are close")
    report_only: bool = setting(False, help="only rebuild the report from finished runs")
    train_only: bool = setting(False, help="long presets: stop after training (score later)")
    fid_precision: str = setting("auto", choices=("auto", "fp32", "bf16"),
                                 help="Inception's precision; auto: bf16 on a CPU with AMX-BF16 or AVX512-BF16 "
                                      "(2.0-2.4x faster), else fp32")

    def __post_init__(self) -> None:
        check(self.steps >= 0 and self.num_samples >= 0, "--steps and --num-samples must be >= 0 (0: the preset's)")


def parse_args(argv=None) -> StudyConfig:
    return parse_config(StudyConfig, argv, description=__doc__)


# CPU flags of hardware bf16 dot products, where bf16 Inception beats fp32 (measured, one thread): AMX 2.4x,
# AVX512-BF16 (an AMD EPYC without AMX) 2.0x
AMX_BF16 = frozenset({"amx_bf16"})
HARDWARE_BF16 = frozenset({"amx_bf16", "avx512_bf16"})


def resolve_fid_precision(requested: str, fast_bf16_flags: frozenset[str] = HARDWARE_BF16) -> str:
    """auto: bf16 when the CPU has one of `fast_bf16_flags` (it multiplies bf16 in hardware), else fp32; the
    study's FIDs are then all bf16 and compare with each other, not with fp32 FIDs elsewhere."""
    if requested != "auto":
        return requested
    return "bf16" if fast_bf16_flags & cpu_description()[1] else "fp32"


def is_long(preset: str) -> bool:
    """The presets scored along each run's length (star/study/long.py)."""
    return preset.startswith(("long", "gpu", "round3"))


def build_plan(args):
    from star.study.stages import StudyPlan

    preset = args.preset or ("quick" if args.quick else "full")
    fields, subset = PRESETS[preset]
    out = Path(args.out or ("runs/study-quick" if preset == "quick" else f"runs/study{'' if preset == 'full' else '-' + preset}"))
    data = Path(args.data_root)
    if subset:
        data = data.with_name(data.name + "-" + preset)
    table = arm_table(preset) if is_long(preset) else ARMS
    plan = StudyPlan(out=out, data=data, arms=select_arms(args.arms or DEFAULT_ARMS.get(preset, "all"), table),
                     preset=preset, **fields)
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    if args.seeds:
        plan = replace(plan, main_seeds=ints(args.seeds))
    if args.other_seeds:
        plan = replace(plan, other_seeds=ints(args.other_seeds))
    if args.steps:
        plan = replace(plan, steps=args.steps)
    if args.num_samples:
        plan = replace(plan, num_samples=args.num_samples)
    if not args.third_seed:
        plan = replace(plan, third_seed_if_close=False)
    plan = replace(plan, fid_precision=resolve_fid_precision(args.fid_precision))
    return plan, subset


def main(argv=None) -> int:
    from star.study.pipeline import run_study
    from star.study.report import render
    from star.study.stages import StageFailed

    args = parse_args(argv)
    try:
        plan, subset = build_plan(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    def prepare():
        prepare_fashion_mnist(args.data_root, args.idx_folder or None)
        if subset:
            make_subset(args.data_root, plan.data, subset)

    command = "python -m star.study " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        if is_long(plan.preset):
            from star.study.long import collect_long_finished, run_long_study

            study = (collect_long_finished(plan) if args.report_only
                     else run_long_study(plan, prepare, train_only=args.train_only))
            if args.train_only:
                print("\ntraining done (--train-only): rerun without it to score every checkpoint")
                return 0
        else:
            study = run_study(plan, prepare, reuse_only=args.report_only)
    except (FetchError, StageFailed, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    (plan.out / "study.json").write_text(json.dumps(study, indent=1, default=str))
    if plan.preset.startswith("round3"):
        from star.study.round3_report import render_round3

        report = render_round3(study, plan, plan.out, command.strip())
    elif is_long(plan.preset):
        from star.study.long_report import render_long

        report = render_long(study, plan, plan.out, command.strip())
    else:
        report = render(study, plan, plan.out, command.strip())
    print(f"\nreport: {report}")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

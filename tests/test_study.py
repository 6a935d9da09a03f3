"""The study: the Fashion-MNIST converter on a tiny hand-made idx file, the arm table, and a tiny
study end to end through the real stage commands (no network: the idx files are written here)."""
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from star.study import commands
from star.study.arms import ARM_KEYS, ARMS, select_arms
from star.study.fashion_mnist import CLASS_NAMES, make_subset, prepare_fashion_mnist, read_idx, write_idx


def drawn_shapes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 grey images: class k is a bright bar whose row and width depend on k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    images = rng.integers(0, 30, (count, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        top = 2 + 2 * label + rng.integers(0, 2)
        image[top : top + 4, 4 : 8 + 2 * label] = 220
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("idx")
    for prefix, count, seed in (("train", 200, 0), ("t10k", 50, 1)):
        images, labels = drawn_shapes(count, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)  # one not gzipped: both forms are read
    return folder


def test_idx_round_trip_and_truncation(tmp_path):
    images, _ = drawn_shapes(7, 3)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x.gz", images)), images)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_converter_writes_padded_rgb_imagefolder_once(tmp_path, idx_folder):
    summary = prepare_fashion_mnist(tmp_path / "fm", idx_folder)
    assert summary["train"]["images"] == 200 and summary["test"]["per_class"] == [5] * 10
    folders = sorted(p.name for p in (tmp_path / "fm" / "train").iterdir() if p.is_dir())
    assert folders == [f"{i:02d}_{name}" for i, name in enumerate(CLASS_NAMES)]  # sorted order = label order
    images, labels = drawn_shapes(200, 0)
    first = tmp_path / "fm" / "train" / folders[int(labels[3])] / "00003.png"
    pixels = np.asarray(Image.open(first))
    assert pixels.shape == (32, 32, 3) and pixels[:2].max() == 0  # padded with a black border
    assert np.array_equal(pixels[2:30, 2:30, 0], images[3])
    before = first.stat().st_mtime_ns
    prepare_fashion_mnist(tmp_path / "fm", None)  # cached: no download attempted, nothing rewritten
    assert first.stat().st_mtime_ns == before
    subset = make_subset(tmp_path / "fm", tmp_path / "fm-quick", {"train": 3, "test": 1})
    assert subset["train"]["per_class"] == [3] * 10 and subset["test"]["images"] == 10


def test_arm_table_and_scaled_decay():
    from star.train.star_settings import resolve_teacher_decay

    assert abs(resolve_teacher_decay("auto", 250_000) - 0.9999) < 1e-12  # the paper's run length: the paper's value
    assert abs(resolve_teacher_decay("auto", 1000) - 0.975) < 1e-12
    decay_arm = next(arm for arm in ARMS if arm.key.startswith("6_"))
    assert decay_arm.flags[decay_arm.flags.index("--teacher-decay") + 1] == "auto"
    assert [a.key for a in select_arms("3,1,5b")] == ["1_llamagen", "3_star", "5b_star_no_contrastive"]
    assert len(select_arms("all")) == len(ARM_KEYS) == 7
    with pytest.raises(ValueError, match="not an arm"):
        select_arms("1,7")


def test_stage_argv_builders_use_the_stage_commands(tmp_path):
    argv = commands.train_argv(tmp_path / "s", tmp_path / "r", tmp_path / "m.json", 10, 8, 1e-3, 1, ["--no-star"])
    assert argv[1].endswith("train/run.py") and argv[-1] == "--no-star" and "--resume" in argv
    probe = commands.probe_argv(tmp_path / "r", tmp_path / "tr", tmp_path / "te", tmp_path / "p", [1, 64], 10000)
    assert probe[2] == "probe" and probe[probe.index("--limit") + 1] == "10000"


def test_equal_compute_steps_scale_by_measured_time(tmp_path):
    from star.study.arms import ARMS
    from star.study.pipeline import equal_compute_steps, run_folder
    from star.study.stages import StageFailed, StudyPlan

    plan = StudyPlan(out=tmp_path, data=tmp_path, vq_steps=1, vq_batch_size=1, gpt={}, steps=100, batch_size=8,
                     lr=1e-3, num_samples=10, cfg_scale=2.0, probe_positions=[1], probe_limit=10, main_seeds=[0],
                     other_seeds=[0])
    arms = {arm.key: arm for arm in ARMS}
    with pytest.raises(StageFailed, match="arms 1 and 3"):
        equal_compute_steps(plan, arms, 0)
    for key, seconds in (("1_llamagen", 40.0), ("3_star", 100.0)):
        log = run_folder(plan, arms[key], 0) / "train" / "log.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text(json.dumps({"step": 50, "time": seconds / 2}) + "\n" + json.dumps({"step": 100, "time": seconds}))
    steps, record = equal_compute_steps(plan, arms, 0)
    assert steps == 250 and record["ratio"] == 2.5  # steps_1 x (arm 3 time / arm 1 time)
    for key, cpu in (("1_llamagen", 30.0), ("3_star", 90.0)):  # the stage's CPU seconds win when recorded
        (tmp_path / "stages").mkdir(exist_ok=True)
        (tmp_path / "stages" / f"train_{key}_seed0.json").write_text(json.dumps({"cpu_seconds": cpu}))
    steps, record = equal_compute_steps(plan, arms, 0)
    assert steps == 300 and record["unit"] == "CPU s"


def test_stages_run_in_the_callers_folder_so_a_relative_out_means_one_place(tmp_path, monkeypatch, capsys):
    import sys

    from star.study.stages import StudyPlan, run_stage

    monkeypatch.chdir(tmp_path)
    plan = StudyPlan(out=Path("study"), data=Path("data"), vq_steps=1, vq_batch_size=1, gpt={}, steps=1,
                     batch_size=1, lr=1e-3, num_samples=1, cfg_scale=1.0, probe_positions=[1], probe_limit=1,
                     main_seeds=[0], other_seeds=[0])
    made = Path("study") / "made.txt"  # relative, as the study passes its --out to the commands
    argv = [sys.executable, "-c", f"open({str(made)!r}, 'w').write('made')"]
    run_stage(plan, "make", argv, [made])
    assert (tmp_path / made).read_text() == "made"
    run_stage(plan, "make", argv, [made])  # done: skipped, not rerun
    assert "[skip] make" in capsys.readouterr().out


def test_tiny_study_end_to_end_and_resume(tmp_path, idx_folder, capsys):
    from star.study.__main__ import main

    out = tmp_path / "study"
    argv = ["--preset", "smoke", "--out", str(out), "--data-root", str(tmp_path / "fm"), "--idx-folder",
            str(idx_folder), "--arms", "1,3"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    for label in ("1 LlamaGen (equal epochs)", "3 ST-AR (paper)", "VQ ceiling", "FID-20 no CFG"):
        assert label in report
    assert not re.search(r"\{[a-z_.]+\}", report), "an f-string placeholder reached the report unformatted"
    for png in ("loss_curves", "probe_by_step", "fid_per_arm", "samples_per_arm"):
        assert (out / "figures" / f"{png}.png").stat().st_size > 1000
    probe = json.loads((out / "arms" / "3_star" / "seed0" / "result.json").read_text())["probe"]
    assert probe["eval_samples"] == 50  # the whole test split
    capsys.readouterr()
    assert main(argv) == 0  # a rerun skips every finished stage
    assert "[run ]" not in capsys.readouterr().out
    assert main([*argv, "--steps", "5"]) == 2  # changed settings never overwrite finished runs
    assert "other settings" in capsys.readouterr().err


def test_ceiling_subset_is_class_balanced_and_as_large_as_an_arm():
    from star.study.pipeline import balanced_subset

    labels = np.repeat(np.arange(10), 100)[np.random.default_rng(0).permutation(1000)]
    keep = balanced_subset(labels, 500)
    assert len(keep) == 500 and np.all(np.bincount(labels[keep], minlength=10) == 50)
    assert np.all(np.diff(keep) > 0)  # in split order
    assert len(balanced_subset(labels, 5000)) == 1000  # a count past the split keeps all of it


@pytest.mark.parametrize("flags, study, demo", [({"amx_bf16", "avx512_bf16"}, "bf16", "bf16"),
                                                ({"avx512_bf16"}, "bf16", "fp32"), ({"avx2"}, "fp32", "fp32")])
def test_auto_inception_precision_follows_the_cpus_bf16_hardware(monkeypatch, flags, study, demo):
    """The study's Inception runs bf16 on AMX or AVX512-BF16; the demo, which also trains in it, only on AMX;
    an explicit choice is kept."""
    import star.study.__main__ as study_main
    from star.demo import resolve_demo_precision

    monkeypatch.setattr(study_main, "cpu_description", lambda: ("a CPU", set(flags)))
    assert study_main.resolve_fid_precision("auto") == study
    assert resolve_demo_precision("auto") == demo
    assert study_main.resolve_fid_precision("fp32") == "fp32" and resolve_demo_precision("bf16") == "bf16"

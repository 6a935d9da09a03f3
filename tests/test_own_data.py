"""Your own images in a handful of commands: model sizes whose shapes come from the shards, the run's recorded
tokenizer found by evaluation, and the --log-with trackers."""
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from star.cli import parse_config
from star.data.manifest import Manifest
from star.gpt.config import GPTConfig
from star.train.config import TrainConfig
from star.train.plan import make_plan

REPO = Path(__file__).resolve().parents[1]


def command(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done


# What each command of the README's block gets appended for tiny data (argparse: a later flag wins).
TINY_OVERRIDES = {
    "train_vq": ["--image-size", "32", "--steps", "4", "--batch-size", "4", "--no-progress"],
    "tokenize": ["--image-size", "32", "--num-workers", "0", "--no-progress"],
    "train": ["--steps", "2", "--batch-size", "8", "--num-workers", "0", "--no-progress"],
    "sample": ["--num-samples", "6", "--batch-size", "6", "--no-progress"],
    "fid": ["--cache-dir", "cache"],
    "plot": [],
}


def readme_own_images_commands() -> list[list[str]]:
    """The bash block under the README's "Train ST-AR on your own images", one argv per command."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Train ST-AR on your own images"):]
    block = section[section.index("```bash\n") + len("```bash\n"):section.index("```\n", section.index("```bash"))]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("  #")[0]) for line in lines if line.strip()]


def command_name(argv: list[str]) -> str:
    """train_vq, tokenize, train, or evaluate's subcommand."""
    script = Path(argv[1])
    if script.name == "run.py":
        return argv[2] if script.parent.name == "evaluate" else script.parent.name
    return script.stem


@pytest.fixture(scope="module")
def own_images(tmp_path_factory):
    """The README's own-images commands, exactly as written plus TINY_OVERRIDES, in a fresh folder on the built-in
    photos (3 classes, 32 px, a 4x4 token grid): a tokenizer, token shards, GPT-tiny, samples with the run's own
    tokenizer, FID against val/, the training curves."""
    from star.data.builtin import build_builtin_dataset

    work = tmp_path_factory.mktemp("own")
    build_builtin_dataset(work / "my_images", train_per_class=8, val_per_class=2, image_size=40,
                          classes=("astronaut", "coffee", "rocket"))
    outputs = {}
    for argv in readme_own_images_commands():
        assert argv[0] == ".venv/bin/python", f"the README's block runs the project's venv: {argv}"
        name = command_name(argv)
        assert name in TINY_OVERRIDES, f"a README command this test does not know: {argv}"
        outputs[name] = command(str(REPO / argv[1]), *argv[2:], *TINY_OVERRIDES[name], cwd=work)
    assert set(outputs) == set(TINY_OVERRIDES), "the README's block lost one of the pipeline's commands"
    return work, outputs


def test_own_images_from_a_tokenizer_to_fid(own_images):
    work, outputs = own_images
    # the size took the data's vocabulary, grid and classes, and said so once
    line = "model GPT-tiny: dim 128, 4 layers, vocab 512, grid 4x4, 3 classes, from shards/my_images"
    assert outputs["train"].stdout.count(line) == 1
    model = json.loads((work / "runs/my_star/config.json").read_text())["model"]
    assert (model["vocab_size"], model["block_size"], model["num_classes"], model["dim"]) == (512, 16, 3, 128)
    # sampling decoded with the tokenizer the run recorded (no --vq-ckpt / --vq-config given)
    samples = np.load(work / "samples/my_star/samples.npz")
    assert samples["arr_0"].shape == (6, 32, 32, 3)
    resolved = json.loads((work / "samples/my_star/settings.json").read_text())["resolved"]
    assert resolved["tokenizer"]["checkpoint"] == str((work / "runs/my_vq/vq.pt").resolve())
    assert resolved["tokenizer"]["config_from"] == "the run's record"
    assert resolved["tokenizer_check"].startswith("matches")
    metrics = json.loads((work / "samples/my_star/metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert (work / "runs/my_star/curves.png").stat().st_size > 0  # `plot` drew the run's log


def evaluate_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("evaluate_run", REPO / "evaluate" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_a_moved_tokenizer_is_one_line_naming_the_flag(own_images, tmp_path, capsys):
    work, _ = own_images
    run, recorded = work / "runs/my_star", (work / "runs/my_vq/vq.pt").resolve()
    moved = tmp_path / "elsewhere" / "tokenizer.pt"  # no vq.json beside it: the config must come from the run
    moved.parent.mkdir()
    shutil.move(recorded, moved)
    try:
        assert evaluate_main(["sample", "--ckpt", str(run), "--num-samples", "2", "--out", str(tmp_path / "a"),
                              "--no-progress"]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1
        assert f"--vq-ckpt: the run's tokenizer {recorded}" in error and "recorded in" in error
        assert "pass --vq-ckpt with where it is now" in error
        assert evaluate_main(["sample", "--ckpt", str(run), "--vq-ckpt", str(moved), "--num-samples", "2", "--out",
                              str(tmp_path / "b"), "--no-progress"]) == 0
    finally:
        shutil.move(moved, recorded)
    resolved = json.loads((tmp_path / "b" / "settings.json").read_text())["resolved"]["tokenizer"]
    assert (resolved["found"], resolved["config_from"]) == ("--vq-ckpt", "the run's record")


def test_a_run_recorded_without_the_vq_config_reads_it_from_its_manifest(own_images, tmp_path):
    from star.eval.generator import resolve_checkpoint
    from star.eval.tokenizer import find_tokenizer
    from star.vq.model import VQConfig

    work, _ = own_images
    run = tmp_path / "run"
    shutil.copytree(work / "runs/my_star", run)
    record = json.loads((run / "config.json").read_text())
    del record["tokenizer_config"]
    record["settings"]["shards"] = str(work / "shards/my_images")
    (run / "config.json").write_text(json.dumps(record))
    choice = find_tokenizer("", "", resolve_checkpoint(str(run), "student"))
    assert choice.config == VQConfig.resolve(work / "runs/my_vq/vq.json")
    assert choice.found == f"recorded in {run / 'config.json'}"


def test_a_checkpoint_without_a_record_asks_for_the_vq(fixtures_dir, tmp_path, capsys):
    assert evaluate_main(["sample", "--ckpt", str(fixtures_dir / "gpt_small.pt"), "--model",
                          str(fixtures_dir / "gpt_small.json"), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "records no tokenizer file" in error and "pass --vq-ckpt" in error


def test_nll_and_probe_refuse_shards_of_another_tokenizer(own_images, tmp_path, capsys):
    from star.data.synthetic import SyntheticLayout, write_synthetic_shards

    work, _ = own_images
    run, other = str(work / "runs/my_star"), tmp_path / "other"  # the run's grid and classes, another tokenizer
    write_synthetic_shards(other, SyntheticLayout(6, num_classes=3, grid=4, views=2, codebook_size=512))
    assert evaluate_main(["nll", "--ckpt", run, "--shards", str(other), "--out", str(tmp_path / "n.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"--shards {other} were tokenized by a VQ" in error
    assert "tokenize them with the run's VQ, or pass --allow-other-tokenizer" in error
    assert evaluate_main(["probe", "--ckpt", run, "--shards", str(other), "--eval-shards", str(other), "--out",
                          str(tmp_path / "p")]) == 2
    assert f"--shards {other} were tokenized by a VQ" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="scoring anyway"):
        assert evaluate_main(["nll", "--ckpt", run, "--shards", str(other), "--out", str(tmp_path / "n.json"),
                              "--allow-other-tokenizer"]) == 0
    assert evaluate_main(["nll", "--ckpt", run, "--shards", str(work / "shards/my_images"), "--out",
                          str(tmp_path / "own.json")]) == 0  # the run's own shards
    assert json.loads((tmp_path / "own.json").read_text())["tokens_per_image"] == 16


# ---------------------------------------------------------------------------------------------------------
# Model sizes


def test_gpt_tiny_is_the_study_size():
    tiny = GPTConfig.resolve("GPT-tiny")
    assert (tiny.dim, tiny.n_layer, tiny.n_head, tiny.ffn_hidden_dim) == (128, 4, 4, 384)
    assert GPTConfig.resolve("tiny") == tiny == GPTConfig.resolve("gpt-TINY")


def test_a_size_takes_the_shards_shapes_and_a_json_is_checked_against_them(tiny_shards, tmp_path):
    manifest = Manifest.load(tiny_shards)
    plan = make_plan(TrainConfig(shards=str(tiny_shards), out="o", model="GPT-B", steps=1, batch_size=8),
                          manifest, 1, "fp32")
    assert (plan.model.vocab_size, plan.model.block_size, plan.model.num_classes) == (256, 64, 3)
    assert (plan.model.dim, plan.model.n_layer) == (768, 12)
    assert plan.model_source == f"model GPT-B: dim 768, 12 layers, vocab 256, grid 8x8, 3 classes, from {tiny_shards}"
    assert plan.tokenizer_config == manifest.tokenizer["config"]
    json_model = tmp_path / "b.json"
    json_model.write_text(json.dumps({"dim": 64, "n_layer": 2, "n_head": 4}))  # LlamaGen's defaults: 16x16, 1000
    with pytest.raises(ValueError, match="token grid 8x8 = 64 tokens != model block_size 256"):
        make_plan(TrainConfig(shards=str(tiny_shards), out="o", model=str(json_model), steps=1, batch_size=8),
                  manifest, 1, "fp32")
    with pytest.raises(ValueError, match="--views-per-image 11: the shards .* store 10 views per image"):
        make_plan(TrainConfig(shards=str(tiny_shards), out="o", views_per_image=11, steps=1, batch_size=8),
                  manifest, 1, "fp32")


# ---------------------------------------------------------------------------------------------------------
# Trackers


def train_flags(*flags: str) -> TrainConfig:
    return parse_config(TrainConfig, ["--shards", "s", "--out", "o", *flags])


def test_log_with_takes_trackers_and_tensorboard_is_its_alias(capsys):
    assert train_flags().trackers == ()
    assert train_flags("--tensorboard").trackers == ("tensorboard",)
    assert train_flags("--log-with", "wandb, MLflow").trackers == ("wandb", "mlflow")
    assert train_flags("--log-with", "tensorboard,aim", "--tensorboard").trackers == ("tensorboard", "aim")
    with pytest.raises(SystemExit) as exit_info:
        train_flags("--log-with", "wandb,comet")
    assert exit_info.value.code == 2
    assert "--log-with wandb,comet: comet is not one of tensorboard, wandb, mlflow, aim" in capsys.readouterr().err


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "aim"])
def test_a_tracker_without_its_package_is_one_line_with_the_pip_command(tracker, tmp_path):
    from star.train.distributed import make_accelerator

    if importlib.util.find_spec(tracker):
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(ValueError, match=f"^--log-with {tracker} needs the {tracker} package: "
                                         f"`.venv/bin/pip install {tracker}`"):
        make_accelerator(TrainConfig(shards="s", out=str(tmp_path / "run"), log_with=tracker))


def test_trackers_stay_offline_and_in_the_run_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    from star.train.distributed import keep_trackers_local

    for name in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice is kept
    keep_trackers_local(tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "online"
    assert os.environ["WANDB_DIR"] == str(tmp_path / "run")
    assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "run" / "mlruns").resolve().as_uri()
    monkeypatch.delenv("WANDB_MODE")
    keep_trackers_local(tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "offline"

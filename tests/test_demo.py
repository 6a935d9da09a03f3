"""The demo's committed data and tokenizer, and a tiny demo end to end (about a minute on 2 cores)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from star import demo
from star.data.builtin import DEMO_SUBSET, first_per_class, load_demo_subset, write_demo_image_folder

# Fashion-MNIST's labels, as its authors name them (github.com/zalandoresearch/fashion-mnist)
FASHION_MNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


def test_subset_is_a_balanced_fashion_mnist_sample_with_its_class_names():
    subset = load_demo_subset()
    assert subset["class_names"].tolist() == FASHION_MNIST
    for split, per_class in (("train", 400), ("val", 100)):
        images, labels = subset[f"{split}_images"], subset[f"{split}_labels"]
        assert images.dtype == np.uint8 and images.shape == (10 * per_class, 28, 28)
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    # Fashion-MNIST's look: a black background around a lit garment (corners dark, the centre not)
    train = subset["train_images"].astype(np.float64)
    assert train[:, :2, :2].mean() < 5 and train[:, 10:18, 10:18].mean() > 60
    assert DEMO_SUBSET.stat().st_size < 4e6


def test_committed_tokenizer_reconstructs_held_out_images():
    """A trained VQ, not a random one: held-out images survive encode -> decode (PSNR well above a random
    initialisation's, which is under 10 dB)."""
    from star.vq.model import VQConfig, load_vq

    vq = load_vq(demo.DEMO_VQ, VQConfig.resolve(demo.DEMO_VQ_CONFIG))
    assert vq.config.codebook_size == 512
    images = np.pad(load_demo_subset()["val_images"][::25], ((0, 0), (2, 2), (2, 2)))  # [40, 32, 32]
    pixels = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1).repeat(1, 3, 1, 1)  # [40, 3, 32, 32]
    with torch.no_grad():
        codes = vq.encode_indices(pixels)  # [40, 8, 8]
        decoded = vq.decode_indices(codes).clamp(-1, 1)
    assert codes.shape[-2:] == (8, 8)
    mse = (decoded - pixels).pow(2).mean().item() / 4  # on a [0, 1] scale
    assert 10 * np.log10(1 / mse) > 18
    assert len(torch.unique(codes)) > 50


def test_image_folder_takes_the_first_images_of_each_class_and_rewrites_on_other_counts(tmp_path):
    spec = write_demo_image_folder(tmp_path, train_per_class=3, val_per_class=2)
    assert spec["class_names"] == FASHION_MNIST
    folders = sorted(p.name for p in (tmp_path / "train").iterdir() if p.is_dir())
    assert folders[0] == "00_t_shirt_top" and folders[-1] == "09_ankle_boot"  # sorted order = label order
    assert len(list((tmp_path / "val" / "07_sneaker").glob("*.png"))) == 2
    image = np.asarray(Image.open(next((tmp_path / "train" / "01_trouser").glob("*.png"))))
    assert image.shape == (32, 32, 3)
    write_demo_image_folder(tmp_path, train_per_class=4, val_per_class=2)
    assert len(list((tmp_path / "train" / "01_trouser").glob("*.png"))) == 4
    assert first_per_class(np.array([0, 1, 0, 1, 0]), 2).tolist() == [0, 1, 2, 3]


TINY = ["--gpt", "tiny", "--steps", "4", "--batch-size", "8", "--train-per-class", "8", "--val-per-class", "6",
        "--samples-per-class", "3", "--precision", "fp32"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    args = ["--out", str(root / "runs"), "--data", str(root / "data"), *TINY]
    assert demo.main(args) == 0
    return root, args


def test_tiny_demo_runs_end_to_end(tiny_demo):
    root, _ = tiny_demo
    summary = (root / "runs" / "summary.md").read_text()
    assert (root / "runs" / "probe.png").is_file()
    assert "T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot" in summary
    for row in ("| LlamaGen (baseline) |", "| ST-AR |", "| VQ reconstructions (ceiling) |", "| real vs real (control) |"):
        assert row in summary
    for run in ("gpt_baseline", "gpt_star"):
        metrics = json.loads((root / "runs" / "samples" / run / "metrics.json").read_text())
        assert metrics["num_samples"] == 30 and metrics["num_reference"] == 60
        assert np.isfinite([metrics["fid"], metrics["kid"]]).all()
        settings = json.loads((root / "runs" / "samples" / run / "settings.json").read_text())
        assert settings["resolved"]["class_names"] == "--class-names"  # the grid's rows carry the demo's names
        assert "Ankle boot" in json.dumps(settings)
        grid = Image.open(root / "runs" / "samples" / run / "grid.png")
        assert grid.height > 10 * 32  # a named row per class (32-px samples are drawn enlarged) under a title
        probe = json.loads((root / "runs" / run / "probe.json").read_text())
        assert [row["step"] for row in probe] == demo.PROBE_STEPS


def test_tiny_demo_rerun_continues_without_redoing_finished_stages(tiny_demo, capsys):
    root, args = tiny_demo
    logs = {run: (root / "runs" / run / "log.jsonl").read_text() for run in ("gpt_baseline", "gpt_star")}
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("done: ") >= 6  # two shard folders, two runs, two sample folders
    assert {run: (root / "runs" / run / "log.jsonl").read_text() for run in logs} == logs


def test_demo_refuses_a_run_folder_made_from_other_inputs(tiny_demo):
    root, _ = tiny_demo
    with pytest.raises(ValueError, match="make clean-demo"):
        demo.run_demo(demo.DemoConfig(out=str(root / "runs"), data=str(root / "data"), gpt="tiny",
                                      train_per_class=8, val_per_class=5))


def test_interrupt_says_make_demo(monkeypatch, capsys, tmp_path):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert demo.main(["--out", str(tmp_path)]) == 130
    assert "make demo" in capsys.readouterr().err

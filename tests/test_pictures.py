"""Pictures worth opening: sample grids with class names and a title saying what they show, attention maps with
axes and a colour bar, the probe plot's axis, and `evaluate/run.py plot` over runs' log.jsonl."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from star import plots
from star.data.manifest import Manifest
from star.eval.class_names import parse_class_names, row_label, run_class_names
from star.eval.curves import PlotConfig, read_run_log
from star.eval.sample import SampleConfig, run_sampling
from star.eval.sample_store import GridLayout, grid_from_batches
from star.eval.understanding import attention_panels, save_attention_png
from star.gpt.model import GPT, GPTConfig
from star.io import is_star_png
from star.weights_io import save_gpt

REPO = Path(__file__).resolve().parents[1]
COLOURS = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)


def evaluate_main(argv):
    """evaluate/run.py's main() in this process (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("evaluate_run", REPO / "evaluate" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture()
def figures(monkeypatch):
    """The matplotlib figures star/plots.py saves, kept open for inspection (still written to disk)."""
    kept = []
    original = plots.save_figure

    def keep(figure, path):
        kept.append(figure)
        return original(figure, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return kept


def colour_pixels(path: Path) -> list[int]:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return [int((pixels == colour).all(-1).sum()) for colour in COLOURS]


# ---------------------------------------------------------------------------------------------------------
# Sample grids


def solid_batches(labels: np.ndarray, size: int = 32, batch: int = 7):
    """Batches of [b, size, size, 3] tiles coloured by their class, as sampling writes them."""
    for start in range(0, len(labels), batch):
        yield np.stack([np.broadcast_to(COLOURS[label], (size, size, 3)) for label in labels[start : start + batch]])


def test_grid_shows_every_requested_sample_with_class_names_and_says_so(tmp_path):
    labels = np.arange(30) % 3  # 10 samples of each of 3 classes
    names = {0: "astronaut", 1: "coffee", 2: "rocket"}
    path = grid_from_batches(solid_batches(labels), labels, tmp_path / "all.png", GridLayout(0, 0, names, "CFG 2"))
    tile_pixels = 64 * 64  # 32-px samples are drawn at twice their size
    assert colour_pixels(path) == [10 * tile_pixels] * 3  # every sample of every class
    with Image.open(path) as image:
        assert image.info["Description"] == "rows: 0: astronaut | 1: coffee | 2: rocket"
        assert image.info["Title"] == "CFG 2\nall 10 samples per class; 3 classes"
        strip = np.asarray(image.convert("L"))[:, :60]  # the label strip left of the first tile
        row_tops = [image.height - (3 - r) * (64 + 2) for r in range(3)]
    for top in row_tops:
        assert (strip[top : top + 64] < 100).sum() > 30, "each row's strip carries its name in dark text"

    subset = grid_from_batches(solid_batches(labels), labels, tmp_path / "some.png", GridLayout(4, 2, names))
    assert colour_pixels(subset) == [4 * tile_pixels, 4 * tile_pixels, 0]
    with Image.open(subset) as image:
        assert image.info["Title"] == "first 4 of 10 samples per class; first 2 of 3 classes"
    uneven = np.array([0, 1, 0, 1, 0])
    grid_from_batches(solid_batches(uneven), uneven, tmp_path / "uneven.png", GridLayout(2, 0))
    with Image.open(tmp_path / "uneven.png") as image:
        assert image.info["Title"] == "first 2 of 2-3 samples per class; 2 classes"
        assert image.info["Description"] == "rows: class 0 | class 1"


def test_class_names_come_from_a_flag_or_the_runs_training_shards(tmp_path, tiny_shards):
    assert parse_class_names(str(tiny_shards), 3)[0] == {0: "astronaut", 1: "coffee", 2: "rocket"}
    assert parse_class_names(str(tiny_shards / "manifest.json"), 3)[0][1] == "coffee"
    assert parse_class_names("T-shirt/top, Trouser", 10) == ({0: "T-shirt/top", 1: "Trouser"}, "--class-names")
    with pytest.raises(ValueError, match="names class ids up to 2, but the model has 2 classes"):
        parse_class_names("a,b,c", 2)
    with pytest.raises(ValueError, match="no such shard folder"):
        parse_class_names(str(tmp_path / "missing"), 3)
    assert row_label(7, {}) == "class 7" and row_label(1, {1: "x" * 40}) == f"1: {'x' * 29}..."

    run = tmp_path / "run"
    checkpoint_file = run / "checkpoints" / "step-0000010" / "model.safetensors"
    assert run_class_names(checkpoint_file)[0] == {}  # no run config: no names, and no error
    run.mkdir()
    digest = Manifest.load(tiny_shards).digest
    (run / "config.json").write_text(json.dumps({"settings": {"shards": str(tiny_shards)}, "data_digest": digest}))
    names, source = run_class_names(checkpoint_file)
    assert names == {0: "astronaut", 1: "coffee", 2: "rocket"} and "the run's training shards" in source
    (run / "config.json").write_text(json.dumps({"settings": {"shards": str(tiny_shards)}, "data_digest": "other"}))
    names, source = run_class_names(checkpoint_file)
    assert names == {} and "no longer holds the data the run was trained on" in source


def test_sampling_grid_rows_carry_the_shards_class_names(tmp_path, tiny_gpt_json, small_vq, tiny_shards):
    torch.manual_seed(0)
    save_gpt(GPT(GPTConfig.resolve(tiny_gpt_json)), tmp_path / "gpt")
    settings = dict(ckpt=str(tmp_path / "gpt"), vq_ckpt=str(small_vq[0]), vq_config=str(small_vq[1]), num_samples=6,
                    batch_size=6, progress=False)
    run_sampling(SampleConfig(out=str(tmp_path / "named"), class_names=str(tiny_shards), **settings))
    with Image.open(tmp_path / "named" / "grid.png") as image:
        assert image.info["Description"] == "rows: 0: astronaut | 1: coffee | 2: rocket"
        assert image.info["Title"].endswith("all 2 samples per class; 3 classes")
    resolved = json.loads((tmp_path / "named" / "settings.json").read_text())["resolved"]
    assert resolved["class_names"] == f"manifest of {tiny_shards}"
    assert SampleConfig(out="o", class_names=["T-shirt/top", "Trouser"], **settings).class_names == \
        "T-shirt/top,Trouser,"  # a library caller's list
    with pytest.raises(ValueError, match="--grid-per-class -1: must be >= 0"):
        SampleConfig(out=str(tmp_path / "x"), grid_per_class=-1, **settings)


# ---------------------------------------------------------------------------------------------------------
# Attention figure and probe plot


def test_attention_figure_has_axes_positions_a_colour_bar_and_masks_hidden_cells(tmp_path, figures):
    grid, seq = 3, 10  # 9 image cells plus the class position
    weights = torch.rand(seq, seq).tril()
    weights = weights / weights.sum(1, keepdim=True)  # [S, S] rows sum to 1, causal
    maps, class_mass = attention_panels({2: weights}, [1, 5, 10], grid)
    assert class_mass[2][5] == pytest.approx(float(weights[4, 0]))
    # position 5 is sequence index 4: it sees the class and cells 0..3 (keys 1..4), the rest is hidden (NaN)
    np.testing.assert_allclose(maps[2][5].ravel()[:4], weights[4, 1:5].numpy(), rtol=1e-6)
    assert np.isnan(maps[2][5].ravel()[4:]).all() and np.isnan(maps[2][1]).all()
    assert np.isfinite(maps[2][10].ravel()).all()  # the last position sees every cell

    path = save_attention_png({2: weights}, [1, 5, 10], grid, tmp_path / "attention.png")
    assert is_star_png(path)
    figure, = figures
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title().split("\n")[0] for axis in panels] == [
        "layer 2, position 1", "layer 2, position 5", "layer 2, position 10"]
    assert all(axis.get_xlabel() == "grid column" and axis.get_ylabel() == "grid row" for axis in panels)
    colour_bars = [axis for axis in figure.axes if "attention probability" in axis.get_ylabel()]
    assert len(colour_bars) == 1


def test_probe_plot_axis_is_the_sequence_position(tmp_path, figures):
    plots.plot_probe_curves({"layer 6": [{"step": 1, "accuracy": 0.1}, {"step": 64, "accuracy": 0.4}]},
                            tmp_path / "probe.png", chance=0.1)
    assert figures[0].axes[0].get_xlabel() == "sequence position"


# ---------------------------------------------------------------------------------------------------------
# evaluate/run.py plot


def write_log(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    return run


def record(step: int, star: bool, **extra) -> dict:
    return {"step": step, "loss_ar": 6.0 - step / 100, "loss_mim": 0.3 if star else 0.0, "loss_step": 0.0,
            "loss_view": 0.1 if star else 0.0, "loss": 6.5 - step / 100, "grad_norm": 1.5, "images_per_s": 90.0,
            "time": step / 2, "cpu_s": step * 1.2, **extra}


def test_plot_command_overlays_runs_against_step_and_compute(tmp_path, figures, capsys):
    baseline = write_log(tmp_path / "baseline", [record(step, False) for step in (10, 20, 30)])
    resumed = [record(step, True) for step in (10, 20, 30)] + [record(20, True, loss=9.0), record(30, True)]
    star = write_log(tmp_path / "star", resumed, tail='{"step": 40, "loss')  # killed mid-line
    with pytest.warns(UserWarning, match="line 6 is cut off"):
        records = read_run_log(star)
    assert [r["step"] for r in records] == [10, 20, 30] and records[1]["loss"] == 9.0  # the resumed run's record

    out = tmp_path / "curves.png"
    with pytest.warns(UserWarning, match="cut off"):
        assert evaluate_main(["plot", str(baseline), str(star), "--out", str(out)]) == 0
    assert is_star_png(out) and "panels: loss, loss_ar, loss_mim, loss_view, grad_norm, images_per_s" in \
        capsys.readouterr().out  # loss_step is 0 in both runs: no panel
    figure, = figures
    panels = [axis for axis in figure.axes if axis.get_ylabel()]
    assert len(panels) == 12  # 6 quantities x (step, compute)
    assert panels[-2].get_xlabel() == "optimizer step" and "CPU seconds" in panels[-1].get_xlabel()
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["baseline", "star"]
    mim_vs_compute = panels[5]  # loss_mim against cpu_s: the baseline's zeros are not drawn
    assert mim_vs_compute.get_ylabel() == "loss_mim" and len(mim_vs_compute.lines) == 1
    np.testing.assert_allclose(mim_vs_compute.lines[0].get_xdata(), [12, 24, 36])

    assert evaluate_main(["plot", str(tmp_path)]) == 2
    assert f"{tmp_path} has no log.jsonl: give a training run folder" in capsys.readouterr().err
    write_log(tmp_path / "damaged", [record(10, False)], tail="not json\n" + json.dumps(record(20, False)) + "\n")
    assert evaluate_main(["plot", str(tmp_path / "damaged")]) == 2
    assert "log.jsonl: line 2 is not JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--out is needed with 2 runs"):
        PlotConfig(runs=(str(baseline), str(star)))
    assert PlotConfig(runs=(str(baseline),)).out_path() == baseline / "curves.png"

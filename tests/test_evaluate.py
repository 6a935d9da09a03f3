"""Stage three: sampling output format and determinism, the official-checkpoint path, probes and attention stats."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_ENV, TWO_CPU_PROCESSES  # noqa: E402

from star.checkpoint import save_gpt
from star.eval.sample import SampleConfig, run_sampling, sample_labels
from star.eval.understanding import attention_maps, attention_statistics, linear_probe_accuracy
from star.gpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny_generator(tmp_path, tiny_gpt_json):
    torch.manual_seed(0)
    model = GPT(GPTConfig.resolve(tiny_gpt_json))
    torch.nn.init.normal_(model.output.weight, std=0.05)  # LlamaGen zero-inits the head: make sampling non-trivial
    save_gpt(model, tmp_path / "gpt")
    return tmp_path / "gpt"


def test_sampling_writes_adm_npz_grid_and_is_seeded(tmp_path, tiny_generator, small_vq):
    settings = dict(ckpt=str(tiny_generator), vq_ckpt=str(small_vq[0]), vq_config=str(small_vq[1]), cfg_scale=2.0,
                    num_samples=7, batch_size=3, seed=5, progress=False)
    run_sampling(SampleConfig(out=str(tmp_path / "a"), **settings))
    run_sampling(SampleConfig(out=str(tmp_path / "b"), **{**settings, "batch_size": 3}))
    run_sampling(SampleConfig(out=str(tmp_path / "c"), **{**settings, "seed": 6}))
    a, b, c = (np.load(tmp_path / name / "samples.npz") for name in "abc")
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (7, 32, 32, 3)
    assert a["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])
    assert (tmp_path / "a" / "grid.png").is_file()
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["cfg_scale"] == 2.0


def test_official_checkpoint_tokens_only_matches_greedy_fixture(tmp_path, fixtures_dir):
    from safetensors.torch import load_file

    reference = load_file(fixtures_dir / "gpt_small_io.safetensors")
    classes = ",".join(str(int(c)) for c in reference["sample_classes"])
    run_sampling(SampleConfig(ckpt=str(fixtures_dir / "gpt_small.pt"), model=str(fixtures_dir / "gpt_small.json"),
                              out=str(tmp_path), tokens_only=True, cfg_scale=2.0, top_k=1, classes=classes,
                              num_samples=4, batch_size=4, save_tokens=str(tmp_path / "t.npy"), progress=False))
    assert np.array_equal(np.load(tmp_path / "t.npy"), reference["greedy_tokens_cfg2"].numpy())
    with pytest.raises(ValueError, match="give --model"):
        run_sampling(SampleConfig(ckpt=str(fixtures_dir / "gpt_small.pt"), out=str(tmp_path / "x"), tokens_only=True))


def test_two_process_sampling_equals_one_process(tmp_path, tiny_generator, small_vq):
    common = ["--ckpt", str(tiny_generator), "--vq-ckpt", str(small_vq[0]), "--vq-config", str(small_vq[1]),
              "--num-samples", "6", "--batch-size", "2", "--cfg-scale", "1.5", "--no-progress"]
    env = {**os.environ, **CPU_ENV}
    single = subprocess.run([sys.executable, str(REPO / "evaluate" / "run.py"), "sample", *common, "--out",
                             str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, *TWO_CPU_PROCESSES, str(REPO / "evaluate" / "run.py"), "sample", *common, "--out", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])


def test_sample_labels_balanced_or_given():
    assert sample_labels(5, 3, "").tolist() == [0, 1, 2, 0, 1]
    assert sample_labels(4, 10, "7,2").tolist() == [7, 2, 7, 2]
    with pytest.raises(ValueError, match="outside 0..9"):
        sample_labels(2, 10, "12")


def test_attention_statistics_on_a_hand_made_map():
    grid, seq = 3, 9  # class + 8 image inputs (tokens 0..7 of a 3x3 grid)
    weights = torch.zeros(seq, seq)
    weights[:, 0] = 0.5
    # Query at position 5 holds cell 4 = (1, 1): visible neighbours (0,0),(0,1),(0,2),(1,0) = keys 1,2,3,4.
    weights[5, 1:5] = 0.125
    stats = attention_statistics(weights, grid)
    assert stats["class_mass"] == pytest.approx(0.5)
    assert stats["neighbour_mass"] == pytest.approx(0.5 / 8)


def test_attention_maps_are_causal_distributions(tiny_gpt_json):
    torch.manual_seed(0)
    model = GPT(GPTConfig.resolve(tiny_gpt_json))
    tokens = np.random.default_rng(0).integers(0, 256, (3, 64))
    maps = attention_maps(model, tokens, np.array([0, 1, 2]), [1, 2])
    for weights in maps.values():
        assert weights.shape == (64, 64)
        assert torch.allclose(weights.sum(-1), torch.ones(64), atol=1e-5)
        assert weights.triu(1).abs().max() == 0
        # The class position's key is the zero vector (zero RoPE rows): its logit is 0 for every query.
        assert weights[0, 0] == pytest.approx(1.0)


def test_linear_probe_separates_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    centres = rng.normal(0, 1, (4, 16)) * 4
    features = centres[labels] + rng.normal(0, 1, (200, 16))
    assert linear_probe_accuracy(features[:150], labels[:150], features[150:], labels[150:]) > 0.95
    noise = rng.normal(0, 1, (200, 16))
    assert linear_probe_accuracy(noise[:150], labels[:150], noise[150:], labels[150:]) < 0.5
